"""lib.baselines.importance: AdaLoRA sensitivity, Fisher trace, gradient and update norms per
block against hand-worked values and torch.func per-example gradients; Kendall τ-b against scipy."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from conftest import TINY_VIT, make_lora_vit
from scipy.stats import kendalltau

from lib.baselines.importance import (
    adalora_sensitivity,
    fisher_and_gradient,
    importance_table,
    kendall_tau,
    kendall_tau_interval,
    update_norm,
)
from lib.model import fused_attention_off, lora_modules

RTOL = 1e-4  # float32 gradients accumulated in different orders


def _batch(n=6, seed=123):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, 16, 16, generator=gen), torch.randint(0, 4, (n,), generator=gen)


def _close(a, b, rtol=RTOL):
    return bool((a.double() - b.double()).abs().max() <= rtol * b.double().abs().max())


def test_update_norm_hand_worked():
    """A = 1, B = c_ℓ·1 in block ℓ: s·B A = s·c·r·1 (out × in), so
    U_ℓ = s·c_ℓ·r·√(Σ_maps out·in) with qkv 96×32, proj 32×32, fc1 128×32, fc2 32×128."""
    model = make_lora_vit(TINY_VIT, num_classes=4, r=2)
    c = [0.5, 0.0, 2.0]
    with torch.no_grad():
        for m in lora_modules(model):
            m.A.weight.fill_(1.0)
            m.B.weight.fill_(c[m.block])
    s = lora_modules(model)[0].scaling
    size = 96 * 32 + 32 * 32 + 128 * 32 + 32 * 128
    ref = torch.tensor([s * ci * 2 * math.sqrt(size) for ci in c], dtype=torch.float64)
    assert torch.allclose(update_norm(model), ref, rtol=1e-12)


def test_adalora_recursion_hand_worked():
    """Two minibatches: Ī₂ = β(1−β) I₁ + (1−β) I₂, Ū₂ = β·(1−β)·β I₁ + (1−β)|I₂ − Ī₂|, score Σ Ī₂ Ū₂,
    with I_t = |w ⊙ ∇L_t| from explicit autograd; a block whose B is 0 scores exactly 0."""
    model = make_lora_vit(TINY_VIT, num_classes=4, r=2)
    with torch.no_grad():
        for m in lora_modules(model):
            if m.block == 1:
                m.B.weight.zero_()
    b1, b2 = _batch(3, 1), _batch(3, 2)
    ours = adalora_sensitivity(model, [b1, b2])
    beta = 0.85
    mods = lora_modules(model)
    ws = [lin.weight for m in mods for lin in (m.A, m.B)]
    Is = []
    for x, y in (b1, b2):
        g = torch.autograd.grad(F.cross_entropy(model(x), y), ws)
        Is.append([(w.detach() * gi).abs().double() for w, gi in zip(ws, g)])
    ref = torch.zeros(3, dtype=torch.float64)
    for k, (i1, i2) in enumerate(zip(*Is)):
        ibar1 = (1 - beta) * i1
        ubar1 = (1 - beta) * (i1 - ibar1).abs()
        ibar2 = beta * ibar1 + (1 - beta) * i2
        ubar2 = beta * ubar1 + (1 - beta) * (i2 - ibar2).abs()
        ref[mods[k // 2].block] += (ibar2 * ubar2).sum()
    assert ours[1] == 0.0
    assert ref[0] > 0 and ref[2] > 0
    assert _close(ours, ref)


def test_fisher_and_gradient_match_per_example_torch_func():
    """Reference: per-example gradients by torch.func.vmap(grad) of functional_call."""
    model = make_lora_vit(TINY_VIT, num_classes=4, r=2)
    x, y = _batch()
    fisher, gnorm = fisher_and_gradient(model, [(x[:4], y[:4]), (x[4:], y[4:])])
    mods = lora_modules(model)
    names = {id(p): n for n, p in model.named_parameters()}
    ws = [lin.weight for m in mods for lin in (m.A, m.B)]
    keys = [names[id(w)] for w in ws]

    def loss(wts, xi, yi):
        out = torch.func.functional_call(model, dict(zip(keys, wts)), (xi[None],))
        return F.cross_entropy(out, yi[None])

    with fused_attention_off(model):
        g = torch.func.vmap(torch.func.grad(loss), in_dims=(None, 0, 0))([w.detach() for w in ws], x, y)
    ref_f = torch.zeros(3, dtype=torch.float64)
    ref_g = torch.zeros(3, dtype=torch.float64)
    for k, gk in enumerate(g):
        block = mods[k // 2].block
        ref_f[block] += (gk.double() ** 2).sum() / len(y)
        ref_g[block] += (gk.double().mean(0) ** 2).sum()
    assert _close(fisher, ref_f)
    assert _close(gnorm, ref_g.sqrt())


def test_kendall_tau_matches_scipy_with_ties():
    gen = torch.Generator().manual_seed(0)
    x = torch.randint(0, 4, (50, 7), generator=gen).double()
    y = torch.randint(0, 5, (50, 7), generator=gen).double()
    ours = kendall_tau(x, y)
    ref = torch.tensor([kendalltau(a.numpy(), b.numpy()).statistic for a, b in zip(x, y)], dtype=torch.float64)
    assert torch.allclose(ours, ref, atol=1e-12, equal_nan=True)
    assert float(kendall_tau(torch.tensor([1.0, 2, 3]), torch.tensor([3.0, 2, 1]))) == -1.0


def test_interval_and_table_hand_worked():
    """Replicates equal to the estimate: τ = 1 and the interval is [1, 1]. Four replicates of 3
    blocks whose τ against the score are 1, 1/3, −1/3, −1 (counted by hand): the interval is the
    2.5% and 97.5% quantiles of those four values."""
    score = torch.tensor([0.1, 0.2, 0.3])
    est = torch.tensor([1.0, 2.0, 3.0])
    assert kendall_tau_interval(score, est, est.expand(10, -1)) == (1.0, 1.0, 1.0)
    reps = torch.tensor([[1.0, 2, 3], [2.0, 1, 3], [3.0, 1, 2], [3.0, 2, 1]])
    taus = torch.tensor([1.0, 1 / 3, -1 / 3, -1.0], dtype=torch.float64)
    tau, lo, hi = kendall_tau_interval(score, est, reps)
    q = torch.quantile(taus, torch.tensor([0.025, 0.975], dtype=torch.float64))
    assert tau == 1.0 and lo == pytest.approx(float(q[0])) and hi == pytest.approx(float(q[1]))
    table = importance_table({"a": score, "b": -score}, est, reps)
    assert list(table.score) == ["a", "b"] and list(table.kendall_tau) == [1.0, -1.0]
    with pytest.raises(ValueError, match="delta_samples"):
        kendall_tau_interval(score, est, reps[:, :2])
