"""The chapter runner on a temporary book of two tiny notebooks (real papermill kernels)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import nbformat
import pytest
import yaml

from lib.provenance import notebook_sha256, params_sha256
from lib.config import apply_overrides, load_params, parse_override
from lib.paths import CHAPTERS, PARAMS
from lib.runner import (Layout, RunnerError, book_chapters, execution_order, is_scratch, link, main, override_slug,
                        run, run_name)

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
    params.metadata["tags"] = ["parameters", "remove-cell"]  # as in chapters/: Quarto drops it
    nb.cells = [nbformat.v4.new_markdown_cell("# Title"), params, *cells]
    return nb


def _yaml_loader(path: Path, overrides=()) -> dict:
    if not path.is_file():
        raise RunnerError(f"{path}: params file not found")
    return apply_overrides(yaml.safe_load(path.read_text()), overrides, str(path))


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
        for key in ("lib_modules", "git_sha", "git_dirty", "device", "torch", "timm", "peft",
                    "started_at", "wall_time_s"):
            assert key in rec
        nb = nbformat.read(out, as_version=4)
        last = nb.cells[-1]
        assert last.cell_type == "markdown" and last.metadata["tags"] == ["provenance"]
        assert "Provenance" in last.source and "`tiny`" in last.source
        assert rec["params_sha256"][:16] in last.source and "3, 4" in last.source
        injected = [c for c in nb.cells if "injected-parameters" in c.metadata.get("tags", [])]
        assert injected and all("remove-cell" in c.metadata["tags"] for c in injected)  # the params stay out of the book
        assert [c.metadata.get("tags", []) for c in nb.cells[:3]] == [[], ["parameters", "remove-cell"],
                                                                     ["injected-parameters", "remove-cell"]]
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


def test_overrides_run_into_a_scratch_folder_and_are_recorded(book):
    overrides = [parse_override("laplace.prior=2.5"), parse_override("seeds=[7]")]
    name = run_name("tiny", overrides)
    assert name.startswith("tiny+laplace.prior-2.5+seeds-7+") and is_scratch(name)
    records = run("tiny", layout=book, loader=_yaml_loader, overrides=overrides)
    assert not (book.freeze / "tiny").exists()  # never over the profile's own folder
    for rec in records:
        assert rec["profile"] == name and rec["overrides"] == {"laplace.prior": 2.5, "seeds": [7]}
        assert rec["params"]["laplace"]["prior"] == 2.5 and rec["seeds"] == [7]
        assert rec["params_sha256"] == params_sha256(rec["params"])
        assert (book.freeze / name / f"{rec['chapter']}.json").is_file()
    nb = nbformat.read(book.freeze / name / "01-alpha.ipynb", as_version=4)
    text = "".join(o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.outputs)
    assert f"alpha {name} 2.5" in text  # the chapter sees the run's name and the overridden value
    assert "`laplace.prior=2.5`, `seeds=[7]`" in nb.cells[-1].source


def test_override_slug_is_readable_and_distinguishes_overrides():
    a = override_slug([("stats.n_bins", 20), ("seeds", [0, 1])])
    assert a.startswith("stats.n_bins-20+seeds-0-1+") and len(a.rsplit("+", 1)[1]) == 8
    assert all(ch.isalnum() or ch in "._+-" for ch in a)
    assert override_slug([("seeds", "0-1")]) != override_slug([("seeds", [0, 1])])  # same readable part
    assert override_slug([("a", 1), ("a", 2)]) == override_slug([("a", 2)])  # the last value wins
    assert run_name("smoke") == "smoke" and not is_scratch("smoke")


def test_override_errors_name_the_key_like_the_file(book, capsys):
    with pytest.raises(ValueError, match="KEY=VALUE"):
        parse_override("stats.n_bins")
    with pytest.raises(ValueError, match="KEY=VALUE"):
        parse_override("stats n_bins=3")
    with pytest.raises(RunnerError, match=r"smoke\.yml with --set stats\.n_binz=20: unknown key 'stats\.n_binz'; "
                                          r"did you mean 'stats\.n_bins'\?"):
        run("smoke", layout=Layout.from_root(PARAMS.parent), overrides=[("stats.n_binz", 20)])
    with pytest.raises(RunnerError, match=r"'stats\.n_bins' must be int, got 'many'"):
        run("smoke", layout=Layout.from_root(PARAMS.parent), overrides=[("stats.n_bins", "many")])
    assert main(["run", "--profile", "smoke", "--set", "stats.n_bins"]) == 1
    assert "KEY=VALUE" in capsys.readouterr().err
    with pytest.raises(RunnerError, match="reserved"):
        run("smoke+x", layout=book, loader=_yaml_loader)


def test_chapter_parameters_cells_are_removed_from_the_book_but_found_by_papermill():
    from papermill.iorw import load_notebook_node
    from papermill.parameterize import parameterize_notebook

    for src in sorted(CHAPTERS.glob("*.ipynb")):
        nb = load_notebook_node(str(src))
        tagged = [c for c in nb.cells if "parameters" in c.metadata.get("tags", [])]
        assert len(tagged) == 1 and "remove-cell" in tagged[0].metadata["tags"], src.name
        out = parameterize_notebook(nb, {"profile": "p", "params": {}})
        i = [k for k, c in enumerate(out.cells) if "injected-parameters" in c.metadata.get("tags", [])]
        assert i and "parameters" in out.cells[i[0] - 1].metadata["tags"], src.name  # injected right after it
