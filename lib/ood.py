"""Out-of-distribution detection metrics from predictive probabilities.

An OOD *score* is larger for inputs judged more likely out of distribution. From probabilities
``(..., N, C)`` we use the negated maximum probability ``−max_c p_c`` (:cite:`hendrycks2017baseline`)
and the predictive entropy ``−Σ_c p_c log p_c``, as in the OOD evaluation of Laplace Redux
:cite:`daxberger2021laplace`.

Metrics take the scores of the in-distribution images ``(..., N_in)`` and of the OOD images
``(..., N_out)`` (leading dimensions, e.g. methods, are batched) with **OOD as the positive class**:

- AUROC ``= P(s_out > s_in) + ½ P(s_out = s_in)``, the Mann–Whitney statistic with half credit
  for ties (:cite:`hanley1982meaning`), computed with ``searchsorted`` in
  ``O((N_in + N_out) log N_in)``; it equals ``sklearn.metrics.roc_auc_score`` with OOD labelled 1.
- AUPR (average precision) ``= Σ_k (R_k − R_{k−1}) P_k`` over the distinct score thresholds in
  decreasing order (ties form one threshold), as ``sklearn.metrics.average_precision_score``.
  AUPR with the in-distribution images as positives is ``average_precision(−s_out, −s_in)``.

:func:`paired_bootstrap_auroc` resamples the in-distribution and the OOD images (separately, so
the two sample sizes stay fixed) with the *same* multiplicities for every method, so differences of
AUROC between methods keep their pairing (:cite:`efron1993introduction`).
"""

from __future__ import annotations

import torch
from torch import Tensor

from lib.resample import bootstrap_counts
from lib.stats import BootstrapResult, percentile_interval

__all__ = [
    "max_prob_score",
    "entropy_score",
    "ood_scores",
    "auroc",
    "weighted_auroc",
    "average_precision",
    "paired_bootstrap_auroc",
    "auroc_difference",
]


def _check_probs(probs: Tensor) -> None:
    if probs.ndim < 2 or not torch.is_floating_point(probs):
        raise ValueError(f"probs must be a floating tensor (..., N, C); got {tuple(probs.shape)} {probs.dtype}")


def max_prob_score(probs: Tensor) -> Tensor:
    """OOD score ``−max_c p_c``: probs (..., N, C) → (..., N) (:cite:`hendrycks2017baseline`)."""
    _check_probs(probs)
    return -probs.max(dim=-1).values


def entropy_score(probs: Tensor) -> Tensor:
    """Predictive entropy ``−Σ_c p_c log p_c`` (with 0 log 0 = 0): probs (..., N, C) → (..., N)."""
    _check_probs(probs)
    return -torch.special.xlogy(probs, probs).sum(dim=-1)


def ood_scores(probs: Tensor) -> dict[str, Tensor]:
    """``{'max_prob': max_prob_score, 'entropy': entropy_score}`` of probs (..., N, C)."""
    return {"max_prob": max_prob_score(probs), "entropy": entropy_score(probs)}


def _check_scores(scores_in: Tensor, scores_out: Tensor) -> None:
    if scores_in.shape[:-1] != scores_out.shape[:-1]:
        raise ValueError(
            f"scores_in {tuple(scores_in.shape)} and scores_out {tuple(scores_out.shape)} must share their "
            "leading dimensions (..., N_in) and (..., N_out)"
        )
    if scores_in.shape[-1] == 0 or scores_out.shape[-1] == 0:
        raise ValueError("scores_in and scores_out need at least one image each")
    if not (torch.isfinite(scores_in).all() and torch.isfinite(scores_out).all()):
        raise ValueError("scores_in and scores_out must be finite")


