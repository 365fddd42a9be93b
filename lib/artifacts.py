"""Hash-keyed stage directories through which chapters exchange checkpoints and results.

A stage is identified by its name, its inputs and the keys of the stages it consumes:
``key = sha256(canonical_json({"name", "inputs", "upstream": [keys]}))[:16]`` and its directory is
``<root>/<name>-<key>``. A chapter re-run with new Laplace settings therefore gets a new Laplace
stage while it reuses the MAP checkpoint only if the MAP stage's inputs are identical; a changed
upstream key propagates to every downstream stage.

Usage::

    fit = stage("map", cfg.section("data", "model", "lora", "train"))
    if not fit.done:
        torch.save(state, fit.file("model.pt"))
        fit.mark_done()
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

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
    (path / "inputs.json").write_text(json.dumps(record, indent=1, sort_keys=True) + "\n")
    return Stage(name=name, key=key, path=path)
