"""How well K-FAC-expand, K-FAC-reduce and the diagonal GGN approximate the exact block GGN.

The yardstick is the exact GGN ``G_ℓ`` of a transformer block's LoRA parameters
(:mod:`lib.laplace.exact`); an approximation ``Ĝ_ℓ`` is block-diagonal over the LoRA weights
(``G ⊗ X`` per weight for K-FAC, martens2015optimizing, eschenhagen2023kronecker; its diagonal
for the diagonal GGN), while ``G_ℓ`` also couples the weights of the block. Per LoRA module ``m``
(its ``A`` and ``B``, the sub-block ``[m, m]``) and per block (the whole ``P_ℓ × P_ℓ``):

* trace ratio ``tr Ĝ / tr G`` (1 for a correct overall scale; K-FAC-reduce's ≈ 1/T undercount
  of weights whose tokens are not aggregated shows up here);
* relative Frobenius error ``‖Ĝ − G‖_F / ‖G‖_F`` (includes the cross-weight terms that
  ``Ĝ`` drops);
* at one prior precision ``δ_ℓ`` (the evidence maximiser of the exact block posterior,
  :mod:`lib.laplace.marglik`), with ``Σ̂ = (Ĝ + δ I)⁻¹`` and ``Σ = (G + δ I)⁻¹``: the KL
  divergence ``KL(N(0, Σ̂) ‖ N(0, Σ)) = ½ [tr(Σ⁻¹ Σ̂) − P + log det Σ − log det Σ̂]`` of the
  block (for a module: of its marginals ``Σ̂[m, m]``, ``Σ[m, m]``), and the GLM logit variance
  that the study's predictive uses, ``v_n = tr(J_n Σ J_nᵀ)`` on validation images
  (immer2021improving), as the mean ratio ``v̂_n / v_n`` and the mean relative error
  ``|v̂_n / v_n − 1|`` (for a module: ``J_n[:, m]`` and the marginal ``Σ[m, m]``).

The study tunes one covariance scale κ_S per posterior on validation data, which rescales every
approximation, so two scale-free columns say how close an approximation comes once its overall
scale is free: ``kl_scaled = min_c KL(N(0, c Σ̂) ‖ N(0, Σ))``, which with ``t = tr(Σ⁻¹ Σ̂)`` is at
``c = P / t`` and equals ``½ [P log(t / P) + log det Σ − log det Σ̂]`` (0 iff ``Σ̂ ∝ Σ``), and
``logit_variance_corr``, the Pearson correlation over validation images of ``v̂_n`` and ``v_n``
(1 when the approximation orders and spaces the images' predictive variances as the exact one does).

The comparison is in float64 on the curvature's device, one block at a time (one dense
``P_ℓ × P_ℓ`` GGN and its approximations in memory, 4.8 GB each for a 24,576-parameter block); the
exact GGN is kept as its ``N (C − 1)`` rows (:func:`lib.laplace.exact.fit_block_rows`), so the
spectrum behind ``δ_ℓ`` comes from the small Gram matrix when there are fewer rows than parameters
(:func:`lib.laplace.exact.gram_eigenvalues`). Every metric is a pure function of dense matrices
(:func:`compare_block`).
"""

from __future__ import annotations

import math
from typing import Iterable

import pandas as pd
import torch
from torch import Tensor, nn

from lib.laplace.curvature import Fisher, fit_diag, fit_kron
from lib.laplace.exact import block_rows, block_slices, fit_block_rows, gram_eigenvalues, weight_slices
from lib.laplace.marglik import optimal_prior
from lib.laplace.posterior import DiagPosterior, KronPosterior
from lib.model import lora_modules

APPROXIMATIONS = ("K-FAC-expand", "K-FAC-reduce", "diagonal")
"""Row labels of the approximations :func:`prepare_curvature_quality` compares."""

COLUMNS = ["block", "module", "approximation", "n_params", "prior_precision", "trace_ratio", "frobenius_error",
           "kl", "kl_scaled", "logit_variance_ratio", "logit_variance_error", "logit_variance_corr"]


