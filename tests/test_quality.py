"""lib.laplace.quality: the low-rank comparison against the dense one it replaced (kept here as
the reference), the reference's metrics against hand-worked values and torch.distributions, and
the table on the tiny LoRA ViT (K-FAC-reduce's MLP undercount)."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch
from torch.distributions import MultivariateNormal, kl_divergence

from lib.laplace.curvature import fit_diag, fit_kron
from lib.laplace.exact import fit_block_ggn, weight_slices
from lib.laplace.posterior import DiagPosterior, KronPosterior
from lib.laplace.quality import (
    APPROXIMATIONS,
    compare_block,
    logit_variance,
    pearson,
    prepare_curvature_quality,
    summarise_quality,
    weight_ggn,
)

# -- the dense reference: lib.laplace.quality.compare_block before the low-rank rewrite ------------------


def trace_ratio(approx: torch.Tensor, exact: torch.Tensor) -> float:
    """``tr(approx) / tr(exact)`` of two square matrices (P, P)."""
    return float(approx.double().diagonal().sum() / exact.double().diagonal().sum())


def frobenius_error(approx: torch.Tensor, exact: torch.Tensor) -> float:
    """``‖approx − exact‖_F / ‖exact‖_F``."""
    return float(torch.linalg.matrix_norm(approx.double() - exact.double()) / torch.linalg.matrix_norm(exact.double()))


def _kls(trace, logdet, p):
    return float(0.5 * (trace - p + logdet)), float(0.5 * (p * torch.log(trace / p) + logdet))


def gaussian_kls(cov_p: torch.Tensor, cov_q: torch.Tensor) -> tuple[float, float]:
    """``(KL(N(0, cov_p) ‖ N(0, cov_q)), min_c KL(N(0, c cov_p) ‖ N(0, cov_q)))`` by Cholesky factors."""
    lp = torch.linalg.cholesky(cov_p.double())
    lq = torch.linalg.cholesky(cov_q.double())
    m = torch.linalg.solve_triangular(lq, lp, upper=False)
    return _kls(m.square().sum(), 2 * (lq.diagonal().log().sum() - lp.diagonal().log().sum()), cov_p.shape[0])


def _inverse(prec, parts):
    if parts is None:
        chol = torch.linalg.cholesky(prec)
        return torch.cholesky_inverse(chol), 2 * chol.diagonal().log().sum()
    cov = torch.zeros_like(prec)
    logdet = torch.zeros((), dtype=prec.dtype)
    for s in parts:
        chol = torch.linalg.cholesky(prec[s, s])
        cov[s, s] = torch.cholesky_inverse(chol)
        logdet = logdet + 2 * chol.diagonal().log().sum()
    return cov, logdet


def dense_compare_block(exact, approx, slices, delta, jac, parts=None):
    """The dense P × P computation of every column (exact GGN ``exact``, approximations ``approx`` (P, P))."""
    p = exact.shape[0]
    eye = torch.eye(p, dtype=torch.float64)
    prec_e = exact.double() + delta * eye
    cov_e, logdet_e = _inverse(prec_e, None)
    full = slice(0, p)
    rows = []
    for name, a in approx.items():
        cov_a, logdet_a = _inverse(a.double() + delta * eye, parts)
        for label, s in [*slices.items(), ("block", full)]:
            v_e = logit_variance(jac[..., s], cov_e[s, s])
            v_a = logit_variance(jac[..., s], cov_a[s, s])
            ratio = v_a / v_e
            kl, kl_scaled = (_kls((prec_e * cov_a).sum(), logdet_a - logdet_e, p) if s == full
                             else gaussian_kls(cov_a[s, s], cov_e[s, s]))
            rows.append({
                "approximation": name, "module": label, "n_params": s.stop - s.start,
                "trace_ratio": trace_ratio(a[s, s], exact[s, s]),
                "frobenius_error": frobenius_error(a[s, s], exact[s, s]),
                "kl": kl, "kl_scaled": kl_scaled,
                "logit_variance_ratio": float(ratio.mean()),
                "logit_variance_error": float((ratio - 1).abs().mean()),
                "logit_variance_corr": pearson(v_a, v_e),
            })
    return rows


# -----------------------------------------------------------------------------------------------------------


def gaussian_kl(p: torch.Tensor, q: torch.Tensor) -> float:
    return gaussian_kls(p, q)[0]


def scaled_gaussian_kl(p: torch.Tensor, q: torch.Tensor) -> float:
    return gaussian_kls(p, q)[1]


def _spd(p: int, seed: int) -> torch.Tensor:
    g = torch.randn(p, p + 3, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    return g @ g.T / p


def test_metrics_hand_worked_and_torch_distributions():
    """The dense reference's trace ratio and Frobenius error of diag(2, 4) against diag(1, 3) and its KL
    against torch.distributions; lib's
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


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _block_diagonal_rows(sizes: list[int], n_rows: int, seed: int) -> torch.Tensor:
    """Rows (n_rows · len(sizes), Σ sizes) of which each group of ``n_rows`` touches one part only,
    so that ``G = rowsᵀ rows`` is block-diagonal over the parts."""
    return torch.block_diag(*[torch.randn(n_rows, s, generator=_gen(seed + i), dtype=torch.float64)
                              for i, s in enumerate(sizes)])


