"""lib.model: LoRA placement, block index, trainable set, ViT split, checkpoints, seeding."""

from __future__ import annotations

import copy
import os
import re
from pathlib import Path

import pytest
import torch
from torch import nn

from lib.config import LoraConfig, ModelConfig
from lib.model import (
    add_lora,
    build_backbone,
    count_parameters,
    data_config,
    lora_block_index,
    lora_modules,
    n_blocks,
    fused_attention_off,
    set_fused_attention,
    unwrap,
    vit_parts,
)
from lib.paths import ROOT

pytestmark = pytest.mark.usefixtures("one_thread")

KW = dict(img_size=16, patch_size=4, embed_dim=32, depth=2, num_heads=2)
TINY = ModelConfig(name="vit_tiny_patch16_224", kwargs=KW)
TARGETS = {"attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2"}


def _lora_model(r: int = 2, alpha: float = 4.0, seed: int = 0, num_classes: int = 3) -> nn.Module:
    model = build_backbone(TINY, num_classes, seed=seed, device="cpu")
    model.requires_grad_(False)
    return add_lora(model, LoraConfig(r=r, alpha=alpha), seed=seed)


def _images(n: int = 4, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, 3, 16, 16, generator=torch.Generator().manual_seed(seed))


def _backbone_state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v for k, v in unwrap(model).state_dict().items() if not k.startswith("head.")}


def test_lora_targets_exactly_the_block_projections():
    model = _lora_model()
    adapted = {n for n, m in model.named_modules() if hasattr(m, "lora_A")}
    expected = {f"base_model.model.blocks.{b}.{t}" for b in range(2) for t in TARGETS}
    assert adapted == expected
    pe = unwrap(model).patch_embed.proj
    assert type(pe) is nn.Conv2d and not hasattr(pe, "lora_A")
    mods = lora_modules(model)
    # ordered by block, then by module name (attn.proj < attn.qkv < mlp.fc1 < mlp.fc2)
    assert [(m.block, m.kind) for m in mods] == [
        (b, k) for b in range(2) for k in ("proj", "qkv", "fc1", "fc2")
    ]
    for m in mods:
        assert m.A.weight.shape[0] == 2 and m.B.weight.shape[1] == 2
        assert m.scaling == pytest.approx(4.0 / 2)
        base = model.get_submodule(m.name).base_layer
        assert m.A.weight.shape[1] == base.in_features and m.B.weight.shape[0] == base.out_features


def test_lora_target_subset_and_unknown_target():
    model = build_backbone(TINY, 3, seed=0, device="cpu")
    model = add_lora(model, LoraConfig(r=2, targets=("qkv", "fc2")), seed=0)
    assert {m.kind for m in lora_modules(model)} == {"qkv", "fc2"} and len(lora_modules(model)) == 4
    with pytest.raises(ValueError, match="lora.targets"):
        add_lora(build_backbone(TINY, 3, seed=0, device="cpu"), LoraConfig(targets=("qkv", "patch_embed")), seed=0)


def test_only_lora_and_head_require_grad():
    model = _lora_model()
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable, "nothing trainable"
    for name in trainable:
        assert ".lora_A." in name or ".lora_B." in name or ".head.modules_to_save." in name, name
    assert sum(".head." in n for n in trainable) == 2  # head weight and bias
    assert sum(".lora_" in n for n in trainable) == 2 * 4 * 2
    counts = count_parameters(model)
    lora = sum(p.numel() for n, p in model.named_parameters() if ".lora_" in n)
    assert counts["lora"] == lora and counts["head"] == 3 * 32 + 3
    assert counts["total"] == counts["lora"] + counts["head"] + counts["frozen"]


