"""The chapter sources read as a finished report, and render alike with Quarto and lib.render.

Every figure and table is cited in the text. The sources and their frozen outputs hold nothing that
one renderer shows differently from the other: math that every pandoc/Typst pair reads, a Summary
that Quarto leaves unnumbered, citations by pandoc for the PDF too, tables without pandas'
index-name row, no parameters cell.
"""

from __future__ import annotations

import re
import tempfile
from pathlib import Path

import nbformat

from lib.paths import CHAPTERS, FREEZE, ROOT


def test_every_figure_and_table_is_referenced_in_the_text():
    """Every ``#| label: fig-…/tbl-…`` of a chapter is cited as ``@label`` in some chapter's prose
    (markdown cells, the sentences its code cells write, or those lib/ still generates)."""
    labels, refs = set(), set()
    for path in sorted(CHAPTERS.glob("*.ipynb")):
        for cell in nbformat.read(path, as_version=4).cells:
            labels.update(re.findall(r"#\| label: ((?:fig|tbl)-[\w-]+)", cell.source))
            prose = cell.source if cell.cell_type == "markdown" else "\n".join(_python_strings(cell.source))
            refs.update(re.findall(r"@((?:fig|tbl)-[\w-]+)", prose))
    for path in (ROOT / "lib").glob("*.py"):
        refs.update(re.findall(r"@((?:fig|tbl)-[\w-]+)", path.read_text()))
    assert labels, "no labelled figures or tables found"
    assert sorted(labels - refs) == [], "label these in the text with @label"


def test_cell_options_are_valid_yaml():
    """Quarto reads the ``#|`` lines of a cell as YAML: a caption with an invalid escape (``"$\\kappa$"``
    with one backslash inside double quotes) loses its figure or table, and its label goes unresolved."""
    import yaml

    bad = []
    for path in sorted(CHAPTERS.glob("*.ipynb")):
        for cell in nbformat.read(path, as_version=4).cells:
            options = "\n".join(line[3:] for line in cell.source.splitlines() if line.startswith("#| "))
            if cell.cell_type != "code" or not options:
                continue
            try:
                parsed = yaml.safe_load(options)
            except yaml.YAMLError as err:
                bad.append(f"{path.name}: {err}".splitlines()[0])
                continue
            if not isinstance(parsed, dict):
                bad.append(f"{path.name}: cell options are not a mapping: {options[:80]!r}")
    assert bad == []


# ---- the book renders the same with Quarto (HTML, and PDF via pandoc → Typst) and lib.render ------------------------

TYPST_RENAMED = set(
    "¢¤¥«»ϏϗϜϝϴ϶‣‱‹›⁃⁌⁍℩⇞⇟⇷⇸⇹⇺⇻⇼⇽⇾⇿∩⊓⊖⊗⊘⊙⊚⊛⊜⊝⊨⊭⊲⊳⊴⊵⋂⋒⋪⋫⋬⋭⌜⌝⌞⌟⌢⌣⍼⎰⎱⏻⏼⏽⏾◘◦⟅⟆⟕⟖⟗⟦⟧⟨⟩⟪⟫⟬⟭⟮⟯⟴"
    "⤀⤁⤂⤃⤄⤈⤉⤔⤕⤖⤗⤘⦃⦄⦅⦆⦇⦈⦉⦊⦍⦎⦏⦐⦑⦒⦗⦘⦜⦡⦦⦶⦷⦸⦹⦼⦾⦿⧀⧁⧼⧽⨀⨂⨅⨙⨝⨭⨮⨴⨵⨶⨸⩀⩄⩎⫤⫪⫫⬴⬵⬹⬺⬻⬼⬽⭘⯉"
)
"""Math symbols whose Typst name changed between Typst 0.13 and 0.15, so that no pandoc writes a name
that every Typst of that range accepts: ⊗ is ``times.circle`` in pandoc 3.9, which Typst 0.14
deprecates and 0.15 rejects ("unknown symbol modifier", quarto-dev/quarto-cli#14618; Quarto 1.10
bundles Typst 0.15.1), while the new ``times.o`` is unknown before 0.14. Found by writing every
character of U+00A0–00FF, U+0370–03FF, U+2016–2060, U+2100–214F and U+2190–2BFF in math with
pandoc 3.9 (pypandoc-binary 1.17) and compiling it with Typst 0.13.1, 0.14.9 and 0.15.2 (the
``typst`` wheels): listed where any of them rejects the name or warns that it is deprecated."""

