"""The chapter runner on a temporary book of two tiny notebooks (real papermill kernels)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import nbformat
import pytest
import yaml

from lib.provenance import notebook_sha256, params_sha256
from lib.runner import Layout, RunnerError, book_chapters, execution_order, link, run

QUARTO = """\
project:
  type: book
book-profile: smoke
book:
  title: "T"
  chapters:
    - index.ipynb
    - book/01-alpha.ipynb
"""


def _notebook(*cells: nbformat.NotebookNode) -> nbformat.NotebookNode:
    nb = nbformat.v4.new_notebook()
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    params = nbformat.v4.new_code_cell('profile = "smoke"\nparams = {}')
    params.metadata["tags"] = ["parameters"]
    nb.cells = [nbformat.v4.new_markdown_cell("# Title"), params, *cells]
    return nb


def _yaml_loader(path: Path) -> dict:
    if not path.is_file():
        raise RunnerError(f"{path}: params file not found")
    return yaml.safe_load(path.read_text())


@pytest.fixture
def book(tmp_path: Path) -> Layout:
    layout = Layout.from_root(tmp_path)
    layout.chapters.mkdir()
    layout.params.mkdir()
    layout.quarto.write_text(QUARTO)
    (layout.params / "tiny.yml").write_text("seeds: [3, 4]\nlaplace: {prior: 1.5}\n")
    code = nbformat.v4.new_code_cell(
        "import os, pathlib\n"
        "print('alpha', profile, params['laplace']['prior'])\n"
        "pathlib.Path('order.txt').open('a').write('alpha\\n')\n"
        "print('cwd', os.getcwd())"
    )
    nbformat.write(_notebook(code), layout.chapters / "01-alpha.ipynb")
    idx = nbformat.v4.new_code_cell("import pathlib\npathlib.Path('order.txt').open('a').write('index\\n')")
    nbformat.write(_notebook(idx), layout.chapters / "index.ipynb")
    return layout


def test_chapter_list_and_order(book):
    assert book_chapters(book) == ["index", "01-alpha"]
    assert execution_order(["index", "a", "b"]) == ["a", "b", "index"]


def test_run_writes_outputs_records_and_provenance(book):
    records = run("tiny", layout=book, loader=_yaml_loader)
    assert [r["chapter"] for r in records] == ["01-alpha", "index"]
    assert (book.root / "order.txt").read_text() == "alpha\nindex\n"  # index executed last, cwd = root
    params = yaml.safe_load((book.params / "tiny.yml").read_text())
    for chapter in ("01-alpha", "index"):
        out = book.freeze / "tiny" / f"{chapter}.ipynb"
        rec = json.loads((book.freeze / "tiny" / f"{chapter}.json").read_text())
        assert rec["chapter"] == chapter and rec["profile"] == "tiny"
        assert rec["params"] == params
        assert rec["params_sha256"] == params_sha256(params)
        assert rec["source_sha256"] == notebook_sha256(book.chapters / f"{chapter}.ipynb")
        assert rec["seeds"] == [3, 4]
        assert rec["params_file"] == "params/tiny.yml"
        for key in ("lib_sha256", "git_sha", "git_dirty", "device", "torch", "timm", "peft",
                    "started_at", "wall_time_s"):
            assert key in rec
        nb = nbformat.read(out, as_version=4)
        last = nb.cells[-1]
        assert last.cell_type == "markdown" and last.metadata["tags"] == ["provenance"]
        assert "Provenance" in last.source and "`tiny`" in last.source
        assert rec["params_sha256"][:16] in last.source and "3, 4" in last.source
        assert any("injected-parameters" in c.metadata.get("tags", []) for c in nb.cells)
    nb = nbformat.read(book.freeze / "tiny" / "01-alpha.ipynb", as_version=4)
    text = "".join(o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.outputs)
    assert "alpha tiny 1.5" in text
    assert f"cwd {book.root}" in text
    # `run` never touches the book links
    assert not (book.root / "index.ipynb").exists() and not (book.root / "book").exists()


def test_source_hash_ignores_outputs_but_not_sources(book):
    src = book.chapters / "01-alpha.ipynb"
    before = notebook_sha256(src)
    nb = nbformat.read(src, as_version=4)
    nb.cells[2].outputs = [nbformat.v4.new_output("stream", text="noise")]
    nb.cells[2].execution_count = 7
    nb.metadata["extra"] = 1
    nbformat.write(nb, src)
    assert notebook_sha256(src) == before
    nb.cells[2].source += "\n# changed"
    nbformat.write(nb, src)
    assert notebook_sha256(src) != before


def test_single_chapter(book):
    records = run("tiny", chapter="index", layout=book, loader=_yaml_loader)
    assert [r["chapter"] for r in records] == ["index"]
    assert not (book.freeze / "tiny" / "01-alpha.json").exists()
    with pytest.raises(RunnerError, match="'02-nope' is not in _quarto.yml; choose one of index, 01-alpha"):
        run("tiny", chapter="02-nope", layout=book, loader=_yaml_loader)


def test_missing_chapter_is_an_error_before_anything_runs(book):
    (book.chapters / "index.ipynb").unlink()
    with pytest.raises(RunnerError, match=r"missing: chapters/index\.ipynb"):
        run("tiny", layout=book, loader=_yaml_loader)
    assert not (book.freeze / "tiny" / "01-alpha.json").exists()


def test_missing_params_file_uses_lib_config_message(book):
    with pytest.raises(RunnerError, match=r"nope\.yml: params file not found"):
        run("nope", layout=book)


def test_failing_chapter_names_chapter_and_cell(book):
    bad = nbformat.v4.new_code_cell("x = 1\nraise ValueError('boom in alpha')")
    nbformat.write(_notebook(bad), book.chapters / "01-alpha.ipynb")
    with pytest.raises(RunnerError) as err:
        run("tiny", layout=book, loader=_yaml_loader)
    msg = str(err.value)
    assert "chapter 01-alpha (profile tiny) failed in cell" in msg
    assert "cell 2 (`x = 1`) of chapters/01-alpha.ipynb" in msg and "ValueError: boom in alpha" in msg
    kept = book.failed / "tiny" / "01-alpha.ipynb"
    assert kept.is_file() and str(kept) in msg
    assert not (book.freeze / "tiny" / "01-alpha.ipynb").exists()
    assert not (book.freeze / "tiny" / "index.json").exists()  # the run stopped


def test_notebook_without_parameters_cell_is_rejected(book):
    nb = _notebook()
    nb.cells = nb.cells[:1]
    nbformat.write(nb, book.chapters / "01-alpha.ipynb")
    with pytest.raises(RunnerError, match="no cell tagged 'parameters'"):
        run("tiny", chapter="01-alpha", layout=book, loader=_yaml_loader)


def test_link_points_entries_into_freeze_and_records_profile(book):
    (book.freeze / "tiny").mkdir(parents=True)
    (book.freeze / "tiny" / "index.ipynb").write_text("{}")
    dangling = link("tiny", book)
    assert dangling == [book.root / "book" / "01-alpha.ipynb"]
    assert os.readlink(book.root / "index.ipynb") == "_freeze/tiny/index.ipynb"
    assert os.readlink(book.root / "book" / "01-alpha.ipynb") == "../_freeze/tiny/01-alpha.ipynb"
    assert "book-profile: tiny" in book.quarto.read_text()
    link(None, book)  # default: the recorded profile; idempotent
    assert os.readlink(book.root / "index.ipynb") == "_freeze/tiny/index.ipynb"