def test_lora_block_index_covers_every_lora_parameter_once():
    model = _lora_model()
    index = lora_block_index(model)
    lora_names = [n for n, p in model.named_parameters() if p.requires_grad and ".lora_" in n]
    assert sorted(index) == sorted(lora_names) and len(lora_names) == len(set(lora_names))
    for name, block in index.items():
        assert int(re.search(r"\.blocks\.(\d+)\.", name).group(1)) == block
    assert sorted(set(index.values())) == [0, 1] and n_blocks(model) == 2


def test_add_lora_starts_at_the_backbone():
    backbone = build_backbone(TINY, 3, seed=0, device="cpu").eval()
    reference = copy.deepcopy(backbone)
    model = add_lora(backbone, LoraConfig(r=2), seed=5).eval()
    for m in lora_modules(model):
        assert torch.count_nonzero(m.B.weight) == 0
        assert torch.count_nonzero(m.A.weight) == m.A.weight.numel()
    x = _images()
    with torch.no_grad():
        assert torch.equal(model(x), reference(x))
    # A is drawn from the seed: reproducible, and different for another seed
    again = add_lora(copy.deepcopy(reference), LoraConfig(r=2), seed=5)
    other = add_lora(copy.deepcopy(reference), LoraConfig(r=2), seed=6)
    a, b, c = (lora_modules(m)[0].A.weight for m in (model, again, other))
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_vit_parts_recompose_the_model(tiny_lora_vit, tiny_batch):
    x, _ = tiny_batch
    parts = vit_parts(tiny_lora_vit)
    assert len(parts.blocks) == 3
    with torch.no_grad():
        h = parts.embed(x)
        assert h.shape == (6, 17, 32)
        for block in parts.blocks:
            h = block(h)
        assert torch.equal(parts.head(h), tiny_lora_vit(x))
    # the LoRA adapters are inside the blocks used by the split (not bypassed)
    with torch.no_grad():
        lora_modules(tiny_lora_vit)[0].B.weight.mul_(3)
        h = parts.embed(x)
        for block in parts.blocks:
            h = block(h)
        assert torch.equal(parts.head(h), tiny_lora_vit(x))


def test_build_backbone_is_deterministic_and_leaves_global_rng_alone():
    state = torch.random.get_rng_state()
    a = build_backbone(TINY, 3, seed=1, device="cpu", init_seed=0).state_dict()
    assert torch.equal(torch.random.get_rng_state(), state)
    b = build_backbone(TINY, 3, seed=1, device="cpu", init_seed=0).state_dict()
    c = build_backbone(TINY, 3, seed=2, device="cpu", init_seed=0).state_dict()
    d = build_backbone(TINY, 3, seed=1, device="cpu", init_seed=9).state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    backbone = [k for k in a if not k.startswith("head.")]
    # seed draws only the head; init_seed only the backbone
    assert all(torch.equal(a[k], c[k]) for k in backbone)
    assert not torch.equal(a["head.weight"], c["head.weight"])
    assert torch.equal(a["head.weight"], d["head.weight"])
    assert not torch.equal(a["blocks.0.attn.qkv.weight"], d["blocks.0.attn.qkv.weight"])


def test_checkpoint_loads_backbone_and_reinitialises_head(tmp_path):
    source = build_backbone(TINY, 3, seed=4, device="cpu", init_seed=7)
    path = tmp_path / "backbone.pt"
    torch.save(source.state_dict(), path)
    cfg = ModelConfig(name=TINY.name, checkpoint=str(path), kwargs=KW)
    loaded = build_backbone(cfg, 3, seed=0, device="cpu")
    fresh = build_backbone(TINY, 3, seed=0, device="cpu")  # init_seed 0: a different backbone
    src, got = source.state_dict(), loaded.state_dict()
    for k in _backbone_state(source):
        assert torch.equal(got[k], src[k]), k
    assert not torch.equal(got["blocks.0.mlp.fc1.weight"], fresh.state_dict()["blocks.0.mlp.fc1.weight"])
    # the head is the seed-0 fresh head, not the checkpoint's (same shape) head
    assert torch.equal(got["head.weight"], fresh.state_dict()["head.weight"])
    assert not torch.equal(got["head.weight"], src["head.weight"])
    # a head of another size in the checkpoint and a {"state_dict": ...} wrapper are fine too
    wrapped = tmp_path / "wrapped.pt"
    torch.save({"state_dict": build_backbone(TINY, 10, seed=0, device="cpu", init_seed=7).state_dict()}, wrapped)
    other = build_backbone(ModelConfig(name=TINY.name, checkpoint=str(wrapped), kwargs=KW), 3, seed=0, device="cpu")
    assert torch.equal(other.state_dict()["pos_embed"], src["pos_embed"])


