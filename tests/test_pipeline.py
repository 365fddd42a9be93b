"""lib.pipeline: the MAP stage trains once and is reused exactly; stage keys hash the right params;
the backbone pre-training stage feeds the fine-tuning model."""

from __future__ import annotations

import functools
import json

import pytest
import torch

import lib.pipeline
from conftest import write_fake_cifar10
from lib.config import Config
from lib.model import build_backbone, lora_modules, unwrap
from lib.backbone import backbone_record
from lib.pipeline import backbone_stage, map_run, resolve_device
from lib.study import Study
from lib.train import predict_logits

pytestmark = pytest.mark.usefixtures("one_thread")

CPU = torch.device("cpu")
TINY_MODEL = {"name": "vit_tiny_patch16_224", "kwargs": {"img_size": 16, "patch_size": 4, "embed_dim": 32, "depth": 2, "num_heads": 2}}


def tiny_profile(**overrides) -> Config:
    d = {
        "profile": "tiny",
        "seeds": [0],
        "device": "cpu",
        "data": {"name": "synthetic", "num_classes": 3,
                 "synthetic": {"n_train": 32, "n_val": 16, "n_test": 24, "native_size": 16, "noise": 1.0}},
        "model": TINY_MODEL,
        "lora": {"r": 2, "alpha": 4.0},
        "train": {"epochs": 1, "batch_size": 16, "lr": 3e-3, "weight_decay": 1e-4, "grad_clip": 1.0},
    }
    for section, values in overrides.items():
        d[section] = {**d.get(section, {}), **values} if isinstance(values, dict) else values
    return Config.from_dict(d)


@pytest.fixture
def artifacts(tmp_path, monkeypatch):
    root = tmp_path / "artifacts"
    monkeypatch.setenv("LLA_ARTIFACTS", str(root))
    return root


def _no_training(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("fit called although the stage is done")

    monkeypatch.setattr(lib.pipeline, "fit", refuse)


def _trainable(model) -> list[torch.Tensor]:
    return [p.detach().clone() for p in model.parameters() if p.requires_grad]


def test_map_run_trains_once_and_reuses_exactly(artifacts, monkeypatch):
    cfg = tiny_profile()
    run = map_run(cfg, 0, CPU)
    st = run.stage
    assert st.done and st.path.parent == artifacts and st.path.name.startswith("map-")
    for name in ("map.pt", "history.json", "val_logits.pt", "test_logits.pt", "checkpoint.pt", "inputs.json"):
        assert (st.path / name).is_file(), name
    assert len(run.history) == 1 and json.loads((st.path / "history.json").read_text()) == run.history
    assert (len(run.splits.train), len(run.splits.val), len(run.splits.test)) == (32, 16, 24)
    assert not run.model.training
    # the LoRA adapters were trained away from B = 0
    assert any(torch.count_nonzero(m.B.weight) > 0 for m in lora_modules(run.model))
    saved_test = torch.load(st.path / "test_logits.pt")
    assert torch.equal(predict_logits(run.model, run.splits.test, preprocess=run.preprocess, device=CPU), saved_test)

    _no_training(monkeypatch)
    again = map_run(cfg, 0, CPU)
    assert again.stage.path == st.path and again.history == run.history
    for a, b in zip(_trainable(run.model), _trainable(again.model)):
        assert torch.equal(a, b)
    assert torch.equal(predict_logits(again.model, again.splits.test, preprocess=again.preprocess, device=CPU), saved_test)
    assert torch.equal(predict_logits(again.model, again.splits.val, preprocess=again.preprocess, device=CPU),
                       torch.load(st.path / "val_logits.pt"))


def test_map_stage_key_tracks_exactly_its_inputs(artifacts, monkeypatch):
    base = map_run(tiny_profile(), 0, CPU).stage.path
    lr = map_run(tiny_profile(train={"lr": 1e-3}), 0, CPU)
    assert lr.stage.path != base and lr.stage.done
    seed = map_run(tiny_profile(), 1, CPU).stage.path
    assert seed != base
    _no_training(monkeypatch)
    unrelated = tiny_profile(
        laplace={"structure": "diag", "batch_size": 7}, predictive={"n_samples": 2},
        stats={"n_boot": 10}, deploy={"n_iters": 1}, seeds=[5, 6], description="changed",
        data={"root": "elsewhere", "download": True},
    )
    assert map_run(unrelated, 0, CPU).stage.path == base
    with pytest.raises(AssertionError, match="fit called"):
        map_run(tiny_profile(lora={"r": 3}), 0, CPU)


def test_resolve_device(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(RuntimeError, match="device: auto or cpu"):
        resolve_device(tiny_profile(device="cuda"))
    assert resolve_device(tiny_profile(device="auto")) == CPU
    assert resolve_device(tiny_profile(device="cpu")) == CPU
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert resolve_device(tiny_profile(device="auto")) == torch.device("cuda")
    assert resolve_device(tiny_profile(device="cpu")) == CPU


def _get(module, dotted: str) -> torch.Tensor:
    return functools.reduce(getattr, dotted.split("."), module)


def test_backbone_stage_feeds_the_fine_tuning_model(artifacts, tmp_path, monkeypatch):
    write_fake_cifar10(tmp_path / "data")
    cfg = tiny_profile(
        data={"name": "cifar10", "root": str(tmp_path / "data"), "classes": [5, 6, 7], "num_classes": 3,
              "train_per_class": 6, "val_size": 6, "synthetic": {}},
        pretrain={"classes": [0, 1, 2, 3], "seed": 3, "epochs": 1, "batch_size": 16, "lr": 1e-3,
                  "warmup_epochs": 0, "augment": True, "compile": False},
    )
    assert backbone_stage(tiny_profile(), CPU) is None
    st = backbone_stage(cfg, CPU)
    assert st.done and st.path.name.startswith("backbone-") and st.path.parent == artifacts
    saved = torch.load(st.path / "backbone.pt", weights_only=True)
    assert saved["head.weight"].shape == (4, 32)  # pre-trained on 4 classes
    record = backbone_record(cfg, CPU)
    assert not record.shipped and record.sidecar is None
    assert len(record.history) == 1 and record.history[0]["epoch"] == 1
    assert Study(cfg, CPU).backbone == record and Study(tiny_profile(), CPU).backbone is None
    # pre-training moved the weights away from the seeded initialisation
    init = build_backbone(cfg.model, 4, seed=3, device=CPU, init_seed=3).state_dict()
    assert not torch.equal(init["blocks.0.attn.qkv.weight"], saved["blocks.0.attn.qkv.weight"])

    run = map_run(cfg, 0, CPU)
    vit = unwrap(run.model)
    for key, value in saved.items():
        if not key.startswith("head."):
            assert torch.equal(_get(vit, key), value), key
    assert vit.head.modules_to_save.default.weight.shape == (3, 32)
    assert len(run.splits.train) == 18 and run.splits.class_names == ("dog", "frog", "horse")
    inputs = json.loads((run.stage.path / "inputs.json").read_text())
    assert inputs["upstream"] == [{"name": "backbone", "key": st.key}]

    _no_training(monkeypatch)
    assert backbone_stage(cfg, CPU).path == st.path
    assert map_run(cfg, 0, CPU).stage.path == run.stage.path
