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

The comparison is in float64 on the curvature's device, one block at a time, and forms no
``P_ℓ × P_ℓ`` matrix (:func:`compare_block`): the exact GGN is kept as its ``M = N (C − 1)`` rows
(:func:`lib.laplace.exact.fit_block_rows`), so its posterior enters through the ``M × M`` matrix
``δ I + r rᵀ`` (Woodbury's identity and the matrix determinant lemma) and the spectrum behind
``δ_ℓ`` through the Gram matrix ``r rᵀ`` (:func:`lib.laplace.exact.gram_eigenvalues`), while every
approximation, zero outside the diagonal blocks of the LoRA weights, is inverted weight by weight
(:func:`weight_ggn`; at most 6,144 parameters on cifar10-cpu). Measured on cifar10-cpu (blocks of
24,576 parameters, 200 fit and 200 validation images, ``M = 800``; one thread of a busy 2-core
CPU): a block's comparison takes about 46 s and adds about 1 GB to the 3.7 GB peak of the four
curvature fits (one block: 72 s with the fits, 4.6 GB peak), and :func:`prepare_curvature_quality`
holds the exact GGN's rows and the validation Jacobians of one block at a time; the dense
comparison needed 4.8 GB for each ``P_ℓ × P_ℓ`` matrix (more than 30 GB) and about
``1.5·10¹³`` operations for each inverse.
"""

from __future__ import annotations

import math
from functools import partial
from typing import Callable, Iterable

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


def _kls(trace: Tensor, logdet: Tensor, p: int) -> tuple[float, float]:
    """``(KL, scaled KL)`` of ``N(0, Σ_p)`` against ``N(0, Σ_q)`` (P-dimensional) from ``t = tr(Σ_q⁻¹ Σ_p)``
    and ``ℓ = log det Σ_q − log det Σ_p``: ``KL = ½ [t − P + ℓ]``, and its minimum over a scale ``c``
    of ``Σ_p``, ``min_c ½ [c t − P − P log c + ℓ] = ½ [P log(t / P) + ℓ]`` at ``c = P / t`` (0 iff
    ``Σ_p ∝ Σ_q``)."""
    return float(0.5 * (trace - p + logdet)), float(0.5 * (p * torch.log(trace / p) + logdet))


def pearson(a: Tensor, b: Tensor) -> float:
    """Pearson correlation of two vectors (N,) in float64; NaN when either is constant."""
    a, b = a.double() - a.double().mean(), b.double() - b.double().mean()
    return float((a * b).sum() / (a.square().sum() * b.square().sum()).sqrt())


def logit_variance(jac: Tensor, cov: Tensor) -> Tensor:
    """``v_n = tr(J_n Σ J_nᵀ) = Σ_c J_nc Σ J_ncᵀ`` (N,) float64 from ``jac`` (N, C, P) and ``cov`` (P, P)."""
    j = jac.double()
    return torch.einsum("ncp,ncp->n", j @ cov.double(), j)


def compare_block(rows: Tensor, approx: dict[str, Callable[[int], Tensor]], slices: dict[str, slice], delta: float,
                  jac: Tensor, parts: list[slice]) -> list[dict]:
    """Quality of every approximation ``approx[name]`` against the exact block GGN ``G = rowsᵀ rows``.

    ``rows`` (M, P): the exact GGN's rows (:func:`lib.laplace.exact.fit_block_rows`); ``parts``:
    the LoRA weights, contiguous slices that tile ``0..P``, outside whose diagonal blocks every
    approximation is zero; ``approx[name]``: part index → the approximation's GGN on that part,
    ``Ĝ_w`` (P_w, P_w), or its diagonal (P_w,) when it is diagonal (called once per part, so that
    only one part is in memory; :func:`weight_ggn`); ``slices``: module label → its positions,
    each a union of parts; ``delta``: the prior precision of all posteriors; ``jac`` (N, C, P):
    logit Jacobians on validation images.
    Rows, per approximation (``approximation``) and module (the label, or ``'block'``):
    ``n_params`` and the metrics of the module docstring (``trace_ratio``, ``frobenius_error``,
    ``kl``, ``kl_scaled``, ``logit_variance_ratio``, ``logit_variance_error``, ``logit_variance_corr``).

    No ``P × P`` matrix is formed. With ``K = δ I_M + rows rowsᵀ = L Lᵀ`` and ``W = L⁻¹ rows``
    (M, P), Woodbury's identity and the matrix determinant lemma give ``Σ = (G + δI)⁻¹ =
    (I − Wᵀ W)/δ`` and ``log det(G + δI) = (P − M) log δ + log det K``; for a module ``s``, with
    ``Q_s = I_M − W_s W_sᵀ``, ``Σ[s, s] = (I − W_sᵀ W_s)/δ``, ``log det Σ[s, s] = log det Q_s − P_s
    log δ`` and ``Σ[s, s]⁻¹ = δ (I + W_sᵀ Q_s⁻¹ W_s)``, of which only the parts' diagonal blocks
    are formed; the exact logit variance is ``v_n = (‖J_n‖_F² − ‖W J_nᵀ‖_F²)/δ``. The
    approximation's ``Σ̂`` and ``log det(Ĝ + δI)`` come part by part (Cholesky, ``Σ P_w³``), so
    ``t = tr((G + δI) Σ̂) = Σ_w [δ tr Σ̂_w + ⟨G_ww, Σ̂_w⟩]`` for the block's KL
    ``½ [t − P + log det(Ĝ + δI) − log det(G + δI)]`` and ``kl_scaled`` (:func:`_kls`), and
    ``t_s = Σ_{w ⊂ s} ⟨Σ[s, s]⁻¹_ww, Σ̂_w⟩`` for a module's. Frobenius error from
    ``‖Ĝ − G‖_F² = Σ_w ‖Ĝ_w − G_ww‖_F² + Σ_{w ≠ w'} ‖G_ww'‖_F²`` with
    ``‖G_ww'‖_F² = ⟨r_w r_wᵀ, r_w' r_w'ᵀ⟩`` (M × M), trace ratio from ``tr G_ww = ‖r_w‖_F²``.
    Cost: ``O(M² P + M Σ_w P_w² + N C M P + Σ_w P_w³)``, memory a few ``P_w²`` and ``M P``.
    """
    if rows.ndim != 2:
        raise ValueError(f"rows {tuple(rows.shape)} must be a matrix (M, P)")
    m, p = rows.shape
    if jac.shape[-1] != p:
        raise ValueError(f"jac has {jac.shape[-1]} parameters, the GGN {p}")
    if not delta > 0:
        raise ValueError(f"delta is {delta}; the prior precision must be positive")
    if [s.start for s in parts] != [0, *[s.stop for s in parts[:-1]]] or (parts[-1].stop if parts else 0) != p:
        raise ValueError(f"parts {parts} must be contiguous slices that tile 0..{p}")
    groups = {}
    for label, s in slices.items():
        idx = [i for i, w in enumerate(parts) if s.start <= w.start and w.stop <= s.stop]
        if sum(parts[i].stop - parts[i].start for i in idx) != s.stop - s.start:
            raise ValueError(f"slices[{label!r}] {s} is not a union of parts {parts}")
        groups[label] = (s, idx)
    groups["block"] = (slice(0, p), list(range(len(parts))))
    r, j = rows.double(), jac.double()
    eye_m = torch.eye(m, dtype=torch.float64, device=r.device)
    chol_k = torch.linalg.cholesky(torch.addmm(eye_m, r, r.T, beta=delta))  # K = δ I_M + r rᵀ
    logdet_e = (p - m) * math.log(delta) + 2 * chol_k.diagonal().log().sum()  # log det(G + δI)
    w = torch.linalg.solve_triangular(chol_k, r, upper=False)  # (M, P): Σ = (I − Wᵀ W)/δ
    gram = [r[:, s] @ r[:, s].T for s in parts]  # r_w r_wᵀ (M, M)
    cross = torch.stack([torch.stack([(a * b).sum() for b in gram]) for a in gram])  # ‖G_ww'‖_F²
    del gram
    trace_e = [r[:, s].square().sum() for s in parts]  # tr G_ww
    wj = [j[..., s] @ w[:, s].T for s in parts]  # W_w J_n,wᵀ (N, C, M)
    jsq = [j[..., s].square().sum((1, 2)) for s in parts]  # ‖J_n,w‖_F² (N,)
    exact = {}
    chol_q = [None] * len(parts)  # Cholesky of Q_s for each part's module
    for label, (s, idx) in groups.items():
        v_e = (sum(jsq[i] for i in idx) - sum(wj[i] for i in idx).square().sum((1, 2))) / delta
        if label == "block":
            exact[label] = (v_e, None)
            continue
        lq = torch.linalg.cholesky(torch.addmm(eye_m, w[:, s], w[:, s].T, alpha=-1))  # Q_s = I − W_s W_sᵀ
        exact[label] = (v_e, 2 * lq.diagonal().log().sum() - (s.stop - s.start) * math.log(delta))
        for i in idx:
            chol_q[i] = lq
    del wj, jsq
    stats = {name: [] for name in approx}
    for i, s in enumerate(parts):
        g_ww = r[:, s].T @ r[:, s]
        g_diag = g_ww.diagonal()
        g_off = g_ww.square().fill_diagonal_(0).sum()  # ‖G_ww − diag G_ww‖_F², for diagonal approximations
        inv_ww = None  # Σ[s', s']⁻¹ on this part, s' its module
        if chol_q[i] is not None:
            v = torch.linalg.solve_triangular(chol_q[i], w[:, s], upper=False)
            inv_ww = (v.T @ v).mul_(delta)
            inv_ww.diagonal().add_(delta)
            del v
        for name, part in approx.items():
            a = part(i).double()
            if a.shape not in ((s.stop - s.start,), (s.stop - s.start,) * 2):
                raise ValueError(f"approx[{name!r}]({i}) is {tuple(a.shape)}; give part {s}'s GGN as a square "
                                 f"matrix or as its diagonal ({s.stop - s.start},)")
            st = {"trace": a.sum() if a.ndim == 1 else a.diagonal().sum()}
            if a.ndim == 1:  # Ĝ_w = diag(a): Σ̂_w = diag(1 / (a + δ))
                cov = 1 / (a + delta)
                st.update(frobenius=(a - g_diag).square().sum() + g_off, logdet=(a + delta).log().sum(),
                          t=delta * cov.sum() + torch.dot(g_diag, cov),
                          t_module=None if inv_ww is None else torch.dot(inv_ww.diagonal(), cov),
                          var=torch.einsum("ncp,p->n", j[..., s].square(), cov))
            else:
                st["frobenius"] = (a - g_ww).square().sum()
                chol = torch.linalg.cholesky(a.diagonal_scatter(a.diagonal() + delta))
                del a
                cov = torch.cholesky_inverse(chol)
                st.update(logdet=2 * chol.diagonal().log().sum(),
                          t=delta * cov.diagonal().sum() + torch.dot(g_ww.flatten(), cov.flatten()),
                          t_module=None if inv_ww is None else torch.dot(inv_ww.flatten(), cov.flatten()),
                          var=logit_variance(j[..., s], cov))
                del chol
            stats[name].append(st)
            del cov
        del g_ww, g_diag, inv_ww
    out = []
    for name in approx:
        st = stats[name]
        for label, (s, idx) in groups.items():
            v_e, logdet_q = exact[label]
            v_a = sum(st[i]["var"] for i in idx)
            ratio = v_a / v_e
            sub = cross[idx][:, idx]
            off = sub[~torch.eye(len(idx), dtype=torch.bool, device=sub.device)].sum()
            logdet_a = sum(st[i]["logdet"] for i in idx)
            if label == "block":
                kl, kl_scaled = _kls(sum(st[i]["t"] for i in idx), logdet_a - logdet_e, p)
            else:  # ℓ = log det Σ[s, s] − log det Σ̂[s, s]
                kl, kl_scaled = _kls(sum(st[i]["t_module"] for i in idx), logdet_q + logdet_a, s.stop - s.start)
            out.append({
                "approximation": name,
                "module": label,
                "n_params": s.stop - s.start,
                "trace_ratio": float(sum(st[i]["trace"] for i in idx) / sum(trace_e[i] for i in idx)),
                "frobenius_error": float(((sum(st[i]["frobenius"] for i in idx) + off) / sub.sum()).sqrt()),
                "kl": kl,
                "kl_scaled": kl_scaled,
                "logit_variance_ratio": float(ratio.mean()),
                "logit_variance_error": float((ratio - 1).abs().mean()),
                "logit_variance_corr": pearson(v_a, v_e),
            })
    return out


def weight_ggn(post: KronPosterior | DiagPosterior, block: int, index: int) -> Tensor:
    """The approximate GGN ``Ĝ_w`` of the ``index``-th LoRA weight ``w`` of ``block`` (parameter
    order), float64: a diagonal block of ``post.dense_precision([block]) − δ I``, which is zero outside them.

    K-FAC (martens2015optimizing), (P_w, P_w): ``Ĝ_w = (U_G ⊗ U_X) diag(vec(λ_G λ_Xᵀ)) (U_G ⊗ U_X)ᵀ``
    from the posterior's eigenpairs, entry ``[(k, j), (l, m)] = Σ_a U_G[k, a] U_G[l, a] Σ_b λ_G[a]
    λ_X[b] U_X[j, b] U_X[m, b]``, summed over the longer factor first (``P_w² min(o, i)``
    operations for an ``o × i`` weight instead of ``P_w³``). Diagonal GGN: its diagonal ``d`` (P_w,).
    """
    e = post.block_entries(block)[index]
    if isinstance(post, DiagPosterior):
        return e["d"].reshape(-1).double()
    ug, ux, lam = e["UG"].double(), e["UX"].double(), torch.outer(e["lG"], e["lX"]).double()
    o, i = lam.shape
    if o >= i:  # Σ_a first: t[b, k, l] = Σ_a U_G[k, a] λ[a, b] U_G[l, a]
        t = torch.einsum("ka,ab,la->bkl", ug, lam, ug).reshape(i, o * o)
        pair = torch.einsum("jb,mb->jmb", ux, ux).reshape(i * i, i)
        dense = (pair @ t).reshape(i, i, o, o).permute(2, 0, 3, 1)  # [k, j, l, m]
    else:  # Σ_b first: t[a, j, m] = Σ_b U_X[j, b] λ[a, b] U_X[m, b]
        t = torch.einsum("jb,ab,mb->ajm", ux, lam, ux).reshape(o, i * i)
        pair = torch.einsum("ka,la->kla", ug, ug).reshape(o * o, o)
        dense = (pair @ t).reshape(o, o, i, i).permute(0, 2, 1, 3)  # [k, j, l, m]
    return dense.reshape(o * i, o * i)


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

    All four curvatures are fitted on ``fit_batches`` (a list of (images, labels), iterated three
    times and once more per block for the exact GGN's rows, so that only one block's rows and
    validation Jacobians are in memory at a time) and extrapolated to ``n_data`` examples as the study does (``scaled``; None: as seen);
    ``δ_ℓ`` maximises the evidence of the exact block posterior; ``val_batches`` give the logit
    Jacobians of the logit-variance columns. ``blocks``: the blocks to compare (default all).
    Returns one row per block, module (``qkv``, ``proj``, ``fc1``, ``fc2``, ``block``) and
    approximation, columns :data:`COLUMNS` (see :func:`compare_block`).
    """
    device = torch.device(device)
    fit_batches, val_batches = list(fit_batches), list(val_batches)
    blocks = sorted({m.block for m in lora_modules(model)} if blocks is None else set(blocks))
    kw = dict(device=device, fisher=fisher, class_chunk=class_chunk, progress=progress)
    approx = {
        "K-FAC-expand": fit_kron(model, fit_batches, kfac="expand", **kw),
        "K-FAC-reduce": fit_kron(model, fit_batches, kfac="reduce", **kw),
        "diagonal": fit_diag(model, fit_batches, **kw),
    }
    if n_data is not None:
        approx = {k: c.scaled(n_data) for k, c in approx.items()}
    posts = {k: (KronPosterior(c) if k.startswith("K-FAC") else DiagPosterior(c)) for k, c in approx.items()}
    kinds = {m.name: m.kind for m in lora_modules(model)}
    out = []
    for b in blocks:  # one block's rows and Jacobians in memory at a time
        rows = fit_block_rows(model, fit_batches, blocks=[b], **kw)
        scale = 1.0 if n_data is None else n_data / rows.n_data
        r = rows.rows.pop(b) * math.sqrt(scale)  # (N (C − 1), P_ℓ) float64: G_ℓ = rᵀ r
        sq = sum(a.double().square().sum() + w.double().square().sum()
                 for n, (a, w) in rows.mean.items() if rows.blocks[n] == b)
        delta = float(optimal_prior([gram_eigenvalues(r)], sq.reshape(1))[0])
        jac: list[list[Tensor]] = []
        for logits, _, val_rows in block_rows(model, val_batches, [b], device=device, fisher=None,
                                              class_chunk=class_chunk, progress=progress):
            if logits is not None:  # the first chunk of a new batch
                jac.append([])
            jac[-1].append(val_rows[b].transpose(0, 1))  # (N, k, P)
        j = torch.cat([torch.cat(chunks, dim=1) for chunks in jac])  # (N, C, P)
        del jac
        slices = {kinds[n]: s for n, s in block_slices(model, b).items()}
        approx_ggn = {name: partial(weight_ggn, post, b) for name, post in posts.items()}
        for row in compare_block(r, approx_ggn, slices, delta, j, parts=weight_slices(model, b)):
            out.append({"block": b, "prior_precision": delta, **row})
        del rows, r, approx_ggn, j
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
