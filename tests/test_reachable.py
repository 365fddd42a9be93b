"""No dead code in lib: every public top-level function and class of a lib module is named somewhere
that the book runs — another lib module, the same module beyond its definition, a chapter or a
benchmark — and not only in tests (code used only by tests becomes a test helper or goes).

A name counts as used when it occurs as a whole word in that text; this is a cheap approximation of
reachability (a name used only by another dead function passes), not a call graph.
"""

from __future__ import annotations

import ast
import re

import nbformat

from lib.paths import CHAPTERS, ROOT


def _sources() -> dict[str, str]:
    out = {str(p.relative_to(ROOT)): p.read_text() for p in sorted((ROOT / "lib").rglob("*.py"))}
    out.update({str(p.relative_to(ROOT)): p.read_text() for p in sorted((ROOT / "benchmarks").glob("*.py"))})
    for path in sorted(CHAPTERS.glob("*.ipynb")):
        out[str(path.relative_to(ROOT))] = "\n".join(c.source for c in nbformat.read(path, as_version=4).cells)
    return out


RE_KEYS_EVERY_STAGE = {"lib/model.py: lora_block_index"}
"""Used by tests only, but kept for now: lib.model is in the closure of the MAP training stage
(tests/test_stages.py), so deleting it re-keys every stage of every profile; it goes with the next
change that re-keys the MAP training anyway."""


def test_every_public_function_and_class_of_lib_is_used_outside_tests():
    sources = _sources()
    unused = []
    for path, text in sources.items():
        if not path.startswith("lib/"):
            continue
        for node in ast.parse(text).body:
            if isinstance(node, (ast.FunctionDef, ast.ClassDef)) and not node.name.startswith("_"):
                word = re.compile(rf"\b{re.escape(node.name)}\b")
                elsewhere = any(word.search(t) for p, t in sources.items() if p != path)
                if not elsewhere and len(word.findall(text)) < 2:
                    unused.append(f"{path}: {node.name}")
    assert sorted(set(unused) - RE_KEYS_EVERY_STAGE) == [], \
        "used by no chapter, benchmark or lib code: make it a test helper or delete it"
    assert RE_KEYS_EVERY_STAGE <= set(unused), "an exempted name is used now: drop it from RE_KEYS_EVERY_STAGE"