_MATH = re.compile(r"\$\$(.+?)\$\$|(?<![\\$\w])\$(?![\s$])((?:[^$\\]|\\.)+?)(?<!\s)\$(?!\d)", re.S)
"""TeX math as pandoc reads it: ``$$…$$``, or ``$…$`` with no space inside either dollar."""


def _committed_freezes() -> list[Path]:
    from lib.runner import is_scratch

    return [p for p in sorted(FREEZE.iterdir()) if p.is_dir() and list(p.glob("*.ipynb")) and not is_scratch(p.name)]


def _python_strings(source: str) -> list[str]:
    """The string literals of Python ``source`` (f-strings with ``x`` for each placeholder), docstrings left out."""
    import ast

    try:
        tree = ast.parse(source)
    except SyntaxError:
        return [source]
    docs = {id(node.body[0].value) for node in ast.walk(tree)
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef))
            and node.body and isinstance(node.body[0], ast.Expr) and isinstance(node.body[0].value, ast.Constant)}
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.JoinedStr):
            out.append("".join(v.value if isinstance(v, ast.Constant) else "x" for v in node.values))
        elif isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docs:
            out.append(node.value)
    return out


def _notebook_texts(path: Path) -> list[str]:
    """Everything of a notebook that reaches the book as Markdown: markdown cells, cell options
    (captions), string literals of code, and Markdown, HTML and LaTeX outputs."""
    from lib.render.convert import cell_options

    texts = []
    for cell in nbformat.read(path, as_version=4).cells:
        if cell.cell_type != "code":
            texts.append(cell.source)
            continue
        options, code = cell_options(cell.source)
        texts += [str(v) for v in options.values()] + _python_strings(code)
        for out in cell.get("outputs", []):
            data = out.get("data", {})
            texts += ["".join(data[m]) if isinstance(data[m], list) else str(data[m])
                      for m in ("text/markdown", "text/html", "text/latex") if m in data]
    return texts


def _book_math() -> dict[str, list[str]]:
    """TeX math spans by where they come from: chapter sources, lib's generated prose, frozen notebooks."""
    sources = {p.relative_to(ROOT).as_posix(): _notebook_texts(p) for p in sorted(CHAPTERS.glob("*.ipynb"))}
    sources |= {p.relative_to(ROOT).as_posix(): _python_strings(p.read_text())
                for p in sorted((ROOT / "lib").rglob("*.py")) if "render" not in p.parts}
    sources |= {p.relative_to(ROOT).as_posix(): _notebook_texts(p)
                for folder in _committed_freezes() for p in sorted(folder.glob("*.ipynb"))}
    math = {}
    for where, texts in sources.items():
        spans = [m.group(0) for text in texts for m in _MATH.finditer(text)]
        if spans:
            math[where] = spans
    return math


def test_math_renders_with_every_pandoc_and_typst():
    """No math of the book (chapters, lib's generated sentences, frozen outputs) holds a symbol in
    :data:`TYPST_RENAMED` (pandoc's plain-text writer spells out TeX commands such as ``\\otimes``), and
    all of it, written by this environment's pandoc, compiles with its Typst without a warning."""
    import typst

    from lib.render.pandoc import pandoc

    math = _book_math()
    assert sum(map(len, math.values())) > 100, "the book's math was not found"
    spans = [(where, span) for where, found in math.items() for span in dict.fromkeys(found)]
    document = "\n\n".join(f"M{i} {span}" for i, (_, span) in enumerate(spans))
    plain, _ = pandoc(document, ["-f", "markdown", "-t", "plain", "--wrap=none"])
    bad = []
    for para in plain.split("\n\n"):
        m = re.match(r"M(\d+) ", para)
        if m and TYPST_RENAMED & set(para):
            where, span = spans[int(m.group(1))]
            bad.append(f"{where}: {span} ({''.join(sorted(TYPST_RENAMED & set(para)))})")
    assert bad == [], "math symbols that a Typst of another version cannot read"
    source, _ = pandoc(document, ["-f", "markdown", "-t", "typst", "--wrap=none"])
    with tempfile.TemporaryDirectory() as tmp:
        typ = Path(tmp) / "math.typ"
        typ.write_text(source)
        _, warnings = typst.compile_with_warnings(str(typ), format="svg")
    assert [str(w) for w in warnings] == []


