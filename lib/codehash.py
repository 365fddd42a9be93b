"""Which library source a result depends on: a module and the ``lib`` modules it imports, transitively.

A cached stage (:func:`lib.artifacts.cached`) keys its directory by the hash of the source of the
module that computes it and of every ``lib`` module that module imports, directly or through
others (:func:`code_sha256`); a frozen chapter records the same closure for the modules its code
cells import (:func:`notebook_modules`, :func:`module_hashes`). A fix to one module therefore
recomputes exactly the stages, and makes stale exactly the chapters, whose code can reach it.

Imports are read from the source with :mod:`ast` (every ``import``/``from … import`` statement
anywhere in the module, including inside functions), not by importing it, so the closure is the
same whatever has been imported in this process. ``from lib.a import b`` depends on ``lib.a.b``
when that is a module and on ``lib.a`` otherwise; importing ``lib.a.b`` also runs every package
``__init__`` on its way (``lib``, ``lib.a``), so those are part of the closure.
"""

from __future__ import annotations

import ast
import hashlib
import json
from collections.abc import Iterable, Mapping
from functools import lru_cache
from pathlib import Path

from lib.paths import ROOT

PACKAGE = "lib"


def module_file(name: str, root: Path = ROOT) -> Path:
    """The source file of ``lib`` module ``name`` (``lib/a/b.py`` or ``lib/a/b/__init__.py``)."""
    parts = name.split(".")
    if parts[0] != PACKAGE:
        raise ValueError(f"module {name!r} is not part of the '{PACKAGE}' package; pass a name like 'lib.stats'")
    base = root.joinpath(*parts)
    for path in (base.with_suffix(".py"), base / "__init__.py"):
        if path.is_file():
            return path
    raise ValueError(f"module {name!r} has no source file under {root} ({base}.py or {base}/__init__.py); "
                     "check the module name")


def _is_module(name: str, root: Path) -> bool:
    base = root.joinpath(*name.split("."))
    return base.with_suffix(".py").is_file() or (base / "__init__.py").is_file()


@lru_cache(maxsize=None)
def _parsed_imports(path: Path, mtime_ns: int, size: int, name: str, is_package: bool, root: Path) -> frozenset[str]:
    tree = ast.parse(path.read_bytes(), filename=str(path))
    package = name if is_package else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                base = ".".join(anchor + ([node.module] if node.module else []))
            else:
                base = node.module or ""
            found.add(base)
            found.update(f"{base}.{a.name}" for a in node.names if a.name != "*")
    out: set[str] = set()
    for mod in found:
        if mod != PACKAGE and not mod.startswith(PACKAGE + "."):
            continue
        if _is_module(mod, root):
            parts = mod.split(".")
            out.update(".".join(parts[:i]) for i in range(1, len(parts) + 1))
    return frozenset(out)


def imported_modules(name: str, root: Path = ROOT) -> frozenset[str]:
    """The ``lib`` modules (and their parent packages) that module ``name`` imports directly."""
    path = module_file(name, root)
    stat = path.stat()
    return _parsed_imports(path, stat.st_mtime_ns, stat.st_size, name, path.name == "__init__.py", root)


def module_closure(modules: Iterable[str], root: Path = ROOT) -> tuple[str, ...]:
    """Sorted names of ``modules`` and every ``lib`` module they import, transitively (parent
    packages included, since importing a submodule runs them)."""
    todo = list(modules)
    seen: set[str] = set()
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        parts = name.split(".")
        todo.extend(".".join(parts[:i]) for i in range(1, len(parts)))
        seen.add(name)
        todo.extend(imported_modules(name, root) - seen)
    return tuple(sorted(seen))


def module_hashes(modules: Iterable[str], root: Path = ROOT) -> dict[str, str]:
    """``{module: SHA-256 of its source file}`` for the closure of ``modules`` (sorted by name)."""
    return {m: hashlib.sha256(module_file(m, root).read_bytes()).hexdigest() for m in module_closure(modules, root)}


def combined_sha256(hashes: Mapping[str, str]) -> str:
    """One SHA-256 over ``{module: source hash}`` (as :func:`module_hashes` gives them)."""
    return hashlib.sha256(json.dumps(dict(hashes), sort_keys=True).encode()).hexdigest()


def code_sha256(modules: Iterable[str], root: Path = ROOT) -> str:
    """One SHA-256 over the names and source hashes of the closure of ``modules``."""
    return combined_sha256(module_hashes(modules, root))


def notebook_modules(path: Path, root: Path = ROOT) -> tuple[str, ...]:
    """The ``lib`` modules the code cells of notebook ``path`` import directly (sorted)."""
    nb = json.loads(Path(path).read_text(encoding="utf-8"))
    found: set[str] = set()
    for i, cell in enumerate(nb.get("cells", [])):
        if cell.get("cell_type") != "code":
            continue
        source = "".join(cell["source"]) if isinstance(cell["source"], list) else cell["source"]
        try:
            tree = ast.parse(source)
        except SyntaxError as err:
            raise ValueError(f"{path}: code cell {i} is not valid Python ({err.msg}, line {err.lineno}); fix the cell") from None
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and not node.level and node.module:
                names = [node.module] + [f"{node.module}.{a.name}" for a in node.names if a.name != "*"]
            else:
                continue
            found.update(n for n in names if (n == PACKAGE or n.startswith(PACKAGE + ".")) and _is_module(n, root))
    return tuple(sorted(found))
