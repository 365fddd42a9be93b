"""The import closure and code hashes of lib.codehash, on a hand-built package and on a copy of lib/."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from lib.codehash import code_sha256, imported_modules, module_closure, module_file, module_hashes, notebook_modules
from lib.paths import CHAPTERS, ROOT


def _write(root: Path, files: dict[str, str]) -> None:
    for rel, text in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)


@pytest.fixture
def tree(tmp_path):
    """lib.a → lib.b (top level) → lib.c (inside a function, relative); lib.sub.e → lib.sub (package)
    and lib.d; lib.d imports nothing from lib; numpy/torch imports are ignored."""
    _write(tmp_path, {
        "lib/__init__.py": "",
        "lib/a.py": "import numpy\nfrom lib.b import thing\n",
        "lib/b.py": "thing = 1\n\ndef f():\n    from . import c\n    return c\n",
        "lib/c.py": "import torch\n",
        "lib/d.py": "x = 2\n",
        "lib/sub/__init__.py": "from lib.sub.e import y\n",
        "lib/sub/e.py": "from .. import d\ny = d.x\n",
    })
    return tmp_path


def test_closure_follows_direct_deferred_and_relative_imports_by_hand(tree):
    assert imported_modules("lib.a", tree) == {"lib", "lib.b"}
    assert imported_modules("lib.b", tree) == {"lib", "lib.c"}
    assert module_closure(["lib.a"], tree) == ("lib", "lib.a", "lib.b", "lib.c")
    # importing lib.sub.e runs the package lib.sub, which imports e again; e imports lib.d relatively
    assert module_closure(["lib.sub.e"], tree) == ("lib", "lib.d", "lib.sub", "lib.sub.e")
    assert module_file("lib.sub", tree) == tree / "lib/sub/__init__.py"


def test_an_edit_changes_exactly_the_hashes_that_reach_it(tree):
    before = {m: code_sha256([m], tree) for m in ("lib.a", "lib.b", "lib.c", "lib.d", "lib.sub.e")}
    (tree / "lib/c.py").write_text("import torch\nz = 3\n")
    after = {m: code_sha256([m], tree) for m in before}
    assert [m for m in before if before[m] != after[m]] == ["lib.a", "lib.b", "lib.c"]
    assert module_hashes(["lib.a"], tree).keys() == {"lib", "lib.a", "lib.b", "lib.c"}


def test_unknown_or_foreign_modules_are_named(tree):
    with pytest.raises(ValueError, match="lib.nope"):
        module_file("lib.nope", tree)
    with pytest.raises(ValueError, match="not part of the 'lib' package"):
        module_file("numpy", tree)


def test_notebook_modules_reads_the_code_cells_only(tree, tmp_path):
    nb = {"cells": [
        {"cell_type": "markdown", "source": "from lib.c import nothing"},
        {"cell_type": "code", "source": ["import lib.d\n", "from lib.sub.e import y\n", "import json\n"]},
        {"cell_type": "code", "source": "from lib.b import thing, f"},
    ]}
    path = tmp_path / "nb.ipynb"
    path.write_text(json.dumps(nb))
    assert notebook_modules(path, tree) == ("lib.b", "lib.d", "lib.sub.e")
    nb["cells"].append({"cell_type": "code", "source": "def broken(:"})
    path.write_text(json.dumps(nb))
    with pytest.raises(ValueError, match="code cell 3 is not valid Python"):
        notebook_modules(path, tree)


@pytest.fixture(scope="module")
def lib_copy(tmp_path_factory):
    root = tmp_path_factory.mktemp("copy")
    shutil.copytree(ROOT / "lib", root / "lib", ignore=shutil.ignore_patterns("__pycache__"))
    return root


def test_on_the_real_library_a_shift_fix_leaves_training_and_the_setup_chapter_alone(lib_copy):
    """The issue's example: editing the shift code must not re-key the training stage (lib.pipeline)
    nor make the setup chapter stale, but must re-key the shift stages."""
    setup = notebook_modules(CHAPTERS / "02-setup.ipynb", lib_copy)
    before = {"pipeline": code_sha256(["lib.pipeline"], lib_copy), "shift_study": code_sha256(["lib.shift_study"], lib_copy),
              "setup": module_hashes(setup, lib_copy)}
    with (lib_copy / "lib/shift.py").open("a") as f:
        f.write("\n# edited\n")
    assert code_sha256(["lib.pipeline"], lib_copy) == before["pipeline"]
    assert module_hashes(setup, lib_copy) == before["setup"]
    assert code_sha256(["lib.shift_study"], lib_copy) != before["shift_study"]
