"""Where a result came from: canonical hashing of inputs and a description of the environment.

``canonical_json`` is the one serialisation every hash in the project uses (artifact stage keys,
the params hash of a frozen chapter), so the same inputs always give the same key and any changed
nested value gives a different one. ``environment`` describes the code and machine that ran a
chapter (git commit, dirty flag, device, library versions); it never records the hostname.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import platform
import subprocess
from collections.abc import Mapping
from importlib import metadata
from pathlib import Path
from typing import Any

from lib.paths import ROOT

VERSIONED = ("torch", "timm", "peft", "laplace-torch")


def _normalise(obj: Any, where: str) -> Any:
    if obj is None or isinstance(obj, (bool, int, str)):
        return obj
    if isinstance(obj, float):
        if not math.isfinite(obj):
            raise ValueError(f"{where} is {obj!r}; canonical JSON accepts finite floats only")
        return obj
    if isinstance(obj, Mapping):
        out = {}
        for key, value in obj.items():
            if not isinstance(key, str):
                raise ValueError(
                    f"{where} has the non-string key {key!r}; use string keys so the hash is unambiguous"
                )
            out[key] = _normalise(value, f"{where}[{key!r}]")
        return out
    if isinstance(obj, (list, tuple)):
        return [_normalise(v, f"{where}[{i}]") for i, v in enumerate(obj)]
    raise ValueError(
        f"{where} is a {type(obj).__name__} ({obj!r:.60}); pass only None/bool/int/float/str, "
        "lists/tuples and string-keyed mappings (convert paths and arrays explicitly)"
    )


def canonical_json(obj: Any, name: str = "value") -> str:
    """Deterministic JSON text of ``obj``: sorted keys, floats via ``repr``, tuples as lists.

    Raises ``ValueError`` naming the offending entry (``name[...]``) for anything that is not
    plain JSON data (paths, arrays, sets, NaN, non-string keys).
    """
    return json.dumps(
        _normalise(obj, name), sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False
    )


def sha256_text(text: str) -> str:
    """Hex SHA-256 of the UTF-8 bytes of ``text``."""
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def params_sha256(params: Mapping[str, Any]) -> str:
    """SHA-256 of the canonical JSON of a validated params dict."""
    return sha256_text(canonical_json(params, "params"))


def notebook_sha256(path: str | Path) -> str:
    """SHA-256 of a notebook's cell types and sources only (outputs and metadata do not count)."""
    nb = json.loads(Path(path).read_text(encoding="utf-8"))
    cells = [
        [c["cell_type"], "".join(c["source"]) if isinstance(c["source"], list) else c["source"]]
        for c in nb.get("cells", [])
    ]
    return sha256_text(canonical_json(cells, "cells"))


def _git(root: Path, *args: str) -> str | None:
    try:
        out = subprocess.run(
            ["git", *args], cwd=root, capture_output=True, text=True, check=True, timeout=30
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip()


def git_state(root: Path = ROOT) -> dict[str, Any]:
    """``{"git_sha": commit or None, "git_dirty": bool or None}`` of the project at ``root``.

    git is asked only when ``root`` is the top level of its repository (``git rev-parse
    --show-toplevel`` equals ``root``, symlinks resolved). A copy of the working tree without its
    own ``.git`` (sent to a GPU machine, or unpacked inside some other repository) is not described
    by the commit of an enclosing repository: then, and where the repository has no commit yet, the
    commit the copy was made from is taken from the environment variable ``LLA_GIT_SHA`` with
    ``git_dirty`` unknown (None); without the variable nothing is known and both are None.
    ``git_dirty`` ignores ``_freeze/``, which a run itself rewrites.
    """
    top = _git(root, "rev-parse", "--show-toplevel")
    own = bool(top) and Path(top).resolve() == Path(root).resolve()
    sha = _git(root, "rev-parse", "--verify", "--quiet", "HEAD") if own else None
    if not sha and (not own or os.environ.get("LLA_GIT_SHA")):
        return {"git_sha": os.environ.get("LLA_GIT_SHA") or None, "git_dirty": None}
    status = _git(root, "status", "--porcelain", "--", ".", ":(exclude)_freeze")
    return {"git_sha": sha or None, "git_dirty": None if status is None else bool(status)}


def device_name() -> str:
    """The CUDA device name when torch sees one, else ``"cpu (<n> cores)"``."""
    try:
        import torch

        if torch.cuda.is_available():
            return torch.cuda.get_device_name(0)
    except ImportError:
        pass
    return f"cpu ({os.cpu_count()} cores)"


def versions() -> dict[str, str | None]:
    """Installed versions of python and the model libraries (``None`` when not installed), and
    ``torch_build``: ``torch.__version__`` with its local build tag (``2.11.0+cu130``: CUDA or CPU build)."""
    out: dict[str, str | None] = {"python": platform.python_version()}
    for dist in VERSIONED:
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            out[dist] = None
    try:
        import torch

        out["torch_build"] = torch.__version__
    except ImportError:
        out["torch_build"] = None
    return out


def environment(root: Path = ROOT) -> dict[str, Any]:
    """Git commit/dirty flag, device and library versions of this process (no hostname)."""
    return {**git_state(root), "device": device_name(), "versions": versions()}
