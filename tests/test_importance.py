"""lib.baselines.importance: the bias-corrected AdaLoRA sensitivity (hand-worked recursion, the
constant-gradient case where the uncorrected score is 0.33·I), its per-rank aggregation, the Fisher
trace against torch.func per-example gradients, the update norm by hand; Kendall τ-b and its
interval against scipy."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from conftest import TINY_VIT, make_lora_vit
from scipy.stats import kendalltau

from lib.baselines.importance import (
    ADALORA_BETA,
    adalora_rank_scores,
    adalora_sensitivity,
    fisher_trace,
    importance_table,
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


def _sensitivities(model, batches):
    mods = lora_modules(model)
    ws = [lin.weight for m in mods for lin in (m.A, m.B)]
    out = []
    for x, y in batches:
        g = torch.autograd.grad(F.cross_entropy(model(x), y), ws)
        out.append([(w.detach() * gi).abs().double() for w, gi in zip(ws, g)])
    return mods, out


def test_adalora_recursion_hand_worked():
    """Two minibatches: Ī₁ = (1−β)I₁, Î₁ = I₁, Ū₁ = 0; Ī₂ = βĪ₁ + (1−β)I₂, Î₂ = Ī₂/(1−β²),
    Ū₂ = (1−β)|I₂ − Î₂|, Û₂ = Ū₂/(1−β²); entry score Î₂Û₂; rank k of a map scores the mean over
    B's column k plus the mean over A's row k; a block sums its ranks. A block whose B is 0 scores 0."""
    model = make_lora_vit(TINY_VIT, num_classes=4, r=2)
    with torch.no_grad():
        for m in lora_modules(model):
            if m.block == 1:
                m.B.weight.zero_()
    b1, b2 = _batch(3, 1), _batch(3, 2)
    ranks = adalora_rank_scores(model, [b1, b2])
    blocks = adalora_sensitivity(model, [b1, b2])
    beta = ADALORA_BETA
    mods, (s1, s2) = _sensitivities(model, [b1, b2])
    ref_blocks = torch.zeros(3, dtype=torch.float64)
    for k, m in enumerate(mods):
        entry = []
        for i1, i2 in ((s1[2 * k], s2[2 * k]), (s1[2 * k + 1], s2[2 * k + 1])):  # A, then B
            i_hat = (beta * (1 - beta) * i1 + (1 - beta) * i2) / (1 - beta**2)
            u_hat = (1 - beta) * (i2 - i_hat).abs() / (1 - beta**2)
            entry.append(i_hat * u_hat)
        ref = entry[0].mean(1) + entry[1].mean(0)  # A (r, d_in): rows; B (d_out, r): columns
        assert ranks[m.name].shape == (2,) and _close(ranks[m.name], ref), m.name
        ref_blocks[m.block] += ref.sum()
    assert blocks[1] == 0.0 and ref_blocks[0] > 0 and ref_blocks[2] > 0
    assert _close(blocks, ref_blocks)


def test_adalora_uncertainty_is_zero_for_noise_free_gradients():
    """The same minibatch T = 8 times (a constant sensitivity I per entry): the corrected Û is 0, so
    the score is 0 up to float32 rounding, where the uncorrected Ū_T = (1−β)·T·β^T·I = 0.327·I
    (Σ_t (1−β) β^{T−t} |I − (1−β^t) I|, summed by hand) would give 0.327·Σ I²."""
    model = make_lora_vit(TINY_VIT, num_classes=4, r=2)
    batch = _batch(4, 7)
    ours = adalora_sensitivity(model, [batch] * 8)
    _, (sens,) = _sensitivities(model, [batch])
    beta, T = ADALORA_BETA, 8
    factor = sum((1 - beta) * beta ** (T - t) * beta**t for t in range(1, T + 1))
    assert abs(factor - 0.15 * 8 * 0.85**8) < 1e-12 and abs(factor - 0.327) < 1e-3
    mods = lora_modules(model)
    uncorrected = torch.zeros(3, dtype=torch.float64)
    for k, m in enumerate(mods):
        i_bar = (1 - beta**T) * sens[2 * k], (1 - beta**T) * sens[2 * k + 1]
        uncorrected[m.block] += (i_bar[0] * factor * sens[2 * k]).mean(1).sum() \
            + (i_bar[1] * factor * sens[2 * k + 1]).mean(0).sum()
    assert (uncorrected > 0).all()
    assert (ours.abs() <= 1e-5 * uncorrected).all(), (ours, uncorrected)


def test_fisher_trace_matches_per_example_torch_func():
    """Reference: per-example gradients by torch.func.vmap(grad) of functional_call."""
    model = make_lora_vit(TINY_VIT, num_classes=4, r=2)
    x, y = _batch()
    fisher = fisher_trace(model, [(x[:4], y[:4]), (x[4:], y[4:])])
    mods = lora_modules(model)
    names = {id(p): n for n, p in model.named_parameters()}
    ws = [lin.weight for m in mods for lin in (m.A, m.B)]
    keys = [names[id(w)] for w in ws]

    def loss(wts, xi, yi):
        out = torch.func.functional_call(model, dict(zip(keys, wts)), (xi[None],))
        return F.cross_entropy(out, yi[None])

    with fused_attention_off(model):
        g = torch.func.vmap(torch.func.grad(loss), in_dims=(None, 0, 0))([w.detach() for w in ws], x, y)
    ref = torch.zeros(3, dtype=torch.float64)
    for k, gk in enumerate(g):
        ref[mods[k // 2].block] += (gk.double() ** 2).sum() / len(y)
    assert _close(fisher, ref)
    with pytest.raises(ValueError, match="empty"):
        fisher_trace(model, [])


def test_interval_against_scipy_replicate_by_replicate():
    """τ-b of the score with ΔECE by scipy (ties in the score), and the interval as the 2.5 % and
    97.5 % quantiles of scipy's τ-b over the replicates."""
    gen = torch.Generator().manual_seed(0)
    score = torch.tensor([3.0, 1.0, 1.0, 4.0, 0.5, 2.0, 2.0, 5.0])
    est = torch.randn(8, generator=gen, dtype=torch.float64)
    reps = est + 0.5 * torch.randn(200, 8, generator=gen, dtype=torch.float64)
    tau, lo, hi = kendall_tau_interval(score, est, reps, alpha=0.1)
    assert abs(tau - kendalltau(score.numpy(), est.numpy()).statistic) < 1e-12
    ref = torch.tensor([kendalltau(score.numpy(), r.numpy()).statistic for r in reps], dtype=torch.float64)
    q = torch.quantile(ref, torch.tensor([0.05, 0.95], dtype=torch.float64))
    assert abs(lo - float(q[0])) < 1e-12 and abs(hi - float(q[1])) < 1e-12 and lo < tau < hi


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
