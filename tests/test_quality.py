"""lib.laplace.quality: metrics against hand-worked values and torch.distributions, and the table
on the tiny LoRA ViT (exact against itself; the K-FAC-reduce MLP undercount)."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch
from torch.distributions import MultivariateNormal, kl_divergence

from lib.laplace.exact import fit_block_ggn
from lib.laplace.quality import (
    APPROXIMATIONS,
    compare_block,
    frobenius_error,
    gaussian_kls,
    logit_variance,
    pearson,
    prepare_curvature_quality,
    summarise_quality,
    trace_ratio,
)


def gaussian_kl(p: torch.Tensor, q: torch.Tensor) -> float:
    return gaussian_kls(p, q)[0]


def scaled_gaussian_kl(p: torch.Tensor, q: torch.Tensor) -> float:
    return gaussian_kls(p, q)[1]


def _spd(p: int, seed: int) -> torch.Tensor:
    g = torch.randn(p, p + 3, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    return g @ g.T / p


def test_metrics_hand_worked_and_torch_distributions():
    """trace ratio and Frobenius error of diag(2, 4) against diag(1, 3); KL against torch.distributions;
    logit variance against a loop over images."""
    a, e = torch.diag(torch.tensor([2.0, 4.0])), torch.diag(torch.tensor([1.0, 3.0]))
    assert trace_ratio(a, e) == pytest.approx(6 / 4, rel=1e-12)
    assert frobenius_error(a, e) == pytest.approx((2 / 10) ** 0.5, rel=1e-12)
    p, q = _spd(6, 0) + 0.1 * torch.eye(6, dtype=torch.float64), _spd(6, 1) + 0.1 * torch.eye(6, dtype=torch.float64)
    ref = kl_divergence(MultivariateNormal(torch.zeros(6, dtype=torch.float64), p),
                        MultivariateNormal(torch.zeros(6, dtype=torch.float64), q))
    assert gaussian_kl(p, q) == pytest.approx(float(ref), rel=1e-10)
    assert gaussian_kl(p, p) == pytest.approx(0.0, abs=1e-12)
    jac = torch.randn(5, 3, 6, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    loop = torch.stack([torch.trace(j @ p @ j.T) for j in jac])
    assert torch.allclose(logit_variance(jac, p), loop, rtol=1e-12)


def test_scaled_kl_minimises_the_kl_over_one_scale():
    """min_c KL(N(0, c p) ‖ N(0, q)) against a dense grid of c around the closed-form c = P / tr(q⁻¹ p);
    0 for p = 3 q; never above the unscaled KL. Pearson correlation against numpy."""
    p, q = _spd(5, 7) + 0.1 * torch.eye(5, dtype=torch.float64), _spd(5, 8) + 0.1 * torch.eye(5, dtype=torch.float64)
    c_star = 5 / float(torch.trace(torch.linalg.solve(q, p)))
    grid = [c_star * (1 + x / 1000) for x in range(-300, 301)]
    brute = min(gaussian_kl(c * p, q) for c in grid)
    assert scaled_gaussian_kl(p, q) == pytest.approx(brute, rel=1e-6)
    assert scaled_gaussian_kl(p, q) < gaussian_kl(p, q)
    assert scaled_gaussian_kl(3 * q, q) == pytest.approx(0.0, abs=1e-12) and gaussian_kl(3 * q, q) > 1.0
    a, b = torch.tensor([1.0, 2.0, 4.0, 3.0]), torch.tensor([2.0, 1.0, 5.0, 5.0])
    assert pearson(a, b) == pytest.approx(float(np.corrcoef(a.numpy(), b.numpy())[0, 1]), rel=1e-12)


def test_twice_the_exact_covariance_is_perfect_once_scale_free():
    """An approximation whose posterior covariance is 2Σ (precision (G + δI)/2) has a positive KL
    and logit-variance ratio 2, but kl_scaled = 0 and logit_variance_corr = 1 for every module and
    the block: the scale that κ_S tunes away."""
    g, delta = _spd(10, 9), 0.5
    eye = torch.eye(10, dtype=torch.float64)
    half = (g + delta * eye) / 2 - delta * eye
    jac = torch.randn(6, 3, 10, generator=torch.Generator().manual_seed(10), dtype=torch.float64)
    for r in compare_block(g, {"half": half}, {"a": slice(0, 4), "b": slice(4, 10)}, delta, jac):
        assert r["kl"] > 0.1
        assert r["kl_scaled"] == pytest.approx(0.0, abs=1e-9)
        assert r["logit_variance_ratio"] == pytest.approx(2.0, rel=1e-10)
        assert r["logit_variance_corr"] == pytest.approx(1.0, abs=1e-12)


def test_exact_against_itself_is_perfect():
    """Comparing a matrix with itself: trace ratios 1, Frobenius error 0, KL 0, variance ratio 1."""
    g = _spd(10, 3)
    jac = torch.randn(4, 3, 10, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    rows = compare_block(g, {"self": g.clone()}, {"a": slice(0, 4), "b": slice(4, 10)}, 0.5, jac)
    assert [r["module"] for r in rows] == ["a", "b", "block"] and [r["n_params"] for r in rows] == [4, 6, 10]
    for r in rows:
        assert r["trace_ratio"] == pytest.approx(1.0, abs=1e-12)
        assert r["frobenius_error"] == pytest.approx(0.0, abs=1e-12)
        assert r["kl"] == pytest.approx(0.0, abs=1e-9) and r["kl_scaled"] == pytest.approx(0.0, abs=1e-9)
        assert r["logit_variance_ratio"] == pytest.approx(1.0, abs=1e-10)
        assert r["logit_variance_error"] == pytest.approx(0.0, abs=1e-10)
        assert r["logit_variance_corr"] == pytest.approx(1.0, abs=1e-12)


def test_block_diagonal_approximation_is_detected():
    """Dropping the off-diagonal coupling of a block leaves module traces at 1 but gives a
    positive block Frobenius error equal to ‖off-diagonal‖_F / ‖G‖_F, and a positive KL equal to
    the dense KL of the two covariances; computing the approximation part by part (``parts``)
    gives the same rows as the dense computation."""
    g = _spd(8, 5)
    s = {"a": slice(0, 3), "b": slice(3, 8)}
    approx = torch.block_diag(g[s["a"], s["a"]], g[s["b"], s["b"]])
    jac = torch.randn(4, 2, 8, generator=torch.Generator().manual_seed(6), dtype=torch.float64)
    dense = compare_block(g, {"bd": approx}, s, 1.0, jac)
    rows = {r["module"]: r for r in dense}
    off = torch.linalg.matrix_norm(g - approx) / torch.linalg.matrix_norm(g)
    assert rows["block"]["trace_ratio"] == pytest.approx(1.0, abs=1e-12)
    assert rows["block"]["frobenius_error"] == pytest.approx(float(off), rel=1e-10) and float(off) > 0.1
    assert rows["a"]["frobenius_error"] == pytest.approx(0.0, abs=1e-12)
    eye = torch.eye(8, dtype=torch.float64)
    ref_kl = gaussian_kl(torch.linalg.inv(approx + eye), torch.linalg.inv(g + eye))
    assert rows["block"]["kl"] == pytest.approx(ref_kl, rel=1e-9) and ref_kl > 1e-3
    by_parts = compare_block(g, {"bd": approx}, s, 1.0, jac, parts=[slice(0, 3), slice(3, 8)])
    for r, q in zip(dense, by_parts):
        assert r.keys() == q.keys()
        for k in r:
            assert r[k] == (pytest.approx(q[k], rel=1e-9, abs=1e-12) if isinstance(r[k], float) else q[k])


def test_reduce_undercounts_mlp_on_tiny_vit(tiny_lora_vit, tiny_batch, one_thread):
    """On the tiny LoRA ViT (17 tokens, B off zero) the table finds K-FAC-reduce's undercount of
    the MLP curvature: in the last block the reduce trace ratio of fc1 and fc2 is below 0.5 while
    that of qkv and proj is within [0.7, 1.3]; the diagonal GGN's module traces are exact (ratio 1
    to fp32 accumulation). The prior precision is the exact posterior's evidence maximiser."""
    x, y = tiny_batch
    fit = [(x[:3], y[:3]), (x[3:], y[3:])]
    df = prepare_curvature_quality(tiny_lora_vit, fit, [(x[:4], y[:4])], device="cpu", n_data=60, blocks=[2])
    assert set(df.approximation) == set(APPROXIMATIONS) and set(df.block) == {2}
    ratio = df.set_index(["approximation", "module"]).trace_ratio
    for m in ("fc1", "fc2"):
        assert ratio["K-FAC-reduce", m] < 0.5, m
    for m in ("qkv", "proj"):
        assert 0.7 < ratio["K-FAC-reduce", m] < 1.3, m
    assert (ratio["diagonal"] - 1).abs().max() < 1e-5
    exact = fit_block_ggn(tiny_lora_vit, fit, device="cpu", blocks=[2], dtype=torch.float64).scaled(60)
    delta = df.prior_precision.iloc[0]
    post_eigs = torch.linalg.eigvalsh(exact.ggn[2])
    theta = torch.cat([w.reshape(-1) for n, pair in exact.mean.items() if exact.blocks[n] == 2 for w in pair]).double()
    # MacKay's fixed point δ ‖θ‖² = Σ λ/(λ + δ) at the evidence maximiser
    assert float(delta * theta @ theta) == pytest.approx(float((post_eigs / (post_eigs + delta)).sum()), rel=1e-6)


