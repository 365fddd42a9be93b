"""The offline renderer on a tiny executed book: figures, tables, cross-refs, citations, PDF."""

from __future__ import annotations

import base64
import io
import re
from pathlib import Path

import nbformat
import pytest

from lib.render import RenderError, render_book
from lib.render.convert import attach_table_caption, cell_options, mark_refs, parse_attrs, resolve_refs
from lib.render.convert import Label
from lib.render.tables import apply_colwidths, html_table_to_pipe

QUARTO = """\
project: {type: book, output-dir: _book}
book-profile: t
book:
  title: "A Tiny Book: Tests"
  author: "Tester"
  chapters:
    - index.ipynb
    - book/01-intro.ipynb
    - book/02-results.ipynb
bibliography: references.bib
format:
  html: {code-fold: true}
  typst: {echo: false}
"""

BIB = """\
@inproceedings{guo2017calibration,
  title = {On Calibration of Modern Neural Networks},
  author = {Guo, Chuan and Pleiss, Geoff and Sun, Yu and Weinberger, Kilian Q.},
  booktitle = {International Conference on Machine Learning (ICML)},
  year = {2017}
}
"""


def _png() -> str:
    import matplotlib

    matplotlib.use("agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(2, 1.5))
    ax.plot([0, 1], [0, 1])
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=40)
    plt.close(fig)
    return base64.b64encode(buf.getvalue()).decode()


def _code(source: str, outputs: list) -> nbformat.NotebookNode:
    cell = nbformat.v4.new_code_cell(source)
    cell.outputs = outputs
    return cell


def _removed_cell(new_out) -> nbformat.NotebookNode:
    cell = _code('profile = "removed_profile"', [new_out("stream", name="stdout", text="removed output\n")])
    cell.metadata["tags"] = ["parameters", "remove-cell"]
    return cell


def _write_book(root: Path) -> None:
    (root / "_quarto.yml").write_text(QUARTO)
    (root / "references.bib").write_text(BIB)
    frozen = root / "_freeze" / "t"
    frozen.mkdir(parents=True)
    md, new_out = nbformat.v4.new_markdown_cell, nbformat.v4.new_output
    table_html = (
        '<div><style scoped>th {color: red}</style><table border="1" class="dataframe">'
        "<thead><tr><th></th><th>ece</th></tr><tr><th>block</th><th></th></tr></thead>"
        "<tbody><tr><th>0</th><td>0.031</td></tr><tr><th>1</th><td>0.012</td></tr></tbody></table></div>"
    )
    chapters = {
        "index": [md("<!-- not the first line: Quarto would make it the title, numbered -->\n\n"
                     "# Preface {.unnumbered}\n\nSee @fig-rel and @sec-method.")],
        "01-intro": [
            md("# Introduction {#sec-intro}\n\n## Method {#sec-method}\n\nMiscalibration [@guo2017calibration]; "
               "@fig-rel shows it and @tbl-ece lists it.\n\n::: {.callout-note}\nA note.\n:::\n\n"
               "$$\na = b\n$$ {#eq-ab}"),
            _code('#| label: fig-rel\n#| fig-cap: "A reliability diagram."\nplot()',
                  [new_out("display_data", data={"image/png": _png(), "text/plain": "<Figure>"})]),
            _code('#| label: tbl-ece\n#| tbl-cap: "ECE per block."\ndf',
                  [new_out("execute_result", data={"text/html": table_html, "text/plain": "df"},
                           execution_count=1)]),
            _code("#| echo: false\nsecret_code()", [new_out("stream", name="stdout", text="visible output\n")]),
            _removed_cell(new_out),
        ],
        "02-results": [
            md("# Results\n\nBack to @fig-rel, @sec-intro and [-@eq-ab]."),
            _code("from IPython.display import Markdown",
                  [new_out("display_data", data={"text/markdown": "Markdown **output** citing @tbl-ece."})]),
        ],
    }
    for name, cells in chapters.items():
        nb = nbformat.v4.new_notebook()
        nb.cells = cells
        nbformat.write(nb, frozen / f"{name}.ipynb")


