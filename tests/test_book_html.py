"""The rendered smoke book reads clean: no raw subscripts, unresolved references or object reprs.

The frozen smoke notebooks are rendered to HTML with the offline renderer (``lib.render``, a few
seconds; no PDF) and the text a reader sees is checked. Source code (the folded code blocks),
inline code and MathML are not reader text for these checks, except for the object reprs, which
are looked for everywhere, cell outputs included.
"""

from __future__ import annotations

import html
import re
from pathlib import Path

import pytest

from lib.paths import FREEZE, ROOT
from lib.render import render_book

PROFILE = "smoke"

RAW_SUBSCRIPTS = re.compile(r"(?:κ|Δ|ΔECE|ECE)_[A-Za-z{]")
"""Subscripts typed as plain text; they belong in math (``$\\kappa_S$``) or in words."""

REPRS = ("<lib.", "object at 0x", "<pandas.io.formats.style.Styler", "<Figure size", "<IPython.core.display")
"""Reprs of Python objects, which mean a cell displayed an object instead of its content."""


def reader_text(page: str) -> str:
    """Visible text of a rendered page without MathML, folded source code and inline code."""
    page = re.sub(r'<details class="code-fold".*?</details>', " ", page, flags=re.S)
    page = re.sub(r"<(math|code|style|script)\b.*?</\1>", " ", page, flags=re.S)
    return html.unescape(re.sub(r"<[^>]+>", " ", page))


def all_text(page: str) -> str:
    """Every text node of a page (code and outputs included), unescaped."""
    page = re.sub(r"<(style|script)\b.*?</\1>", " ", page, flags=re.S)
    return html.unescape(re.sub(r"<[^>]+>", " ", page))


def _context(text: str, start: int, end: int) -> str:
    return " ".join(text[max(0, start - 60):end + 40].split())


def problems(pages: dict[str, str]) -> list[str]:
    """Every reader-facing defect of the rendered ``pages`` (name → HTML), one line each."""
    out = []
    for name, page in pages.items():
        text, every = reader_text(page), all_text(page)
        out += [f"{name}: raw subscript '{m.group()}' in «{_context(text, m.start(), m.end())}»"
                for m in RAW_SUBSCRIPTS.finditer(text)]
        out += [f"{name}: unresolved reference in «{_context(every, m.start(), m.end())}»"
                for m in re.finditer(r"\?@[\w-]+", every)]
        out += [f"{name}: object repr '{r}' in «{_context(every, i, i + len(r))}»"
                for r in REPRS for i in [every.find(r)] if i >= 0]
        out += [f"{name}: parameters cell shown: «{_context(every, m.start(), m.end())}»"
                for m in re.finditer(r"\bparams\s*=\s*\{", every)]
        if "uncommitted changes" in text:  # reader text: the chapters' folded source may name the phrase
            out.append(f"{name}: executed from a checkout with uncommitted changes (provenance table); "
                       "commit, then make run PROFILE=smoke")
    return out


def test_checks_catch_what_they_are_for():
    """Each check fails on a page that has the defect and passes on its clean form."""
    bad = ('<p>at κ_S and ECE_det − ECE_Bayes, ECE_TS − ECE and ΔECE_iso, see <strong>?@fig-x</strong></p>'
           "<pre><code>&lt;lib.study.Study object at 0x7f00&gt;</code></pre>"
           "<td>`abc123` (uncommitted changes)</td>"
           '<details class="code-fold"><summary>Code</summary><pre># Parameters\nparams = {"seeds": [0]}</pre></details>')
    found = problems({"p.html": bad})
    for needle in ("'κ_S'", "'ECE_d'", "'ECE_B'", "'ECE_T'", "'ΔECE_i'", "?@fig-x", "'<lib.'", "'object at 0x'", "uncommitted",
                   "parameters cell"):
        assert any(needle in f for f in found), (needle, found)
    clean = ('<p>at <math><msub><mi>κ</mi><mi>S</mi></msub></math>, see <a href="#fig-x">Figure 1.1</a>, '
             "parameter <code>stats.n_bins</code></p>"
             '<details class="code-fold"><summary>Code</summary><pre>x = table["κ_S"]</pre></details>')
    assert problems({"p.html": clean}) == []


@pytest.fixture(scope="module")
def smoke_pages(tmp_path_factory) -> dict[str, str]:
    if not any((FREEZE / PROFILE).glob("*.ipynb")):
        pytest.fail(f"no frozen notebooks in _freeze/{PROFILE}/; make run PROFILE={PROFILE}")
    out = tmp_path_factory.mktemp("book") / "_book"
    result = render_book(ROOT, out=out, profile=PROFILE, pdf=False)
    return {p.name: p.read_text() for p in sorted(Path(out).glob("*.html"))} | {"warnings": "\n".join(result.warnings)}


def test_rendered_smoke_book_reads_clean(smoke_pages):
    warnings = smoke_pages.pop("warnings")
    assert "unresolved cross-reference" not in warnings, warnings
    found = problems(smoke_pages)
    assert not found, f"{len(found)} problem(s) in the rendered smoke book:\n" + "\n".join(found[:40])
