"""The pre-trained backbone of a profile: shipped with the project as a ``safetensors`` file, or pre-trained on the fly.

A profile with a ``pretrain`` section and a ``model.checkpoint`` (``cifar10-cpu``) ships the result
of its pre-training: ``model.checkpoint`` is a safetensors file of the backbone's state dict (head
left out: fine-tuning draws a new one), checked against ``model.checkpoint_sha256`` whenever it is
loaded (:func:`lib.model.build_backbone`), with a sidecar ``<checkpoint>.json`` (:func:`sidecar_path`)
giving its SHA-256 and size, the pre-training params and history, the command that retrains it,
the commit of the code that trained it, the device and the wall time. One command retrains it from
scratch (the pipeline's ``backbone`` stage, :func:`lib.pipeline.pretrain_stage`, resumable) and
writes both files::

    python -m lib.backbone train --profile cifar10-cpu

A profile with a ``pretrain`` section and no checkpoint (``cifar10-transfer``) pre-trains on the
fly as the first cached stage; :func:`backbone_record` describes either kind the same way.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path
from typing import Any

import safetensors.torch
import torch

from lib.artifacts import Stage
from lib.config import Config, load_params, params_path
from lib.model import file_sha256
from lib.paths import ROOT
from lib.pipeline import backbone_stage, pretrain_stage, resolve_device
from lib.provenance import environment

RETRAIN = "python -m lib.backbone train --profile {profile}"


def checkpoint_path(cfg: Config) -> Path:
    """``model.checkpoint`` of the profile, resolved against the repository root."""
    if cfg.model.checkpoint is None:
        raise ValueError(f"profile '{cfg.profile}' has no model.checkpoint; set it to the file the backbone is shipped in")
    path = Path(cfg.model.checkpoint).expanduser()
    return path if path.is_absolute() else ROOT / path


def sidecar_path(checkpoint: Path) -> Path:
    """The sidecar record of a shipped checkpoint: the same name with ``.json``."""
    return checkpoint.with_suffix(".json")


def export_backbone(stage: Stage, cfg: Config, out: Path, *, git: dict[str, Any] | None = None) -> dict[str, Any]:
    """Write the backbone of a finished pre-training ``stage`` to ``out`` (safetensors, head left out)
    and its sidecar; return the sidecar record. ``git``: the ``git_sha``/``git_dirty`` of the code
    that trained it (default: this checkout's)."""
    state = torch.load(stage.file("backbone.pt"), map_location="cpu", weights_only=True)
    state = {k: v.contiguous() for k, v in state.items() if not k.startswith("head.")}
    out.parent.mkdir(parents=True, exist_ok=True)
    safetensors.torch.save_file(state, out, metadata={"format": "pt", "profile": cfg.profile})
    history = json.loads(stage.file("history.json").read_text())
    env = environment()
    record = {
        "file": out.name,
        "sha256": file_sha256(out),
        "bytes": out.stat().st_size,
        "parameters": sum(v.numel() for v in state.values()),
        "profile": cfg.profile,
        "command": RETRAIN.format(profile=cfg.profile),
        "stage_inputs": json.loads(stage.file("inputs.json").read_text())["inputs"],
        "history": history,
        "pretrain_seconds": sum(h["seconds"] for h in history),
        "git_sha": (git or env)["git_sha"],
        "git_dirty": (git or env)["git_dirty"],
        "device": env["device"],
        "versions": env["versions"],
    }
    sidecar_path(out).write_text(json.dumps(record, indent=1) + "\n")
    return record


@dataclasses.dataclass(frozen=True)
class BackboneRecord:
    """Where a profile's backbone comes from: ``shipped`` (the sidecar of ``model.checkpoint``) or
    pre-trained in this run's cache; ``history`` the per-epoch pre-training rows of
    :func:`lib.train.fit`; ``sidecar`` the whole shipped record (None when pre-trained on the fly)."""

    shipped: bool
    history: list[dict]
    sidecar: dict[str, Any] | None

    def __post_init__(self) -> None:
        if not self.history:
            raise ValueError("BackboneRecord history is empty: the backbone's pre-training has no epoch; retrain it")
        if self.shipped and self.sidecar is None:
            raise ValueError("BackboneRecord: a shipped backbone needs its sidecar record")

    @property
    def epochs(self) -> int:
        """Pre-training epochs."""
        return len(self.history)

    @property
    def images(self) -> int:
        """Images of one pre-training epoch (its throughput × its time, rounded)."""
        first = self.history[0]
        return round(first["images_per_s"] * first["seconds"])

    @property
    def val_accuracy(self) -> float:
        """Validation accuracy (a fraction) on the pre-training classes after the last epoch."""
        return float(self.history[-1]["val_acc"])

    @property
    def seconds(self) -> float:
        """Training time of all epochs (validation passes left out), in s."""
        return float(sum(h["seconds"] for h in self.history))


def backbone_record(cfg: Config, device: torch.device) -> BackboneRecord | None:
    """The pre-training of the profile's backbone (None for profiles that do not pre-train one)."""
    if cfg.pretrain is None:
        return None
    if cfg.model.checkpoint is not None:
        side = sidecar_path(checkpoint_path(cfg))
        if not side.is_file():
            raise FileNotFoundError(f"{side} not found: the sidecar of model.checkpoint '{cfg.model.checkpoint}'; "
                                    f"retrain the backbone with `{RETRAIN.format(profile=cfg.profile)}`")
        record = json.loads(side.read_text())
        return BackboneRecord(True, record["history"], record)
    st = backbone_stage(cfg, device)
    return BackboneRecord(False, json.loads(st.file("history.json").read_text()), None)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m lib.backbone", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="cmd", required=True)
    train = sub.add_parser("train", help="pre-train the profile's backbone from scratch and write model.checkpoint + sidecar")
    train.add_argument("--profile", required=True)
    args = parser.parse_args(argv)
    cfg = Config.from_dict(load_params(params_path(args.profile)), source=f"params/{args.profile}.yml")
    out = checkpoint_path(cfg)
    st = pretrain_stage(cfg, resolve_device(cfg))
    record = export_backbone(st, cfg, out)
    print(f"wrote {out} ({record['bytes']:,} bytes) and {sidecar_path(out).name}")
    print(f"sha256 {record['sha256']}: set model.checkpoint_sha256 in params/{args.profile}.yml to it")


if __name__ == "__main__":
    main()
