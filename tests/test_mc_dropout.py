"""lib.baselines.mc_dropout: the dropout copy of a MAP model equals it without dropout, p = 0 equals
MAP, passes differ and average out as 1/K, determinism under the seed, and only the LoRA dropout
modules run in train mode."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from conftest import TINY_VIT

from lib.baselines.mc_dropout import (
    lora_dropout_modules,
    lora_dropout_on,
    mc_dropout_probs,
    mc_dropout_samples,
    with_lora_dropout,
)
from lib.config import LoraConfig
from lib.data import Preprocess, Split
from lib.model import add_lora, build_backbone, data_config, lora_modules
from lib.train import predict_logits

TIMM_DROPOUT = dict(drop_rate=0.5, proj_drop_rate=0.5, attn_drop_rate=0.5, drop_path_rate=0.5)


def _model(rate: float, timm_dropout: bool = False) -> torch.nn.Module:
    cfg = TINY_VIT if not timm_dropout else dataclasses.replace(TINY_VIT, kwargs={**TINY_VIT.kwargs, **TIMM_DROPOUT})
    model = add_lora(build_backbone(cfg, 4, seed=0, device="cpu"), LoraConfig(r=2), seed=0)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for m in lora_modules(model):
            m.B.weight.copy_(0.3 * torch.randn(m.B.weight.shape, generator=gen))
    return (with_lora_dropout(model, rate) if rate > 0 else model).eval()


def _split(n: int = 6) -> Split:
    gen = torch.Generator().manual_seed(3)
    return Split(torch.randint(0, 256, (n, 3, 16, 16), generator=gen, dtype=torch.uint8), torch.zeros(n, dtype=torch.int64))


def test_rate_zero_equals_map_with_timm_dropout_configured():
    """LoRA dropout modules in train mode at p = 0 (and timm dropout 0.5 configured but kept in
    eval mode): the K-pass mean is the MAP softmax."""
    model = _model(0.2, timm_dropout=True)
    for d in lora_dropout_modules(model):
        d.p = 0.0
    pre = Preprocess.from_data_config(data_config(model))
    split = _split()
    mc = mc_dropout_probs(model, split, samples=4, seed=0, preprocess=pre, device="cpu", batch_size=3)
    ref = predict_logits(model, split, preprocess=pre, device=torch.device("cpu"), batch_size=3).softmax(-1)
    assert torch.allclose(mc, ref, atol=1e-6)


def test_only_lora_dropout_is_in_train_mode():
    model = _model(0.2, timm_dropout=True)
    drops = {id(d) for d in lora_dropout_modules(model)}
    assert len(drops) == 3 * 4  # 3 blocks × qkv, proj, fc1, fc2
    seen = {}
    hooks = [m.register_forward_pre_hook(lambda mod, _: seen.__setitem__(id(mod), mod.training)) for m in model.modules()]
    x = Preprocess.from_data_config(data_config(model))(_split().x)
    mc_dropout_samples(model, x, samples=1, seed=0)
    for h in hooks:
        h.remove()
    assert {k for k, v in seen.items() if v} == drops
    assert not any(m.training for m in model.modules())  # restored


def test_passes_differ_and_are_deterministic():
    model = _model(0.3)
    x = Preprocess.from_data_config(data_config(model))(_split().x)
    s = mc_dropout_samples(model, x, samples=3, seed=5)
    assert s.shape == (3, 6, 4)
    assert (s[0] - s[1]).abs().max() > 1e-3
    assert torch.equal(s, mc_dropout_samples(model, x, samples=3, seed=5))
    assert not torch.equal(s, mc_dropout_samples(model, x, samples=3, seed=6))
    state = torch.random.get_rng_state()
    mc_dropout_samples(model, x, samples=2, seed=5)
    assert torch.equal(state, torch.random.get_rng_state())  # the global stream is left as found


def test_variance_of_the_mean_shrinks_as_one_over_k():
    """Var of means of K = 8 passes ≈ Var(one pass) / 8, from 1024 seeded passes (128 groups):
    Σ_entries 8·Var(mean) / Σ_entries Var(pass) ∈ [0.7, 1.4] (about ±2.5 standard errors)."""
    model = _model(0.3)
    x = Preprocess.from_data_config(data_config(model))(_split().x)
    s = mc_dropout_samples(model, x, samples=1024, seed=0).double()
    one = s.var(0, unbiased=True).sum()
    means = s.reshape(128, 8, *s.shape[1:]).mean(1)
    ratio = float(8 * means.var(0, unbiased=True).sum() / one)
    assert 0.7 <= ratio <= 1.4, ratio
    assert (s[:8].mean(0) - s.mean(0)).abs().max() > (s[:512].mean(0) - s.mean(0)).abs().max()


def test_batched_predictive_is_the_mean_of_passes():
    model = _model(0.3)
    pre = Preprocess.from_data_config(data_config(model))
    split = _split()
    probs = mc_dropout_probs(model, split, samples=5, seed=2, preprocess=pre, device="cpu", batch_size=6)
    ref = mc_dropout_samples(model, pre(split.x), samples=5, seed=2).mean(0)
    assert torch.allclose(probs, ref, atol=1e-6)
    assert torch.allclose(probs.sum(-1), torch.ones(6), atol=1e-6)


def test_errors_and_config():
    model = _model(0.0)
    assert lora_dropout_modules(model) == []
    with pytest.raises(ValueError, match="no LoRA dropout"):
        mc_dropout_probs(model, _split(), samples=2, seed=0, preprocess=Preprocess.from_data_config(data_config(model)), device="cpu")
    with pytest.raises(ValueError, match="rate is 1.0"):
        with_lora_dropout(model, 1.0)
    with lora_dropout_on(_model(0.1)) as drops:
        assert all(d.training for d in drops)


def test_with_lora_dropout_is_a_copy_with_dropout_on_every_lora_input():
    """The copy has one nn.Dropout(p) per LoRA map, equals the MAP model in eval mode, differs
    from it with dropout on, and leaves the MAP model (no dropout modules) untouched."""
    base = _model(0.0)
    model = with_lora_dropout(base, 0.3)
    drops = lora_dropout_modules(model)
    assert len(drops) == 3 * 4 and all(d.p == 0.3 for d in drops) and lora_dropout_modules(base) == []
    pre = Preprocess.from_data_config(data_config(model))
    x = pre(_split().x)
    with torch.no_grad():
        ref = base(x)
        assert torch.equal(model.eval()(x), ref)
        with lora_dropout_on(model):
            assert (model(x) - ref).abs().max() > 1e-3
    a = [p for p in model.parameters() if p.requires_grad]
    b = [p for p in base.parameters() if p.requires_grad]
    assert len(a) == len(b) and all(torch.equal(p, q) and p is not q for p, q in zip(a, b))