def _positions(scores_in: Tensor, scores_out: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Sort order of scores_in and, per OOD score, #in below it (left) and #in below or equal (right)."""
    sorted_in, order = scores_in.sort(dim=-1)
    values = scores_out.contiguous()
    left = torch.searchsorted(sorted_in.contiguous(), values, side="left")
    right = torch.searchsorted(sorted_in.contiguous(), values, side="right")
    return order, left, right


def auroc(scores_in: Tensor, scores_out: Tensor) -> Tensor:
    """AUROC with OOD positive: ``(1 / (N_in N_out)) Σ_j (#{s_in < s_out_j} + ½ #{s_in = s_out_j})``.

    Args:
        scores_in: (..., N_in) OOD scores of in-distribution images.
        scores_out: (..., N_out) OOD scores of OOD images.

    Returns:
        (...,) in the dtype of the scores (float64 if they are integer).
    """
    _check_scores(scores_in, scores_out)
    _, left, right = _positions(scores_in, scores_out)
    dtype = scores_in.dtype if torch.is_floating_point(scores_in) else torch.float64
    total = (left + right).to(dtype).sum(-1) / 2
    return total / (scores_in.shape[-1] * scores_out.shape[-1])


def weighted_auroc(scores_in: Tensor, scores_out: Tensor, w_in: Tensor, w_out: Tensor) -> Tensor:
    """AUROC of images with multiplicities (e.g. bootstrap counts), for R weight vectors at once.

    ``AUROC_r = Σ_ij w_in[r,i] w_out[r,j] (1[s_in_i < s_out_j] + ½ 1[s_in_i = s_out_j]) /
    (Σ_i w_in[r,i] Σ_j w_out[r,j])``, through cumulative weights of the sorted in-distribution scores.

    Args:
        scores_in: (N_in,). scores_out: (N_out,).
        w_in: (R, N_in) non-negative. w_out: (R, N_out) non-negative.

    Returns:
        (R,) in the weights' dtype.
    """
    if scores_in.ndim != 1 or scores_out.ndim != 1:
        raise ValueError(f"weighted_auroc takes 1-d scores; got {tuple(scores_in.shape)}, {tuple(scores_out.shape)}")
    _check_scores(scores_in, scores_out)
    if w_in.ndim != 2 or w_out.ndim != 2 or w_in.shape[0] != w_out.shape[0] \
            or w_in.shape[1] != scores_in.shape[0] or w_out.shape[1] != scores_out.shape[0]:
        raise ValueError(
            f"w_in must be (R, {scores_in.shape[0]}) and w_out (R, {scores_out.shape[0]}); "
            f"got {tuple(w_in.shape)}, {tuple(w_out.shape)}"
        )
    order, left, right = _positions(scores_in, scores_out)
    cum = torch.cat([torch.zeros_like(w_in[:, :1]), w_in.index_select(1, order).cumsum(1)], dim=1)
    credit = (cum.index_select(1, left) + cum.index_select(1, right)) / 2
    return (w_out * credit).sum(1) / (w_in.sum(1) * w_out.sum(1))


def average_precision(scores_in: Tensor, scores_out: Tensor) -> Tensor:
    """Average precision (AUPR) with OOD positive: ``Σ_k (R_k − R_{k−1}) P_k`` over distinct thresholds.

    Equivalently ``(1 / N_out) Σ_{OOD j} TP(t_j) / #{s >= t_j}`` at the threshold ``t_j = s_out_j``
    (ties enter together). Args as :func:`auroc`; returns (...,).
    """
    _check_scores(scores_in, scores_out)
    s = torch.cat([scores_out, scores_in], dim=-1)
    dtype = s.dtype if torch.is_floating_point(s) else torch.float64
    n_out = scores_out.shape[-1]
    labels = torch.zeros(s.shape[-1], dtype=dtype, device=s.device)
    labels[:n_out] = 1
    values, order = s.sort(dim=-1, descending=True, stable=True)
    lab = labels[order]
    precision = lab.cumsum(-1) / torch.arange(1, s.shape[-1] + 1, dtype=dtype, device=s.device)
    asc = (-values).contiguous()
    group_end = torch.searchsorted(asc, asc, side="right") - 1
    return (lab * precision.gather(-1, group_end)).sum(-1) / n_out


def paired_bootstrap_auroc(
    scores_in: Tensor,
    scores_out: Tensor,
    n_resamples: int,
    generator: torch.Generator,
    chunk_size: int = 256,
) -> BootstrapResult:
    """Paired, stratified bootstrap of the AUROC of P methods scored on the same images.

    Each replicate draws N_in in-distribution and N_out OOD images with replacement (multiplicities
    from :func:`lib.resample.bootstrap_counts`: per chunk of resamples, first the in-distribution counts
    (chunk, N_in), then the OOD counts (chunk, N_out), from ``generator``) and evaluates every method
    on the same draw with :func:`weighted_auroc`, so the replicates of AUROC differences keep the pairing.

    Args:
        scores_in: (P, N_in). scores_out: (P, N_out). n_resamples: R.
        generator: seeded torch.Generator on the scores' device. chunk_size: resamples per chunk.

    Returns:
        :class:`lib.stats.BootstrapResult` with estimate (P,) and samples (R, P).
    """
    if scores_in.ndim != 2 or scores_out.ndim != 2:
        raise ValueError(f"scores_in and scores_out must be (P, N); got {tuple(scores_in.shape)}, {tuple(scores_out.shape)}")
    _check_scores(scores_in, scores_out)
    if not isinstance(generator, torch.Generator) or torch.device(generator.device).type != scores_in.device.type:
        raise ValueError(f"generator must be a seeded torch.Generator on the scores' device ({scores_in.device.type})")
    if n_resamples < 1 or chunk_size < 1:
        raise ValueError(f"n_resamples and chunk_size must be >= 1; got {n_resamples}, {chunk_size}")
    dtype = scores_in.dtype if torch.is_floating_point(scores_in) else torch.float64
    n_in, n_out = scores_in.shape[1], scores_out.shape[1]
    chunks = []
    for start in range(0, n_resamples, chunk_size):
        rows = min(chunk_size, n_resamples - start)
        w_in = bootstrap_counts(n_in, rows, generator, dtype, scores_in.device)
        w_out = bootstrap_counts(n_out, rows, generator, dtype, scores_in.device)
        chunks.append(torch.stack([weighted_auroc(a, b, w_in, w_out) for a, b in zip(scores_in, scores_out)], 1))
    return BootstrapResult(estimate=auroc(scores_in, scores_out).to(dtype), samples=torch.cat(chunks))


def auroc_difference(result: BootstrapResult, a: int, b: int, alpha: float = 0.05) -> tuple[float, float, float]:
    """``AUROC_a − AUROC_b`` of a :func:`paired_bootstrap_auroc` result and its two-sided percentile
    interval at level ``1 − alpha``: (estimate, lower, upper)."""
    p = result.estimate.shape[0]
    if not (0 <= a < p and 0 <= b < p):
        raise ValueError(f"a and b must index the {p} methods; got {a}, {b}")
    diff = result.samples[:, a] - result.samples[:, b]
    lo, hi = percentile_interval(diff[:, None], alpha)
    return float(result.estimate[a] - result.estimate[b]), float(lo[0]), float(hi[0])