@pytest.fixture(scope="module")
def rendered(tmp_path_factory):
    root = tmp_path_factory.mktemp("book")
    _write_book(root)
    result = render_book(root, profile="t")
    return root, result


def test_html_pages_crossrefs_figures_tables_citations(rendered):
    root, result = rendered
    out = root / "_book"
    assert result.index == out / "index.html" and result.index.is_file()
    intro = (out / "01-intro.html").read_text()
    text = re.sub(r"<[^>]+>", "", intro)
    assert "Figure 1.1" in text and "Table 1.1" in text
    assert "Figure 1.1: A reliability diagram." in text and "Table 1.1: ECE per block." in text
    assert '<a href="#fig-rel">Figure 1.1</a>' in intro
    imgs = re.findall(r'<img src="([^"]+)"', intro)
    assert imgs and all((out / src).is_file() for src in imgs)
    assert "1.1" in text and "Method" in text  # numbered section
    assert "Guo et al. 2017" in text and "On Calibration of Modern Neural Networks" in text
    assert "secret_code" not in intro and "visible output" in intro
    assert "removed_profile" not in intro and "removed output" not in intro  # tag remove-cell
    assert "<details" in intro and "plot()" in intro  # code folded, not dropped
    assert '<td style="text-align: right;">0.031</td>' in intro
    assert "| block |" not in intro and "<th" in intro and "block" in text
    assert "(1.1)" in text  # equation number
    assert 'class="callout' in intro
    results = (out / "02-results.html").read_text()
    assert '<a href="01-intro.html#fig-rel">Figure 1.1</a>' in results
    assert '<a href="01-intro.html">Chapter 1</a>' in results
    assert '<a href="01-intro.html#eq-ab">(1.1)</a>' in results
    assert "<strong>output</strong>" in results and "01-intro.html#tbl-ece" in results
    index = (out / "index.html").read_text()
    assert "A Tiny Book: Tests" in index and "01-intro.html#sec-method" in index
    for page in ("index.html", "01-intro.html", "02-results.html", "references.html"):
        html = (out / page).read_text()
        assert 'class="sidebar"' in html and all(p in html for p in ("01-intro.html", "02-results.html"))
        assert "http://" not in html.replace("http://www.w3.org", "") and "cdn" not in html.lower()
    refs = (out / "references.html").read_text()
    assert "On Calibration of Modern Neural Networks" in refs
    assert not result.warnings, result.warnings


def test_pdf_is_written(rendered):
    root, result = rendered
    assert result.pdf == root / "_book" / "a-tiny-book-tests.pdf"
    assert result.pdf.read_bytes()[:4] == b"%PDF"
    typ = (root / "_render" / "book.typ").read_text()
    assert "Figure 1.1: A reliability diagram." in typ and "#link(<fig-rel>)[Figure 1.1]" in typ
    assert "secret_code" not in typ and "plot()" not in typ  # format.pdf.echo: false
    assert "On Calibration of Modern Neural Networks" in typ


def test_missing_notebook_is_an_error(tmp_path):
    _write_book(tmp_path)
    (tmp_path / "_freeze" / "t" / "02-results.ipynb").unlink()
    with pytest.raises(RenderError, match=r"02-results.*make run PROFILE=t"):
        render_book(tmp_path, profile="t", pdf=False)


def test_unresolved_reference_is_reported(tmp_path):
    _write_book(tmp_path)
    nb = nbformat.v4.new_notebook()
    nb.cells = [nbformat.v4.new_markdown_cell("# Results\n\nSee @fig-nowhere.")]
    nbformat.write(nb, tmp_path / "_freeze" / "t" / "02-results.ipynb")
    result = render_book(tmp_path, profile="t", pdf=False)
    assert any("@fig-nowhere" in w for w in result.warnings)
    assert "?@fig-nowhere" in (tmp_path / "_book" / "02-results.html").read_text()


def test_cell_options_and_attrs():
    opts, code = cell_options('#| label: fig-a\n#| fig-cap: "Cap: x"\n#| echo: false\nprint(1)')
    assert opts == {"label": "fig-a", "fig-cap": "Cap: x", "echo": False} and code == "print(1)"
    assert parse_attrs('#sec-a .unnumbered title="T x"') == ("sec-a", ["unnumbered"], {"title": "T x"})
    assert parse_attrs("-") == (None, ["unnumbered"], {})