def _tiles(sizes: list[int]) -> list[slice]:
    ends = np.cumsum([0, *sizes])
    return [slice(int(a), int(b)) for a, b in zip(ends[:-1], ends[1:])]


def test_twice_the_exact_covariance_is_perfect_once_scale_free():
    """An approximation whose posterior covariance is 2Σ (precision (G + δI)/2) has a positive KL
    and logit-variance ratio 2, but kl_scaled = 0 and logit_variance_corr = 1 for every module and
    the block: the scale that κ_S tunes away (G block-diagonal over the parts, so that the
    approximation can be exact up to scale)."""
    parts, delta = _tiles([4, 6]), 0.5
    r = _block_diagonal_rows([4, 6], 5, 9)
    g = r.T @ r
    half = [(g[s, s] + delta * torch.eye(s.stop - s.start, dtype=torch.float64)) / 2
            - delta * torch.eye(s.stop - s.start, dtype=torch.float64) for s in parts]
    jac = torch.randn(6, 3, 10, generator=_gen(10), dtype=torch.float64)
    rows = compare_block(r, {"half": half.__getitem__}, {"a": parts[0], "b": parts[1]}, delta, jac, parts)
    assert [x["module"] for x in rows] == ["a", "b", "block"]
    for x in rows:
        assert x["kl"] > 0.1
        assert x["kl_scaled"] == pytest.approx(0.0, abs=1e-9)
        assert x["logit_variance_ratio"] == pytest.approx(2.0, rel=1e-10)
        assert x["logit_variance_corr"] == pytest.approx(1.0, abs=1e-12)


def test_exact_against_itself_is_perfect():
    """An approximation equal to the exact GGN (block-diagonal over the parts): trace ratios 1,
    Frobenius error 0, KL 0, variance ratio 1, with fewer and with more rows than parameters."""
    parts = _tiles([4, 6])
    for n_rows in (2, 9):
        r = _block_diagonal_rows([4, 6], n_rows, 3)
        g = r.T @ r
        jac = torch.randn(4, 3, 10, generator=_gen(4), dtype=torch.float64)
        rows = compare_block(r, {"self": [g[s, s] for s in parts].__getitem__}, {"a": parts[0], "b": parts[1]}, 0.5,
                             jac, parts)
        assert [x["module"] for x in rows] == ["a", "b", "block"] and [x["n_params"] for x in rows] == [4, 6, 10]
        for x in rows:
            assert x["trace_ratio"] == pytest.approx(1.0, abs=1e-12)
            assert x["frobenius_error"] == pytest.approx(0.0, abs=1e-12)
            assert x["kl"] == pytest.approx(0.0, abs=1e-9) and x["kl_scaled"] == pytest.approx(0.0, abs=1e-9)
            assert x["logit_variance_ratio"] == pytest.approx(1.0, abs=1e-10)
            assert x["logit_variance_error"] == pytest.approx(0.0, abs=1e-10)
            assert x["logit_variance_corr"] == pytest.approx(1.0, abs=1e-12)


def test_block_diagonal_approximation_is_detected():
    """Dropping the off-diagonal coupling of a block leaves module traces at 1 but gives a
    positive block Frobenius error equal to ‖off-diagonal‖_F / ‖G‖_F, and a positive KL equal to
    the dense KL of the two covariances."""
    r = torch.randn(11, 8, generator=_gen(5), dtype=torch.float64) / 8**0.5
    g = r.T @ r
    parts = _tiles([3, 5])
    s = {"a": parts[0], "b": parts[1]}
    approx = torch.block_diag(g[parts[0], parts[0]], g[parts[1], parts[1]])
    jac = torch.randn(4, 2, 8, generator=_gen(6), dtype=torch.float64)
    rows = {x["module"]: x for x in compare_block(r, {"bd": [g[w, w] for w in parts].__getitem__}, s, 1.0, jac, parts)}
    off = torch.linalg.matrix_norm(g - approx) / torch.linalg.matrix_norm(g)
    assert rows["block"]["trace_ratio"] == pytest.approx(1.0, abs=1e-12)
    assert rows["block"]["frobenius_error"] == pytest.approx(float(off), rel=1e-10) and float(off) > 0.1
    assert rows["a"]["frobenius_error"] == pytest.approx(0.0, abs=1e-12)
    eye = torch.eye(8, dtype=torch.float64)
    ref_kl = gaussian_kl(torch.linalg.inv(approx + eye), torch.linalg.inv(g + eye))
    assert rows["block"]["kl"] == pytest.approx(ref_kl, rel=1e-9) and ref_kl > 1e-3