def trace_ratio(approx: Tensor, exact: Tensor) -> float:
    """``tr(approx) / tr(exact)`` of two square matrices (P, P)."""
    return float(approx.double().diagonal().sum() / exact.double().diagonal().sum())


def frobenius_error(approx: Tensor, exact: Tensor) -> float:
    """``‖approx − exact‖_F / ‖exact‖_F`` of two matrices of the same shape."""
    return float(torch.linalg.matrix_norm(approx.double() - exact.double()) / torch.linalg.matrix_norm(exact.double()))


def gaussian_kls(cov_p: Tensor, cov_q: Tensor) -> tuple[float, float]:
    """``(KL, scaled KL)`` of two zero-mean Gaussians from one pair of Cholesky factors (float64):

    - ``KL(N(0, cov_p) ‖ N(0, cov_q)) = ½ [t − P + log det cov_q − log det cov_p]``;
    - ``min_c KL(N(0, c cov_p) ‖ N(0, cov_q)) = ½ [P log(t / P) + log det cov_q − log det cov_p]``,
      the minimum at ``c = P / t`` (the KL with the overall scale of ``cov_p`` fitted; 0 iff
      ``cov_p ∝ cov_q``),

    with ``t = tr(cov_q⁻¹ cov_p)``. ``cov_p``, ``cov_q``: symmetric positive definite (P, P).
    """
    lp = torch.linalg.cholesky(cov_p.double())
    lq = torch.linalg.cholesky(cov_q.double())
    m = torch.linalg.solve_triangular(lq, lp, upper=False)  # L_q⁻¹ L_p: tr(cov_q⁻¹ cov_p) = ‖m‖_F²
    return _kls(m.square().sum(), 2 * (lq.diagonal().log().sum() - lp.diagonal().log().sum()), cov_p.shape[0])


def _kls(trace: Tensor, logdet: Tensor, p: int) -> tuple[float, float]:
    """:func:`gaussian_kls` from ``t`` and ``ℓ = log det cov_q − log det cov_p``: ``½ [t − P + ℓ]``
    and its minimum over the scale ``c`` of ``½ [c t − P − P log c + ℓ]``, ``½ [P log(t / P) + ℓ]``."""
    return float(0.5 * (trace - p + logdet)), float(0.5 * (p * torch.log(trace / p) + logdet))


def pearson(a: Tensor, b: Tensor) -> float:
    """Pearson correlation of two vectors (N,) in float64; NaN when either is constant."""
    a, b = a.double() - a.double().mean(), b.double() - b.double().mean()
    return float((a * b).sum() / (a.square().sum() * b.square().sum()).sqrt())


def logit_variance(jac: Tensor, cov: Tensor) -> Tensor:
    """``v_n = tr(J_n Σ J_nᵀ) = Σ_c J_nc Σ J_ncᵀ`` (N,) float64 from ``jac`` (N, C, P) and ``cov`` (P, P)."""
    j = jac.double()
    return torch.einsum("ncp,ncp->n", j @ cov.double(), j)


