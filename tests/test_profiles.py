"""The shipped profiles run end to end through the study with their own settings.

``vit-b16-cifar100`` cannot download here, so its data and weights are fabricated in the real
formats (torchvision's ``cifar-100-python/`` pickles, a timm state-dict file) and only sizes are
shrunk; everything else (MC-Fisher K-FAC-reduce, per-block evidence prior, K = 32 samples, the
validation-tuned covariance scale, 100 classes ≤ 4K, hence the reverse-mode bank) is the profile's.
"""

from __future__ import annotations

import pytest
import timm
import torch

from lib.config import Config, load_params
from lib.laplace.scale import scale_grid
from lib.paths import PARAMS
from lib.study import Study
from conftest import write_fake_cifar10
from test_data import make_cifar100


def test_vit_b16_profile_runs_on_fabricated_cifar100_and_checkpoint(tmp_path, monkeypatch, one_thread):
    monkeypatch.setenv("LLA_ARTIFACTS", str(tmp_path / "artifacts"))
    make_cifar100(tmp_path / "data", n_train=60, n_test=24)
    kwargs = dict(img_size=16, patch_size=8, embed_dim=16, depth=2, num_heads=2)
    ckpt = tmp_path / "vit.pt"
    torch.save(timm.create_model("vit_tiny_patch16_224", pretrained=False, **kwargs).state_dict(), ckpt)
    d = load_params(PARAMS / "vit-b16-cifar100.yml", check_data=False)
    d["device"] = "cpu"
    d["data"].update(root=str(tmp_path / "data"), download=False, val_size=12)
    d["model"] = {"name": "vit_tiny_patch16_224", "pretrained": False, "checkpoint": str(ckpt), "kwargs": kwargs}
    d["train"].update(epochs=1, batch_size=16, compile=False)
    d["laplace"].update(batch_size=16)
    d["predictive"].update(batch_size=12, scale_images=10)
    d["stats"].update(n_boot=20, n_boot_shapley=4)
    cfg = Config.from_dict(d)
    assert (cfg.laplace.fisher, cfg.laplace.kfac, cfg.predictive.n_samples, cfg.predictive.scale) == ("mc", "reduce", 32, "val_nll")

    st = Study(cfg, torch.device("cpu")).seed(0)
    named = st.named()
    assert named["probs"].shape == (len(named["names"]), 24, 100)
    assert torch.allclose(named["probs"].sum(-1), torch.ones(len(named["names"]), 24), atol=1e-5)
    assert st.val_bank is not None and st.subset_ece().shape == (5, 2**2)
    scales = st.scales().set_index("posterior")
    grid = scale_grid(*cfg.predictive.scale_range, cfg.predictive.scale_points)  # every κ_S is a grid point
    assert torch.isclose(torch.tensor(scales.scale.to_numpy())[:, None], grid, rtol=1e-12, atol=0).any(1).all()
    assert scales.loc["none", "scale"] == pytest.approx(float(grid[0]), rel=1e-12)  # flat NLL: the smallest κ
    assert scales.loc["all", "val_nll"] <= scales.loc["all", "val_nll_unscaled"] + 1e-9


def test_cifar10_transfer_profile_runs_on_fabricated_cifar10(tmp_path, monkeypatch, one_thread):
    """Pre-training on classes 0-4, LoRA on 5-9, exact-GGN K-FAC-reduce with the batched class
    backward, 5 classes <= K = 128 samples, hence the reverse-mode bank, and the covariance scale."""
    monkeypatch.setenv("LLA_ARTIFACTS", str(tmp_path / "artifacts"))
    write_fake_cifar10(tmp_path / "data", per_batch=40, n_test=60)
    d = load_params(PARAMS / "cifar10-transfer.yml", check_data=False)
    d["device"] = "cpu"
    d["data"].update(root=str(tmp_path / "data"), train_per_class=12, val_size=15)
    d["model"]["kwargs"] = dict(img_size=16, patch_size=8, embed_dim=16, depth=3, num_heads=2)
    d["pretrain"].update(epochs=1, batch_size=32, compile=False)
    d["train"].update(epochs=1, batch_size=16)
    d["laplace"].update(batch_size=16)
    d["predictive"].update(batch_size=16)
    d["stats"].update(n_boot=20, n_boot_shapley=4)
    cfg = Config.from_dict(d)
    assert (cfg.laplace.fisher, cfg.laplace.class_chunk, cfg.data.num_classes, cfg.predictive.n_samples) == ("exact", 10, 5, 128)

    st = Study(cfg, torch.device("cpu")).seed(0)
    named = st.named()
    n_test = len(st.run.splits.test)
    assert n_test > 0 and named["probs"].shape == (len(named["names"]), n_test, 5)
    assert st.subset_ece().shape == (5, 2**3) and torch.isfinite(st.subset_ece()).all()
    assert st.run.stage.path != st.laplace.path and st.val_bank is not None


