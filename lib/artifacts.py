"""Hash-keyed stage directories through which chapters exchange checkpoints and results.

A stage is identified by its name, its inputs and the keys of the stages it consumes:
``key = sha256(canonical_json({"name", "inputs", "upstream": [keys]}))[:16]`` and its directory is
``<root>/<name>-<key>``. A chapter re-run with new Laplace settings therefore gets a new Laplace
stage while it reuses the MAP checkpoint only if the MAP stage's inputs are identical; a changed
upstream key propagates to every downstream stage.

Every stage of the study is made through :func:`cached`, whose inputs also hold a hash of the
source of the code that computes the stage (:mod:`lib.codehash`): the module named as ``code`` and
every ``lib`` module it imports, transitively. A fix to that code gives the stage a new key, so a
warm ``artifacts/`` never serves results of the code before the fix, while stages whose code cannot
reach the edited module keep their keys. Usage::

    def train(st: Stage) -> None:
        torch.save(state, st.file("model.pt"))

    fit = cached("map", cfg.section("data", "model", "lora", "train"), code=__name__, compute=train)
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from lib.codehash import combined_sha256, module_hashes
from lib.paths import ROOT
from lib.paths import ARTIFACTS
from lib.provenance import canonical_json, sha256_text

DONE = "DONE"
KEY_CHARS = 16
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.]*$")


@dataclass(frozen=True)
class Stage:
    """One stage directory ``path = root/name-key``; ``done`` once :meth:`mark_done` ran."""

    name: str
    key: str
    path: Path

    @property
    def done(self) -> bool:
        """Whether the ``DONE`` marker exists (all files of the stage were written)."""
        return (self.path / DONE).is_file()

    def mark_done(self) -> None:
        """Write the ``DONE`` marker; call it after every file of the stage is complete."""
        (self.path / DONE).write_text(datetime.now(timezone.utc).isoformat() + "\n")

    def file(self, relname: str) -> Path:
        """Path of ``relname`` inside the stage (parent folders are created)."""
        rel = Path(relname)
        if rel.is_absolute() or ".." in rel.parts or not rel.parts:
            raise ValueError(f"relname {relname!r} must be a relative path inside the stage")
        path = self.path / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        return path


def default_root() -> Path:
    """``$LLA_ARTIFACTS`` if set, else ``<repo>/artifacts``."""
    env = os.environ.get("LLA_ARTIFACTS")
    return Path(env).expanduser() if env else ARTIFACTS


def stage_key(name: str, inputs: Mapping[str, Any], upstream: Sequence[Stage] = ()) -> str:
    """First 16 hex characters of the SHA-256 of the canonical JSON of name, inputs, upstream keys."""
    if not isinstance(inputs, Mapping):
        raise ValueError(f"inputs of stage {name!r} must be a mapping, got {type(inputs).__name__}")
    for up in upstream:
        if not isinstance(up, Stage):
            raise ValueError(f"upstream of stage {name!r} must hold Stage objects, got {up!r}")
    payload = {"name": name, "inputs": inputs, "upstream": [u.key for u in upstream]}
    return sha256_text(canonical_json(payload, f"stage {name!r}"))[:KEY_CHARS]


def stage(
    name: str,
    inputs: Mapping[str, Any],
    upstream: Sequence[Stage] = (),
    root: Path | None = None,
) -> Stage:
    """Create (or reopen) the stage directory for these inputs and write its ``inputs.json``."""
    if not _NAME_RE.match(name):
        raise ValueError(f"stage name {name!r} must match {_NAME_RE.pattern} (no slashes or dashes)")
    key = stage_key(name, inputs, upstream)
    path = Path(root if root is not None else default_root()) / f"{name}-{key}"
    path.mkdir(parents=True, exist_ok=True)
    record = {
        "name": name,
        "key": key,
        "inputs": json.loads(canonical_json(inputs, f"inputs of stage {name!r}")),
        "upstream": [{"name": u.name, "key": u.key} for u in upstream],
    }
    # Written atomically (a temporary file per process, then renamed): processes that open the
    # same stage at once (:mod:`lib.compute`) never leave a half-written record.
    tmp = path / f"inputs.json.{os.getpid()}.tmp"
    tmp.write_text(json.dumps(record, indent=1, sort_keys=True) + "\n")
    tmp.replace(path / "inputs.json")
    return Stage(name=name, key=key, path=path)


CODE_KEY = "code"
"""The entry of a cached stage's inputs that names its code: ``{"modules": closure, "sha256": hash}``."""

DESCRIPTIVE = frozenset({"lib", "lib.paths", "lib.provenance", "lib.codehash", "lib.artifacts", "lib.config"})
"""Modules that describe and store a stage rather than compute it, left out of its code hash: the
validated params it reads are its inputs (defaults included), so an edit to the params schema (a
new section, say) changes a stage's key only where it changes the values the stage reads."""


def stage_code(modules: Sequence[str], root: Path = ROOT) -> dict[str, Any]:
    """``{"modules": [...], "sha256": ...}``: the computing part of the import closure of ``modules``
    (:func:`lib.codehash.module_hashes` without :data:`DESCRIPTIVE`) and one hash over its sources."""
    hashes = {m: h for m, h in module_hashes(modules, root).items() if m not in DESCRIPTIVE}
    return {"modules": list(hashes), "sha256": combined_sha256(hashes)}


def open_cached(
    name: str,
    inputs: Mapping[str, Any],
    *,
    code: str | Sequence[str],
    upstream: Sequence[Stage] = (),
    root: Path | None = None,
) -> Stage:
    """The directory of the stage that :func:`cached` with these arguments computes, opened without
    computing anything: for filling a resumable stage's parts in several processes
    (:mod:`lib.compute`) before one of them completes it through :func:`cached`."""
    if CODE_KEY in inputs:
        raise ValueError(f"inputs of stage {name!r} use the reserved key {CODE_KEY!r}; rename that input")
    modules = (code,) if isinstance(code, str) else tuple(code)
    return stage(name, {**inputs, CODE_KEY: stage_code(modules)}, upstream, root)


def cached(
    name: str,
    inputs: Mapping[str, Any],
    *,
    code: str | Sequence[str],
    compute: Callable[[Stage], None],
    upstream: Sequence[Stage] = (),
    root: Path | None = None,
) -> Stage:
    """The stage ``name`` for these inputs, upstream stages and code, computed once.

    ``code``: the module (normally the caller's ``__name__``) or modules that compute the stage;
    the key hashes their source and that of every ``lib`` module they import, transitively
    (:func:`stage_code`, which leaves out the :data:`DESCRIPTIVE` modules), besides ``inputs`` and
    the upstream keys. ``compute(stage)``
    runs only when the stage is not done; it writes the stage's files (it may resume from parts
    it saved earlier in the same directory), and the stage is marked done when it returns. A
    ``compute`` that raises leaves the stage unfinished, never marked done.
    """
    st = open_cached(name, inputs, code=code, upstream=upstream, root=root)
    if not st.done:
        compute(st)
        st.mark_done()
    return st