def compare_block(exact: Tensor, approx: dict[str, Tensor], slices: dict[str, slice], delta: float,
                  jac: Tensor, parts: list[slice] | None = None) -> list[dict]:
    """Quality of every ``approx[name]`` (P, P) against the exact block GGN ``exact`` (P, P).

    ``slices``: module label → its positions in the block's parameter vector; ``delta``: the prior
    precision of all posteriors; ``jac`` (N, C, P): logit Jacobians of the block on validation
    images; ``parts``: diagonal blocks (the LoRA weights) outside which every approximation is
    zero, so that its posterior covariance and log-determinant are computed part by part
    (``Σ P_w³`` instead of ``P³``; None: dense). Rows, per approximation (``approximation``) and
    module (the label, or ``'block'``): ``n_params`` and the metrics of the module docstring
    (``trace_ratio``, ``frobenius_error``, ``kl``, ``kl_scaled``, ``logit_variance_ratio``,
    ``logit_variance_error``, ``logit_variance_corr``). The block's KL uses the precisions,
    ``½ [t − P + log det(Ĝ + δI) − log det(G + δI)]`` with ``t = Σ_ij (G + δI)_ij Σ̂_ij``, and
    ``kl_scaled`` the same ``t`` (:func:`gaussian_kls`); a module's both come from :func:`gaussian_kls`.
    """
    if exact.ndim != 2 or exact.shape[0] != exact.shape[1]:
        raise ValueError(f"exact {tuple(exact.shape)} must be a square matrix")
    for name, a in approx.items():
        if a.shape != exact.shape:
            raise ValueError(f"approx[{name!r}] {tuple(a.shape)} and exact {tuple(exact.shape)} must be the same square shape")
    if jac.shape[-1] != exact.shape[0]:
        raise ValueError(f"jac has {jac.shape[-1]} parameters, the GGN {exact.shape[0]}")
    if not delta > 0:
        raise ValueError(f"delta is {delta}; the prior precision must be positive")
    p = exact.shape[0]
    eye = torch.eye(p, dtype=torch.float64, device=exact.device)
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
                "approximation": name,
                "module": label,
                "n_params": s.stop - s.start,
                "trace_ratio": trace_ratio(a[s, s], exact[s, s]),
                "frobenius_error": frobenius_error(a[s, s], exact[s, s]),
                "kl": kl,
                "kl_scaled": kl_scaled,
                "logit_variance_ratio": float(ratio.mean()),
                "logit_variance_error": float((ratio - 1).abs().mean()),
                "logit_variance_corr": pearson(v_a, v_e),
            })
    return rows


def _inverse(prec: Tensor, parts: list[slice] | None) -> tuple[Tensor, Tensor]:
    """``(prec⁻¹, log det prec)`` of a symmetric positive definite (P, P), part by part when ``parts`` is given."""
    if parts is None:
        chol = torch.linalg.cholesky(prec)
        return torch.cholesky_inverse(chol), 2 * chol.diagonal().log().sum()
    inside = torch.block_diag(*[torch.ones(s.stop - s.start, s.stop - s.start, dtype=torch.bool, device=prec.device)
                                for s in parts])
    if inside.shape != prec.shape or bool(prec[~inside].ne(0).any()):
        raise ValueError("parts must tile the matrix, and the approximation must be zero outside them")
    cov = torch.zeros_like(prec)
    logdet = torch.zeros((), dtype=prec.dtype, device=prec.device)
    for s in parts:
        chol = torch.linalg.cholesky(prec[s, s])
        cov[s, s] = torch.cholesky_inverse(chol)
        logdet = logdet + 2 * chol.diagonal().log().sum()
    return cov, logdet