def test_refs_resolution_forms():
    labels = {"fig-a": Label("fig-a", "fig", "2.3", "", "c"), "sec-b": Label("sec-b", "sec", "", "Intro", "c")}
    warnings: list[str] = []
    md = mark_refs("@fig-a, [@fig-a; @sec-b], [-@fig-a], mail a@fig-a.org, @guo2017. @fig-z")
    out = resolve_refs(md, labels, lambda lb: f"#{lb.id}", warnings, "c")
    assert out.startswith("[Figure 2.3](#fig-a), [Figure 2.3](#fig-a) and [Intro](#sec-b), [2.3](#fig-a)")
    assert "a@fig-a.org" in out and "@guo2017." in out and "**?\\@fig-z**" in out
    assert warnings == ["c: unresolved cross-reference @fig-z"]


def test_table_conversion_and_caption():
    html = ("<table><thead><tr><th></th><th colspan='2'>ece</th></tr><tr><th>b</th><th>map</th><th>la</th>"
            "</tr></thead><tbody><tr><th rowspan='2'>0</th><td>1</td><td>x|y</td></tr><tr><td>2</td><td>3</td>"
            "</tr></tbody></table>")
    table = html_table_to_pipe(html)
    assert table.splitlines() == [
        "| b | ece map | ece la |", "|--:|--:|:--|", "| 0 | 1 | x\\|y |", "|  | 2 | 3 |",
    ]
    assert html_table_to_pipe("<p>no table</p>") is None
    md = attach_table_caption("intro\n\n" + table + "\n\nafter", ": cap {#tbl-x}")
    assert md.split("\n")[2:8] == table.splitlines() + ["", ": cap {#tbl-x}"]


def test_colwidths_set_the_separator_dashes():
    table = "| a | b | c |\n|:--|--:|:--|\n| 1 | 2 | 3 |"
    out = apply_colwidths(table, [20, 30, 50]).splitlines()
    assert out[0] == "| a | b | c |" and out[2] == "| 1 | 2 | 3 |"
    cells = out[1].strip("|").split("|")
    assert [len(c) for c in cells] == [20, 30, 50]
    assert cells[0].startswith(":") and cells[1].endswith(":") and not cells[1].startswith(":")
    with pytest.raises(ValueError, match="2 widths for a table of 3 columns"):
        apply_colwidths(table, [1, 2])


def test_tbl_colwidths_option_reaches_the_pdf_table(tmp_path):
    _write_book(tmp_path)
    nb_path = tmp_path / "_freeze" / "t" / "01-intro.ipynb"
    nb = nbformat.read(nb_path, as_version=4)
    cell = next(c for c in nb.cells if "label: tbl-ece" in c.source)
    cell.source = cell.source.replace("#| label: tbl-ece", "#| label: tbl-ece\n#| tbl-colwidths: [30, 70]")
    nbformat.write(nb, nb_path)
    from lib.render.book import Book

    docs = Book.load(tmp_path, "t").convert("pdf", tmp_path / "_render" / "figures", "figures")
    assert "|" + "-" * 29 + ":|" + "-" * 69 + ":|" in docs[1].markdown


def test_output_file_names_the_pdf(tmp_path):
    _write_book(tmp_path)
    quarto = tmp_path / "_quarto.yml"
    quarto.write_text(quarto.read_text().replace("book:\n", "book:\n  output-file: tiny\n"))
    from lib.render.book import Book

    assert Book.load(tmp_path, "t").slug() == "tiny"