def test_summary_is_unnumbered_as_quarto_numbers_chapters():
    """Quarto numbers the chapters it takes for numbered (:func:`lib.render.book.quarto_numbered`);
    the Summary (index) must not be one of them, so that Introduction is chapter 1 in Quarto's HTML
    and PDF and in lib.render's, and every other chapter must be."""
    from lib.render.book import quarto_numbered

    folders = [CHAPTERS, *_committed_freezes()]
    for folder in folders:
        for path in sorted(folder.glob("*.ipynb")):
            numbered = quarto_numbered(nbformat.read(path, as_version=4))
            assert numbered == (path.stem != "index"), path.relative_to(ROOT)


def test_pdf_citations_go_through_pandoc_citeproc_as_the_html_ones():
    """Quarto leaves a Typst PDF's citations to Typst's own engine unless ``citeproc: true``: its
    suffixes of same-author-and-year papers then differ from the HTML's, and it mangles entries."""
    import yaml

    cfg = yaml.safe_load((ROOT / "_quarto.yml").read_text())
    typst_format = cfg["format"]["typst"]
    assert typst_format.get("citeproc") is True
    assert typst_format.get("reference-section-title")  # pandoc's bibliography under its own heading


def _header_rows(table_html: str) -> list[list[str]]:
    head = re.search(r"<thead>(.*?)</thead>", table_html, re.S)
    rows = re.findall(r"<tr[^>]*>(.*?)</tr>", head.group(1), re.S) if head else []
    return [[re.sub(r"<[^>]+>", "", c).strip() for c in re.findall(r"<th[^>]*>(.*?)</th>", r, re.S)] for r in rows]


def stray_index_rows(path: Path) -> list[str]:
    """Tables of a notebook's outputs with pandas' index-name header row: a header row after the
    first whose cells are empty over every data column (HTML), or a first body row of that form
    (a pipe table written from such a frame)."""
    bad = []
    for k, cell in enumerate(nbformat.read(path, as_version=4).cells):
        for out in cell.get("outputs", []):
            data = out.get("data", {})
            html = "".join(data.get("text/html", []))
            for table in re.findall(r"<table.*?</table>", html, re.S):
                for row in _header_rows(table)[1:]:
                    filled = [bool(c) for c in row]
                    if any(filled) and not all(filled) and filled == sorted(filled, reverse=True):
                        bad.append(f"{path.name} cell {k}: header row {row}")
            md = "".join(data.get("text/markdown", []))
            for body in re.findall(r"^\|[-:| ]+\|\n(\|.*\|)$", md, re.M):
                cells = [c.strip() for c in body.strip("|").split("|")]
                if cells[0] and len(cells) > 1 and not any(cells[1:]):
                    bad.append(f"{path.name} cell {k}: first row {cells}")
    return bad


def test_frozen_tables_have_no_index_name_row():
    """Every displayed table goes through :func:`lib.report.book_table`: Quarto's Typst PDF shows
    pandas' index-name header row as an empty table row."""
    folders = _committed_freezes()
    assert folders, "no frozen profile"
    bad = [b for folder in folders for p in sorted(folder.glob("*.ipynb")) for b in stray_index_rows(p)]
    assert bad == []


def test_injected_parameters_cell_is_left_out_of_the_book():
    """papermill's injected cell (the whole params dict) carries ``remove-cell``, which Quarto and
    lib.render honour: without it the Summary page shows a "Code" block with the params."""
    folders = _committed_freezes()
    for folder in folders:
        for path in sorted(folder.glob("*.ipynb")):
            tags = [c.metadata.get("tags", []) for c in nbformat.read(path, as_version=4).cells]
            injected = [t for t in tags if "injected-parameters" in t]
            assert injected and all("remove-cell" in t for t in injected), path.relative_to(ROOT)
