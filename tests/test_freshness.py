"""Frozen outputs in _freeze/ are up to date with the chapter sources, params files and library.

A record ``_freeze/<profile>/<chapter>.json`` is fresh when the hash of the current
``chapters/<chapter>.ipynb`` (cell types and sources only), of the validated ``params/<profile>.yml``
and of every ``lib`` module the chapter's code imports, transitively (:mod:`lib.codehash`), equal
the hashes stored when the chapter was executed. A change to a module that a chapter cannot reach
leaves that chapter fresh.
"""

from __future__ import annotations

import json

import pytest

from lib.codehash import module_hashes, notebook_modules
from lib.config import load_params, params_path
from lib.paths import CHAPTERS, FREEZE
from lib.provenance import notebook_sha256, params_sha256
from lib.runner import book_chapters, is_scratch

pytestmark = pytest.mark.freshness

RECORDS = sorted(p for p in FREEZE.glob("*/*.json") if not is_scratch(p.parent.name))
"""Records of the committed profiles; ``_freeze/<profile>+<slug>/`` (runs with ``--set``) are
git-ignored scratch folders, never stale committed ones."""


def _id(path):
    return f"{path.parent.name}/{path.stem}"


def changed_modules(recorded: dict[str, str], current: dict[str, str]) -> list[str]:
    """Modules whose source hash differs, or that only one of the two closures holds."""
    return sorted(m for m in set(recorded) | set(current) if recorded.get(m) != current.get(m))


@pytest.mark.parametrize("record_path", RECORDS, ids=[_id(p) for p in RECORDS])
def test_frozen_chapter_is_fresh(record_path):
    record = json.loads(record_path.read_text())
    profile, chapter = record_path.parent.name, record_path.stem
    rerun = f"make run PROFILE={profile} CHAPTER={chapter}"
    assert record.get("chapter") == chapter and record.get("profile") == profile, (
        f"{record_path} describes {record.get('profile')}/{record.get('chapter')}; {rerun}"
    )
    assert (record_path.with_suffix(".ipynb")).is_file(), f"{chapter} ({profile}): executed notebook missing; {rerun}"
    source = CHAPTERS / f"{chapter}.ipynb"
    assert source.is_file(), (
        f"{chapter} ({profile}): chapters/{chapter}.ipynb no longer exists; delete "
        f"_freeze/{profile}/{chapter}.* or restore the chapter"
    )
    assert notebook_sha256(source) == record["source_sha256"], (
        f"chapter {chapter} changed since it was frozen for profile {profile}; {rerun}"
    )
    params = load_params(params_path(profile), check_data=False)  # CI has no real data; hashing needs none
    assert params_sha256(params) == record["params_sha256"], (
        f"params/{profile}.yml changed since chapter {chapter} was frozen; {rerun}"
    )
    changed = changed_modules(record["lib_modules"], module_hashes(notebook_modules(source)))
    assert not changed, (
        f"lib modules that chapter {chapter} imports changed since it was frozen for profile {profile} "
        f"({', '.join(changed)}); {rerun}"
    )


@pytest.mark.parametrize("chapter", book_chapters())
def test_every_book_chapter_has_a_frozen_smoke_output(chapter):
    frozen = FREEZE / "smoke" / f"{chapter}.json"
    assert frozen.is_file() and frozen.with_suffix(".ipynb").is_file(), (
        f"chapter {chapter} has no frozen smoke output; make run PROFILE=smoke CHAPTER={chapter}"
    )


PROFILES = sorted({p.parent.name for p in RECORDS})


@pytest.mark.parametrize("profile", PROFILES)
def test_chapters_of_a_profile_ran_with_one_library_and_index_last(profile):
    """The book shows one execution of the library: every module that several chapters of a profile
    import has the same source hash in all their records, and the index, which reads the other
    chapters' saved tables, ran after them."""
    records = {p.stem: json.loads(p.read_text()) for p in FREEZE.glob(f"{profile}/*.json")}
    seen: dict[str, dict[str, set[str]]] = {}
    for chapter, record in records.items():
        for module, sha in record["lib_modules"].items():
            seen.setdefault(module, {}).setdefault(sha, set()).add(chapter)
    split = {m: v for m, v in seen.items() if len(v) > 1}
    assert not split, (
        f"chapters of {profile} ran with different versions of "
        + "; ".join(f"{m} ({' vs '.join(', '.join(sorted(c)) for c in v.values())})" for m, v in sorted(split.items()))
        + f"; re-run them together: make run PROFILE={profile}"
    )
    if "index" in records:
        last = max(r["started_at"] for c, r in records.items() if c != "index")
        assert records["index"]["started_at"] >= last, (
            f"the index of {profile} ran before a chapter whose tables it reads; make run PROFILE={profile} CHAPTER=index"
        )
