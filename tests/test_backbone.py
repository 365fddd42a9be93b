"""lib.backbone: a shipped backbone (safetensors + sidecar) is what fine-tuning loads, checked by its SHA-256."""

from __future__ import annotations

import dataclasses
import json

import pytest
import safetensors.torch
import torch

import lib.pipeline
from lib.backbone import backbone_record, export_backbone, sidecar_path
from lib.config import Config, ParamsError
from lib.model import file_sha256, unwrap
from lib.pipeline import backbone_stage, map_run, pretrain_stage
from conftest import write_fake_cifar10
from test_pipeline import CPU, tiny_profile

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def pretrained(tmp_path, monkeypatch):
    """A tiny cifar-format profile with a pre-training section, its finished backbone stage, and the
    backbone exported to ``shipped/vit.safetensors``."""
    monkeypatch.setenv("LLA_ARTIFACTS", str(tmp_path / "artifacts"))
    write_fake_cifar10(tmp_path / "data")
    cfg = tiny_profile(
        data={"name": "cifar10", "root": str(tmp_path / "data"), "classes": [5, 6, 7], "num_classes": 3,
              "train_per_class": 6, "val_size": 6, "synthetic": {}},
        pretrain={"classes": [0, 1, 2, 3], "seed": 3, "epochs": 2, "batch_size": 16, "lr": 1e-3,
                  "warmup_epochs": 0, "augment": True, "compile": False},
    )
    st = pretrain_stage(cfg, CPU)
    out = tmp_path / "shipped" / "vit.safetensors"
    record = export_backbone(st, cfg, out, git={"git_sha": "abc", "git_dirty": False})
    return cfg, st, out, record


def test_export_writes_the_backbone_without_head_and_a_sidecar_that_describes_it(pretrained):
    cfg, st, out, record = pretrained
    saved = torch.load(st.file("backbone.pt"), weights_only=True)
    shipped = safetensors.torch.load_file(out)
    assert set(shipped) == {k for k in saved if not k.startswith("head.")}
    for k, v in shipped.items():
        assert torch.equal(v, saved[k]), k
    side = json.loads(sidecar_path(out).read_text())
    assert side == record
    assert side["sha256"] == file_sha256(out) and side["bytes"] == out.stat().st_size
    assert side["parameters"] == sum(v.numel() for v in shipped.values())
    assert side["command"] == "python -m lib.backbone train --profile tiny"
    assert side["history"] == json.loads(st.file("history.json").read_text()) and len(side["history"]) == 2
    assert side["stage_inputs"]["pretrain"]["epochs"] == 2 and side["git_sha"] == "abc"


def test_a_profile_that_ships_its_backbone_fine_tunes_from_it_without_pretraining(pretrained, monkeypatch):
    cfg, st, out, record = pretrained
    shipped = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, checkpoint=str(out),
                                                                 checkpoint_sha256=record["sha256"]))
    monkeypatch.setattr(lib.pipeline, "pretrain_stage", lambda *a: pytest.fail("pre-trained although shipped"))
    assert backbone_stage(shipped, CPU) is None
    run = map_run(shipped, 0, CPU)
    vit = unwrap(run.model)
    saved = torch.load(st.file("backbone.pt"), weights_only=True)
    assert torch.equal(vit.blocks[1].mlp.fc2.base_layer.weight, saved["blocks.1.mlp.fc2.weight"])
    info = backbone_record(shipped, CPU)
    assert info.shipped and info.history == record["history"] and info.sidecar == record


def test_a_replaced_checkpoint_is_an_error_naming_the_hash(pretrained):
    cfg, st, out, record = pretrained
    wrong = "0" * 64
    bad = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, checkpoint=str(out), checkpoint_sha256=wrong))
    with pytest.raises(ValueError, match=rf"has SHA-256 {record['sha256']}, not model.checkpoint_sha256 {wrong}"):
        map_run(bad, 0, CPU)


def test_a_missing_sidecar_names_the_retrain_command(pretrained):
    cfg, st, out, record = pretrained
    sidecar_path(out).unlink()
    shipped = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, checkpoint=str(out)))
    with pytest.raises(FileNotFoundError, match="python -m lib.backbone train --profile tiny"):
        backbone_record(shipped, CPU)


@pytest.mark.parametrize("model, message", [
    ({"checkpoint_sha256": "a" * 64}, "'model.checkpoint' is not"),
    ({"checkpoint": "x.safetensors", "checkpoint_sha256": "ABC"}, "64 lower-case hex digits"),
])
def test_checkpoint_hash_is_validated(model, message):
    with pytest.raises(ParamsError, match=message):
        Config.from_dict({"model": model})