def _random_part(o: int, i: int, kind: str, gen: torch.Generator) -> torch.Tensor:
    """A part's approximate GGN as the posteriors give it: K-FAC (o i, o i) from float32 eigenpairs
    (orthonormal to float32 only), or the diagonal (o i,)."""
    if kind == "diag":
        return torch.rand(o * i, generator=gen, dtype=torch.float64) * 3
    ug = torch.linalg.qr(torch.randn(o, o, generator=gen, dtype=torch.float64))[0].float().double()
    ux = torch.linalg.qr(torch.randn(i, i, generator=gen, dtype=torch.float64))[0].float().double()
    lam = torch.outer(torch.rand(o, generator=gen) * 4, torch.rand(i, generator=gen)).reshape(-1).double()
    u = torch.kron(ug, ux)
    return (u * lam) @ u.T


@pytest.mark.parametrize("n_rows", [30, 64, 150])
def test_low_rank_equals_the_dense_computation(n_rows):
    """On random blocks (P = 112 in six parts, three modules of two; fewer and more rows than
    parameters; K-FAC-like parts and diagonal ones, given as their diagonal; two prior precisions),
    every column equals the dense P × P computation that the low-rank one replaced (exact GGN
    ``rowsᵀ rows``, Cholesky inverses of P × P precisions) to 1e-9 relative."""
    shapes = [(2, 8), (12, 2), (2, 6), (6, 2), (2, 12), (12, 2)]
    sizes = [o * i for o, i in shapes]
    parts, p = _tiles(sizes), sum(sizes)
    slices = {"qkv": slice(0, 40), "proj": slice(40, 64), "fc": slice(64, 112)}
    gen = _gen(n_rows)
    r = torch.randn(n_rows, p, generator=gen, dtype=torch.float64) * torch.rand(p, generator=gen, dtype=torch.float64)
    jac = torch.randn(7, 4, p, generator=gen, dtype=torch.float64)
    approx = {"kron": [_random_part(o, i, "kron", gen) for o, i in shapes],
              "diagonal": [_random_part(o, i, "diag", gen) for o, i in shapes],
              "mixed": [_random_part(o, i, k, gen) for (o, i), k in zip(shapes, ["kron", "diag"] * 3)]}
    for delta in (0.3, 7.0):
        new = compare_block(r, {k: v.__getitem__ for k, v in approx.items()}, slices, delta, jac, parts)
        dense = {k: torch.block_diag(*[a if a.ndim == 2 else torch.diag(a) for a in v]) for k, v in approx.items()}
        ref = dense_compare_block(r.T @ r, dense, slices, delta, jac, parts)
        assert len(new) == len(ref) == 12
        for x, y in zip(new, ref):
            assert x.keys() == y.keys()
            for k in x:
                assert x[k] == (pytest.approx(y[k], rel=1e-9) if isinstance(x[k], float) else y[k]), (x, k)
        assert min(x["kl"] for x in new) > 1e-3 and min(x["frobenius_error"] for x in new) > 1e-2


def test_weight_ggns_are_the_posteriors_dense_blocks(tiny_lora_vit, tiny_batch, one_thread):
    """The per-weight GGNs of a K-FAC and a diagonal posterior (the diagonal as a vector) tile
    ``dense_precision − δ I``."""
    x, y = tiny_batch
    posts = [KronPosterior(fit_kron(tiny_lora_vit, [(x, y)], device="cpu", kfac="expand"), prior_precision=2.0),
             DiagPosterior(fit_diag(tiny_lora_vit, [(x, y)], device="cpu"), prior_precision=2.0)]
    for post in posts:
        n = len(weight_slices(tiny_lora_vit, 1))
        mats = [weight_ggn(post, 1, i) for i in range(n)]
        mats = [m if m.ndim == 2 else torch.diag(m) for m in mats]
        assert [m.shape[0] for m in mats] == [s.stop - s.start for s in weight_slices(tiny_lora_vit, 1)]
        dense = post.dense_precision([1])
        ref = dense - 2.0 * torch.eye(dense.shape[0], dtype=torch.float64)
        assert torch.allclose(torch.block_diag(*mats), ref, rtol=0, atol=1e-12 * float(ref.abs().max()))
        assert float(ref.abs().max()) > 0


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
    r = torch.randn(3, 4, dtype=torch.float64, generator=_gen(0))
    jac = torch.zeros(2, 2, 4, dtype=torch.float64)
    parts = _tiles([2, 2])
    ok = {"x": lambda i: torch.eye(2, dtype=torch.float64)}
    with pytest.raises(ValueError, match="square matrix or as its diagonal"):
        compare_block(r, {"x": lambda i: torch.eye(2 + i, dtype=torch.float64)}, {}, 1.0, jac, parts)
    with pytest.raises(ValueError, match="jac has 3"):
        compare_block(r, ok, {}, 1.0, jac[..., :3], parts)
    with pytest.raises(ValueError, match="delta"):
        compare_block(r, ok, {}, 0.0, jac, parts)
    with pytest.raises(ValueError, match="tile"):
        compare_block(r, ok, {}, 1.0, jac, [slice(0, 2), slice(3, 4)])
    with pytest.raises(ValueError, match="union of parts"):
        compare_block(r, ok, {"m": slice(1, 4)}, 1.0, jac, parts)
    with pytest.raises(ValueError, match="matrix"):
        compare_block(r[0], ok, {}, 1.0, jac, parts)


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