def prepare_curvature_quality(
    model: nn.Module,
    fit_batches: Iterable[tuple[Tensor, Tensor]],
    val_batches: Iterable[tuple[Tensor, Tensor]],
    *,
    device: torch.device | str,
    n_data: int | None = None,
    blocks: Iterable[int] | None = None,
    fisher: Fisher = "exact",
    class_chunk: int = 1,
    progress: bool | None = None,
) -> pd.DataFrame:
    """Curvature-quality table of K-FAC-expand, K-FAC-reduce and the diagonal GGN against the exact block GGN.

    All four curvatures are fitted on ``fit_batches`` (a list of (images, labels), iterated four
    times) and extrapolated to ``n_data`` examples as the study does (``scaled``; None: as seen);
    ``δ_ℓ`` maximises the evidence of the exact block posterior; ``val_batches`` give the logit
    Jacobians of the logit-variance columns. ``blocks``: the blocks to compare (default all).
    Returns one row per block, module (``qkv``, ``proj``, ``fc1``, ``fc2``, ``block``) and
    approximation, columns :data:`COLUMNS` (see :func:`compare_block`).
    """
    device = torch.device(device)
    fit_batches = list(fit_batches)
    blocks = sorted({m.block for m in lora_modules(model)} if blocks is None else set(blocks))
    kw = dict(device=device, fisher=fisher, class_chunk=class_chunk, progress=progress)
    rows = fit_block_rows(model, fit_batches, blocks=blocks, **kw)
    approx = {
        "K-FAC-expand": fit_kron(model, fit_batches, kfac="expand", **kw),
        "K-FAC-reduce": fit_kron(model, fit_batches, kfac="reduce", **kw),
        "diagonal": fit_diag(model, fit_batches, **kw),
    }
    scale = 1.0
    if n_data is not None:
        scale = n_data / rows.n_data
        approx = {k: c.scaled(n_data) for k, c in approx.items()}
    posts = {k: (KronPosterior(c) if k.startswith("K-FAC") else DiagPosterior(c)) for k, c in approx.items()}
    jac: dict[int, list[list[Tensor]]] = {b: [] for b in blocks}
    for logits, _, val_rows in block_rows(model, val_batches, blocks, device=device, fisher=None,
                                          class_chunk=class_chunk, progress=progress):
        for b, r in val_rows.items():
            if logits is not None:  # the first chunk of a new batch
                jac[b].append([])
            jac[b][-1].append(r.transpose(0, 1))  # (N, k, P)
    kinds = {m.name: m.kind for m in lora_modules(model)}
    out = []
    for b in blocks:
        r = rows.rows.pop(b) * math.sqrt(scale)  # (N (C − 1), P_ℓ) float64: G_ℓ = rᵀ r
        ggn = r.T @ r
        eye = torch.eye(ggn.shape[0], dtype=torch.float64, device=device)
        sq = sum(a.double().square().sum() + w.double().square().sum()
                 for n, (a, w) in rows.mean.items() if rows.blocks[n] == b)
        delta = float(optimal_prior([gram_eigenvalues(r)], sq.reshape(1))[0])
        del r
        j = torch.cat([torch.cat(chunks, dim=1) for chunks in jac.pop(b)])  # (N, C, P)
        slices = {kinds[n]: s for n, s in block_slices(model, b).items()}
        approx_ggn = {name: post.dense_precision([b]) - eye for name, post in posts.items()}  # δ = 1 in posts
        for row in compare_block(ggn, approx_ggn, slices, delta, j, parts=weight_slices(model, b)):
            out.append({"block": b, "prior_precision": delta, **row})
        del ggn, eye, approx_ggn, j
    return pd.DataFrame(out, columns=COLUMNS)


def summarise_quality(table: pd.DataFrame) -> pd.DataFrame:
    """Per approximation and module (and ``block``): the median over blocks (and seeds) of every
    metric of ``table`` (:func:`prepare_curvature_quality`), with the trace ratio's range.

    Index (approximation, module) in the order of :data:`APPROXIMATIONS` and ``qkv, proj, fc1,
    fc2, block``; columns ``trace_ratio`` (median), ``trace_ratio_min``, ``trace_ratio_max``,
    ``frobenius_error``, ``kl``, ``logit_variance_ratio``, ``logit_variance_error`` (medians).
    """
    missing = set(COLUMNS) - set(table.columns)
    if missing:
        raise ValueError(f"table lacks columns {sorted(missing)}; pass the output of prepare_curvature_quality")
    g = table.groupby(["approximation", "module"])
    out = g[["trace_ratio", "frobenius_error", "kl", "kl_scaled", "logit_variance_ratio", "logit_variance_error",
             "logit_variance_corr"]].median()
    out.insert(1, "trace_ratio_min", g.trace_ratio.min())
    out.insert(2, "trace_ratio_max", g.trace_ratio.max())
    order = {m: i for i, m in enumerate(("qkv", "proj", "fc1", "fc2", "block"))}
    rank = {a: i for i, a in enumerate(APPROXIMATIONS)}
    return out.sort_index(key=lambda idx: idx.map(lambda v: rank.get(v, order.get(v, len(order)))))