def test_repository_quarto_config_builds_the_pdf_with_typst():
    """``quarto render`` must not need TeX: the PDF format is Typst, named by ``book.output-file``,
    code hidden; the offline renderer reads the same keys. Quarto's own files stay out of git."""
    import yaml

    from lib.paths import ROOT
    from lib.render.book import Book

    cfg = yaml.safe_load((ROOT / "_quarto.yml").read_text())
    formats = cfg["format"]
    assert "pdf" not in formats and "latex" not in formats and "beamer" not in formats
    assert formats["typst"]["echo"] is False and formats["typst"]["toc"] and formats["typst"]["number-sections"]
    assert cfg["book"]["output-file"]
    book = Book(root=ROOT, title=cfg["book"]["title"], author="", bibliography=None, entries=[],
                output_file=cfg["book"]["output-file"])
    assert book.slug() == cfg["book"]["output-file"]
    ignored = (ROOT / ".gitignore").read_text().splitlines()
    assert {"/.quarto/", "**/*.quarto_ipynb", "/_freeze/site_libs/"} <= set(ignored)


TWIN_BIB = """
@article{smith2021first,
  title = {First Twin Paper}, author = {Smith, Ann and Jones, Bob and Lee, Cy}, journal = {J}, year = {2021}
}
@article{smith2021second,
  title = {Second Twin Paper}, author = {Smith, Ann and Brown, Dee and Khan, Eve}, journal = {J}, year = {2021}
}
"""


def test_papers_of_one_author_and_year_get_the_same_suffix_on_every_page(tmp_path):
    """With the book's CSL and ``nocite`` of both papers, each page tells them apart by 2021a/2021b
    the same way, although each page cites only one of them, and lists only what it cites."""
    import shutil

    from lib.paths import ROOT

    _write_book(tmp_path)
    shutil.copy(ROOT / "chicago-author-date-year-suffix.csl", tmp_path / "style.csl")
    (tmp_path / "references.bib").write_text(BIB + TWIN_BIB)
    quarto = tmp_path / "_quarto.yml"
    quarto.write_text(quarto.read_text() + "csl: style.csl\nnocite: |\n  @smith2021first, @smith2021second\n")
    frozen = tmp_path / "_freeze" / "t"
    for name, key in (("01-intro", "smith2021first"), ("02-results", "smith2021second")):
        nb = nbformat.read(frozen / f"{name}.ipynb", as_version=4)
        nb.cells.append(nbformat.v4.new_markdown_cell(f"As shown [@{key}]."))
        nbformat.write(nb, frozen / f"{name}.ipynb")
    render_book(tmp_path, profile="t", pdf=False)
    intro = re.sub(r"<[^>]+>", "", (tmp_path / "_book" / "01-intro.html").read_text())
    results = re.sub(r"<[^>]+>", "", (tmp_path / "_book" / "02-results.html").read_text())
    # suffixes follow the bibliography's order (Smith, Brown … before Smith, Jones …) on every page
    assert "As shown (Smith et al. 2021b)." in intro and "Lee. 2021b. “First Twin Paper." in intro
    assert "As shown (Smith et al. 2021a)." in results and "Khan. 2021a. “Second Twin Paper." in results
    assert "Second Twin Paper" not in intro and "First Twin Paper" not in results  # each page lists what it cites
    refs = re.sub(r"<[^>]+>", "", (tmp_path / "_book" / "references.html").read_text())
    assert "2021a. “Second Twin Paper." in refs and "2021b. “First Twin Paper." in refs


def test_every_same_author_and_year_group_of_the_bibliography_is_in_nocite():
    """The repository's ``nocite`` (which makes the suffixes the same on every page) holds exactly the
    references.bib entries cited in the book (``@key`` in a chapter or in lib's generated text) that
    share first author surname and year with another cited entry (more would be listed uncited)."""
    import yaml

    from lib.paths import ROOT
    from lib.render.book import Book

    bib = (ROOT / "references.bib").read_text()
    groups: dict[tuple[str, str], list[str]] = {}
    for key, body in re.findall(r"@\w+\s*\{\s*([^,\s]+)\s*,(.*?)\n\}", bib, flags=re.S):
        author = re.search(r"author\s*=\s*\{([^,}]+)", body)
        year = re.search(r"year\s*=\s*\{?(\d{4})", body)
        if author and year:
            groups.setdefault((author.group(1).strip().lower(), year.group(1)), []).append(key)
    sources = [p.read_text() for p in sorted((ROOT / "chapters").glob("*.ipynb"))]
    sources += [p.read_text() for p in sorted((ROOT / "lib").rglob("*.py"))]
    cited = {k for text in sources for k in re.findall(r"@([\w]+)", text)}
    groups = {g: [k for k in keys if k in cited] for g, keys in groups.items()}
    twins = {k for keys in groups.values() if len(keys) > 1 for k in keys}
    assert {"daxberger2021laplace", "daxberger2021bayesian"} <= twins
    cfg = yaml.safe_load((ROOT / "_quarto.yml").read_text())
    nocite = set(re.findall(r"@([\w:.-]+)", str(cfg["nocite"])))
    assert nocite == twins, f"nocite in _quarto.yml: add {sorted(twins - nocite)}, remove {sorted(nocite - twins)}"
    assert (ROOT / cfg["csl"]).is_file()
    assert 'disambiguate-add-year-suffix="true"' in (ROOT / cfg["csl"]).read_text()
    assert Book.load(ROOT).csl == ROOT / cfg["csl"]


