"""Frozen outputs in _freeze/ are up to date with the chapter sources and params files.

A record ``_freeze/<profile>/<chapter>.json`` is fresh when the hash of the current
``chapters/<chapter>.ipynb`` (cell types and sources only) and of the validated
``params/<profile>.yml`` equal the hashes stored when the chapter was executed.
"""

from __future__ import annotations

import json

import pytest

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


@pytest.mark.parametrize("chapter", book_chapters())
def test_every_book_chapter_has_a_frozen_smoke_output(chapter):
    frozen = FREEZE / "smoke" / f"{chapter}.json"
    assert frozen.is_file() and frozen.with_suffix(".ipynb").is_file(), (
        f"chapter {chapter} has no frozen smoke output; make run PROFILE=smoke CHAPTER={chapter}"
    )



PROFILES = sorted({p.parent.name for p in RECORDS})


@pytest.mark.parametrize("profile", PROFILES)
def test_chapters_of_a_profile_ran_with_one_library_and_index_last(profile):
    """The book shows one execution of the library: every chapter of a profile recorded the same
    ``lib`` hash, and the index, which reads the other chapters' saved tables, ran after them."""
    records = {p.stem: json.loads(p.read_text()) for p in FREEZE.glob(f"{profile}/*.json")}
    libs = {r["lib_sha256"] for r in records.values()}
    assert len(libs) == 1, (
        f"chapters of {profile} ran with {len(libs)} different versions of lib/ "
        f"({', '.join(sorted(c for c in records))}); re-run them together: make run PROFILE={profile}"
    )
    if "index" in records:
        last = max(r["started_at"] for c, r in records.items() if c != "index")
        assert records["index"]["started_at"] >= last, (
            f"the index of {profile} ran before a chapter whose tables it reads; make run PROFILE={profile} CHAPTER=index"
        )


def test_smoke_freeze_ran_with_the_current_library():
    """The CI profile's frozen book was executed by the ``lib/`` of this commit, so a formula fix in
    ``lib/`` cannot leave the book showing numbers of the code before it. (The GPU-frozen profiles
    record their ``lib`` hash in each chapter's provenance instead; they cannot be re-run here.)"""
    from lib.provenance import lib_sha256

    recorded = {json.loads(p.read_text())["lib_sha256"] for p in FREEZE.glob("smoke/*.json")}
    assert recorded == {lib_sha256()}, "lib/ changed since the smoke book was frozen; make run PROFILE=smoke"