def test_bad_arguments():
    g = _spd(4, 0)
    jac = torch.zeros(2, 2, 4, dtype=torch.float64)
    with pytest.raises(ValueError, match="same square shape"):
        compare_block(g, {"x": g[:3, :3]}, {}, 1.0, jac)
    with pytest.raises(ValueError, match="jac has 3"):
        compare_block(g, {"x": g}, {}, 1.0, jac[..., :3])
    with pytest.raises(ValueError, match="delta"):
        compare_block(g, {"x": g}, {}, 0.0, jac)
    with pytest.raises(ValueError, match="zero outside"):
        compare_block(g, {"x": g}, {}, 1.0, jac, parts=[slice(0, 2), slice(2, 4)])


def test_summary_medians_and_order():
    """Medians over blocks, the trace-ratio range, approximations and modules in the fixed order."""
    rows = []
    for b, tr in enumerate([0.5, 2.0, 1.0]):
        for a in ("diagonal", "K-FAC-reduce"):
            for m in ("block", "fc1", "qkv"):
                rows.append({"block": b, "module": m, "approximation": a, "n_params": 1, "prior_precision": 1.0,
                             "trace_ratio": tr, "frobenius_error": b, "kl": 2 * b, "kl_scaled": b / 2,
                             "logit_variance_ratio": 1.0, "logit_variance_error": 0.0, "logit_variance_corr": 0.9})
    s = summarise_quality(pd.DataFrame(rows))
    assert list(s.index) == [(a, m) for a in ("K-FAC-reduce", "diagonal") for m in ("qkv", "fc1", "block")]
    assert (s.trace_ratio == 1.0).all() and (s.trace_ratio_min == 0.5).all() and (s.trace_ratio_max == 2.0).all()
    assert (s.frobenius_error == 1.0).all() and (s.kl == 2.0).all() and (s.kl_scaled == 0.5).all()
    assert (s.logit_variance_corr == 0.9).all()
    with pytest.raises(ValueError, match="kl"):
        summarise_quality(pd.DataFrame(rows).drop(columns="kl"))