def _nb(*cells) -> nbformat.NotebookNode:
    nb = nbformat.v4.new_notebook()
    nb.cells = list(cells)
    return nb


def test_chapters_are_numbered_by_quartos_rule():
    """Quarto 1.10 (fixupFrontMatter, then isNumberedChapter) numbers a notebook whose first markdown
    line is its heading even with ``{.unnumbered}``: that heading becomes the title and loses its
    classes. A heading after other content, or a front-matter title in heading form, keeps them."""
    from lib.render.book import quarto_numbered

    md, raw = nbformat.v4.new_markdown_cell, nbformat.v4.new_raw_cell
    assert quarto_numbered(_nb(md("# Summary {.unnumbered}\n\nText.")))
    assert quarto_numbered(_nb(md("Summary {.unnumbered}\n===\n\nText.")))
    assert not quarto_numbered(_nb(md("<!-- first -->\n\n# Summary {.unnumbered}\n\nText.")))
    assert not quarto_numbered(_nb(md("<!-- first -->\n\n# Summary {-}")))
    assert not quarto_numbered(_nb(md("Text first."), md("# Summary {.unnumbered}")))
    assert quarto_numbered(_nb(md("<!-- first -->\n\n# Introduction")))
    assert quarto_numbered(_nb(md("<!-- c -->\n\n```\n# not a heading {.unnumbered}\n```\n\n# Intro")))
    assert quarto_numbered(_nb(raw("---\ntitle: Summary\n---"), md("# Summary {.unnumbered}")))
    assert quarto_numbered(_nb(raw("---\ntitle: Summary {.unnumbered}\n---"), md("Text.")))
    assert not quarto_numbered(_nb(raw('---\ntitle: "# Summary {.unnumbered}"\n---'), md("Text.")))
    assert quarto_numbered(_nb(raw("---\nauthor: A\n---"), md("# Summary {.unnumbered}")))
    assert quarto_numbered(_nb(nbformat.v4.new_code_cell("x = 1")))


def test_render_modules_import_without_circles_or_deferred_imports():
    """lib.render's model (book.py) imports none of its writers; the writers and the top-level build
    import the model: no import circle, and every import of lib sits at the top of its module."""
    import ast

    from lib.paths import ROOT

    graph, deferred = {}, []
    for path in sorted((ROOT / "lib" / "render").glob("*.py")):
        tree = ast.parse(path.read_text())
        top = {id(node) for node in tree.body}
        graph[path.stem] = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("lib."):
                if id(node) not in top:
                    deferred.append(f"{path.name}:{node.lineno}")
                if node.module.startswith("lib.render."):
                    graph[path.stem].add(node.module.split(".")[2])
            elif isinstance(node, ast.Import) and id(node) not in top:
                deferred += [f"{path.name}:{node.lineno}" for a in node.names if a.name.startswith("lib")]
    assert deferred == []
    assert graph["book"] & {"html", "pdf", "build"} == set()
    done: set[str] = set()

    def visit(module: str, stack: tuple[str, ...]) -> None:
        assert module not in stack, f"import circle: {' → '.join((*stack, module))}"
        if module not in done:
            for dep in graph.get(module, ()):
                visit(dep, (*stack, module))
            done.add(module)

    for module in graph:
        visit(module, ())
