"""lib.study_scale and the backbone record behind it: the scale of a study, from the Config and a
(fabricated) shipped backbone's sidecar; the setup table states it."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch

from lib.backbone import BackboneRecord, backbone_record, sidecar_path
from lib.config import Config
from lib.model import add_lora, build_backbone
from lib.report import setup_table
from lib.study_scale import GPU_PROFILES, REFERENCE_PROFILE, model_scale, profile_scale

SMOKE_MODEL = {"name": "vit_tiny_patch16_224", "pretrained": False,
               "kwargs": {"img_size": 32, "patch_size": 8, "embed_dim": 64, "depth": 4, "num_heads": 2}}


def _vit_parameters(width: int, depth: int, patch: int, tokens: int, mlp: int = 4) -> int:
    """Parameters of a timm ViT without its head, by hand: patch embedding (3·p²·w + w), class token
    and position embedding (w + T·w), per block two LayerNorms (4w), qkv (3w² + 3w), proj (w² + w),
    fc1 (w·mw + mw), fc2 (mw·w + w); the final LayerNorm (2w)."""
    block = 4 * width + 3 * width**2 + 3 * width + width**2 + width + 2 * mlp * width**2 + mlp * width + width
    return 3 * patch**2 * width + width + width + tokens * width + depth * block + 2 * width


def _shipped_cfg(tmp_path) -> Config:
    """A profile that ships its backbone as a file in tmp_path, with a fabricated sidecar: two
    pre-training epochs over 24,000 images at 400 images/s."""
    ckpt = tmp_path / "backbone.safetensors"
    history = [{"epoch": e + 1, "val_acc": acc, "seconds": 60.0, "images_per_s": 400.0}
               for e, acc in enumerate([0.55, 0.658])]
    sidecar_path(ckpt).write_text(json.dumps({
        "file": ckpt.name, "sha256": "ab" * 32, "bytes": 21_600_000, "parameters": 5_379_264, "profile": "cpu-like",
        "command": "python -m lib.backbone train --profile cpu-like", "history": history, "pretrain_seconds": 120.0,
        "git_sha": "0123456789abcdef", "git_dirty": False, "device": "CPU"}))
    model = {**SMOKE_MODEL, "checkpoint": str(ckpt), "kwargs": {"img_size": 32, "patch_size": 8}}
    return Config.from_dict({"profile": "cpu-like", "model": model, "pretrain": {"classes": [0, 1, 2, 3, 4]},
                             "data": {"name": "cifar10", "classes": [5, 6, 7, 8, 9], "num_classes": 5}})


def test_scale_of_the_smoke_model_counted_by_hand():
    s = model_scale(Config.from_dict({"profile": "smoke", "model": SMOKE_MODEL}))
    assert (s.blocks, s.tokens, s.weights, s.synthetic, s.reference) == (4, 17, "random", True, False)
    assert s.parameters == _vit_parameters(64, 4, 8, 17) == 213_568
    assert s.pretrain_images is None and s.pretrain_epochs is None


def test_scale_from_a_shipped_backbones_sidecar(tmp_path):
    cfg = _shipped_cfg(tmp_path)
    record = backbone_record(cfg, torch.device("cpu"))
    assert record.shipped and record.sidecar["sha256"] == "ab" * 32
    assert (record.epochs, record.images, record.seconds) == (2, 24_000, 120.0)
    assert record.val_accuracy == pytest.approx(0.658)
    s = model_scale(cfg, record)
    assert (s.blocks, s.tokens, s.weights, s.synthetic) == (12, 17, "project", False)
    assert s.parameters == _vit_parameters(192, 12, 8, 17) == record.sidecar["parameters"]
    assert (s.pretrain_images, s.pretrain_epochs) == (24_000, 2)


def test_a_record_without_epochs_or_a_shipped_one_without_sidecar_is_an_error():
    with pytest.raises(ValueError, match="history is empty"):
        BackboneRecord(False, [], None)
    with pytest.raises(ValueError, match="sidecar"):
        BackboneRecord(True, [{"images_per_s": 1.0, "seconds": 1.0, "val_acc": 0.5}], None)


def test_the_larger_gpu_settings_from_their_params_files():
    by_name = {p: profile_scale(p) for p in GPU_PROFILES}
    transfer, reference = by_name["cifar10-transfer"], by_name[REFERENCE_PROFILE]
    assert (transfer.blocks, transfer.tokens, transfer.weights) == (12, 65, "project")
    assert transfer.parameters == _vit_parameters(192, 12, 4, 65)
    assert (reference.blocks, reference.tokens, reference.weights, reference.reference) == (12, 197, "hub", True)
    assert reference.parameters == _vit_parameters(768, 12, 16, 197)


def test_setup_table_states_the_scale_and_the_pretraining_images(tmp_path):
    cfg = _shipped_cfg(tmp_path)
    small = Config.from_dict({**cfg.to_dict(), "model": {**SMOKE_MODEL}})  # a small model stands in for the run's
    model = add_lora(build_backbone(small.model, 5, seed=0, device="cpu"), small.lora, seed=0)
    run = SimpleNamespace(model=model, splits=SimpleNamespace(train=range(5000), val=range(1000), test=range(5000),
                                                              class_names=["dog", "frog", "horse", "ship", "truck"]))
    rows = setup_table(small, run, backbone_record(cfg, torch.device("cpu"))).set_index("Setting").Value
    assert rows["Transformer blocks"] == "4 (17 tokens per image)"
    assert rows["Backbone parameters"] == "213,568 (frozen; head left out)"
    assert rows["Pre-training images"] == "24,000 per epoch, 2 epochs; validation accuracy 65.8% on the pre-training classes"
    assert "Pre-training images" not in setup_table(small, run).Setting.tolist()
    assert rows["Statistics"].endswith(f"equivalence margin ±{100 * small.stats.equivalence_margin:g} pp (two one-sided tests)")