def test_vit_b16_synthetic_profile_has_the_reference_shapes_and_settings():
    """The GPU rehearsal of the reference path differs from ``vit-b16-cifar100`` only in its data,
    its random initialisation, its sizes and its seeds' epochs, so its stage times and memory
    extrapolate to the reference run."""
    syn = Config.from_dict(load_params(PARAMS / "vit-b16-synthetic.yml", check_data=False))
    ref = Config.from_dict(load_params(PARAMS / "vit-b16-cifar100.yml", check_data=False))
    assert syn.data.name == "synthetic" and syn.data.num_classes == ref.data.num_classes == 100
    assert syn.data.synthetic.native_size == 32  # CIFAR's 32 px, upsampled to the model's 224 like CIFAR-100
    assert syn.model.name == ref.model.name.split(".")[0] and not syn.model.pretrained
    assert syn.lora == ref.lora and syn.seeds == ref.seeds and syn.stats == ref.stats and syn.deploy == ref.deploy
    same = lambda a, b, skip: all(getattr(a, f) == getattr(b, f) for f in a.__dataclass_fields__ if f not in skip)  # noqa: E731
    assert same(syn.laplace, ref.laplace, {"fit_size"}) and syn.laplace.fit_size < ref.laplace.fit_size
    assert same(syn.predictive, ref.predictive, {"scale_images"})
    assert same(syn.train, ref.train, {"epochs", "warmup_epochs"}) and syn.train.compile


def test_cifar10_cpu_profile_loads_its_shipped_backbone():
    """``cifar10-cpu`` ships its pre-trained backbone: the safetensors file has the SHA-256 the
    profile pins, loads into the profile's 12-block ViT (every backbone tensor taken from the file,
    the head drawn fresh), stays within the 25 MB budget, and its sidecar records the same hash, a
    clean commit of this repository, the retraining command and the whole pre-training history."""
    import json

    import safetensors.torch

    from lib.backbone import RETRAIN, checkpoint_path, sidecar_path
    from lib.model import build_backbone, file_sha256

    cfg = Config.from_dict(load_params(PARAMS / "cifar10-cpu.yml", check_data=False))
    path = checkpoint_path(cfg)
    side = json.loads(sidecar_path(path).read_text())
    assert file_sha256(path) == cfg.model.checkpoint_sha256 == side["sha256"]
    assert path.stat().st_size == side["bytes"] <= 25 * 2**20
    assert side["command"] == RETRAIN.format(profile="cifar10-cpu") and side["git_dirty"] is False
    assert [h["epoch"] for h in side["history"]] == list(range(1, cfg.pretrain.epochs + 1))

    model = build_backbone(cfg.model, cfg.data.num_classes, seed=0, device="cpu")
    assert len(model.blocks) == 12 and model.head.out_features == cfg.data.num_classes
    shipped = safetensors.torch.load_file(path)
    state = model.state_dict()
    assert not any(k.startswith("head.") for k in shipped)
    for key, value in shipped.items():
        assert torch.equal(state[key], value), key
    with pytest.raises(ValueError, match="checkpoint_sha256"):
        d = load_params(PARAMS / "cifar10-cpu.yml", check_data=False)
        d["model"]["checkpoint_sha256"] = "0" * 64
        build_backbone(Config.from_dict(d).model, 5, seed=0, device="cpu")