def test_relative_checkpoint_resolves_against_repo_root(tmp_path):
    path = tmp_path / "rel.pt"
    torch.save(build_backbone(TINY, 3, seed=0, device="cpu", init_seed=3).state_dict(), path)
    rel = os.path.relpath(path, ROOT)
    assert not Path(rel).is_absolute()
    model = build_backbone(ModelConfig(name=TINY.name, checkpoint=str(rel), kwargs=KW), 3, seed=0, device="cpu")
    assert torch.equal(model.cls_token, torch.load(path)["cls_token"])


def test_missing_checkpoint_names_the_key(tmp_path):
    cfg = ModelConfig(name=TINY.name, checkpoint=str(tmp_path / "absent.pt"), kwargs=KW)
    with pytest.raises(FileNotFoundError, match=r"model\.checkpoint .*absent\.pt"):
        build_backbone(cfg, 3, seed=0, device="cpu")


@pytest.mark.parametrize("other", [dict(KW, depth=3), dict(KW, embed_dim=48), dict(KW, patch_size=8)])
def test_checkpoint_of_another_architecture_is_a_value_error(tmp_path, other):
    path = tmp_path / "other.pt"
    torch.save(build_backbone(ModelConfig(name=TINY.name, kwargs=other), 3, seed=0, device="cpu").state_dict(), path)
    with pytest.raises(ValueError, match=r"model\.checkpoint .* does not fit"):
        build_backbone(ModelConfig(name=TINY.name, checkpoint=str(path), kwargs=KW), 3, seed=0, device="cpu")


def test_data_config_reports_the_input_size():
    assert data_config(_lora_model())["input_size"] == (3, 16, 16)
    wide = build_backbone(ModelConfig(name=TINY.name, kwargs=dict(KW, img_size=(16, 24))), 3, seed=0, device="cpu")
    dc = data_config(wide)
    assert dc["input_size"] == (3, 16, 24)
    assert len(dc["mean"]) == 3 and len(dc["std"]) == 3 and dc["interpolation"] in ("bicubic", "bilinear")


def test_set_fused_attention_toggles_every_attention_module(tiny_lora_vit, tiny_batch):
    attn = [m for m in unwrap(tiny_lora_vit).modules() if hasattr(m, "fused_attn")]
    assert len(attn) == 3
    x, _ = tiny_batch
    with torch.no_grad():
        set_fused_attention(tiny_lora_vit, False)
        assert all(m.fused_attn is False for m in attn)
        eager = tiny_lora_vit(x)
        set_fused_attention(tiny_lora_vit, True)
        assert all(m.fused_attn is True for m in attn)
        fused = tiny_lora_vit(x)
    assert torch.allclose(eager, fused, atol=1e-5)


def test_fused_attention_off_restores_each_module_also_on_error(tiny_lora_vit):
    attn = [m for m in unwrap(tiny_lora_vit).modules() if hasattr(m, "fused_attn")]
    attn[0].fused_attn = False
    before = [m.fused_attn for m in attn]
    assert any(before)
    with pytest.raises(RuntimeError), fused_attention_off(tiny_lora_vit):
        assert not any(m.fused_attn for m in attn)
        raise RuntimeError("body failed")
    assert [m.fused_attn for m in attn] == before
