"""Calibration metrics over (probabilities, labels) tensors.

All functions are pure and device-agnostic: they take ``probs`` of shape (N, C) (rows on the
simplex) and ``labels`` of shape (N,) int64 on any device, and return tensors on that device
(or python floats in :func:`calibration_summary`).

Binning convention (equal-width bins). Slot ``m < M`` holds confidences ``c`` with
``e_m <= c < e_{m+1}`` (left-closed, right-open, as ``torch.bucketize(..., right=True)`` in
torchmetrics) and an extra slot ``M`` holds confidences equal to 1.0 (frequent with saturated
float32 softmax); so every binned function below works with ``M + 1`` slots, the extra one a point
mass at 1 that is empty for most data. The edges are ``e_k = k / M`` rounded to the nearest number
of the confidences' dtype (:func:`bin_edges`), so a confidence that *is* ``k / M`` in its dtype
(float64 ``0.3`` with M = 10) lands in slot k, the slot whose lower edge it equals. ``linspace``
edges do not have this property: float64 ``linspace(0, 1, 11)[3]`` is ``0.30000000000000004``,
which would put 0.3 in ``[0.2, 0.3)``.

Relation to torchmetrics (``MulticlassCalibrationError``): it casts confidences to float32 and
bins them on float32 ``linspace(0, 1, M + 1)``. Those edges are not always the float32 nearest
to ``k / M`` (one ulp off for M = 15 at k = 3 and 6-10, for M = 20 at k = 9), and a float64
confidence within half a float32 ulp of an edge is rounded onto it. So the slots, hence the ECE,
agree exactly except for confidences within about one float32 ulp of an edge; for M = 10 the
float64 values ``k / 10`` themselves land in slot k in both. The convention differs from the
``(lo, hi]`` bins of :cite:`guo2017calibration` only for confidences on an edge. Top-label
confidence and prediction are ``probs.max(dim=1)`` (same tie-breaking as torchmetrics).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor

__all__ = [
    "ReliabilityData",
    "top_label",
    "bin_edges",
    "bin_index",
    "ece",
    "ece_equal_mass",
    "mce",
    "signed_ece",
    "debiased_ece",
    "classwise_ece",
    "smooth_ece",
    "nll",
    "brier",
    "accuracy",
    "calibration_summary",
    "prepare_reliability",
    "ece_from_weights",
    "weighted_ece",
]


def _check(probs: Tensor, labels: Tensor) -> None:
    if probs.ndim != 2:
        raise ValueError(f"probs must have shape (N, C); got shape {tuple(probs.shape)}")
    if not torch.is_floating_point(probs):
        raise ValueError(f"probs must be a floating tensor; got dtype {probs.dtype}")
    if labels.ndim != 1 or labels.shape[0] != probs.shape[0]:
        raise ValueError(
            f"labels must have shape (N,) = ({probs.shape[0]},); got shape {tuple(labels.shape)}"
        )
    if labels.dtype != torch.int64:
        raise ValueError(f"labels must be int64 class indices; got dtype {labels.dtype}")
    if probs.shape[0] == 0:
        raise ValueError("probs is empty: need at least one example")


def _check_bins(n_bins: int) -> None:
    if not isinstance(n_bins, int) or n_bins < 1:
        raise ValueError(f"n_bins must be a positive int; got {n_bins!r}")


def top_label(probs: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
    """Top-label confidence and correctness.

    Args:
        probs: (N, C) predicted probabilities.
        labels: (N,) int64 true classes.

    Returns:
        ``conf`` (N,) = max_c probs[i, c] and ``correct`` (N,) in {0, 1} (dtype of probs),
        ``correct_i = 1[argmax_c probs[i, c] == labels_i]``.
    """
    _check(probs, labels)
    conf, pred = probs.max(dim=1)
    return conf, (pred == labels).to(probs.dtype)


def bin_edges(n_bins: int, dtype: torch.dtype = torch.float64, device=None) -> Tensor:
    """Equal-width bin edges ``e_k = k / M``, k = 0..M, each rounded to the nearest number of ``dtype``.

    Computed as a correctly rounded float64 division on the CPU and then cast (for float32 the
    double rounding is exact for any practical M), so the edges do not depend on the device's
    division or on ``linspace``'s accumulation. Returns (M + 1,) on ``device``.
    """
    _check_bins(n_bins)
    edges = torch.arange(n_bins + 1, dtype=torch.float64) / n_bins
    return edges.to(dtype=dtype, device=device)


def bin_index(conf: Tensor, n_bins: int) -> Tensor:
    """Equal-width bin slot of each confidence (convention of the module docstring).

    Args:
        conf: (..., N) confidences in [0, 1].
        n_bins: number M of equal-width bins.

    Returns:
        int64 tensor like ``conf`` with values in {0, ..., M}: slot m < M is ``[e_m, e_{m+1})`` with
        ``e_k`` = :func:`bin_edges` (``k / M`` rounded to the dtype of ``conf``), slot M is ``{1}``.
    """
    edges = bin_edges(n_bins, conf.dtype, conf.device)
    return torch.bucketize(conf.contiguous(), edges, right=True) - 1


def _bin_sums(
    conf: Tensor, correct: Tensor, n_bins: int, dtype: torch.dtype | None = None
) -> tuple[Tensor, Tensor, Tensor]:
    """Per-slot (count, sum of confidences, sum of correct) over M + 1 slots, summed in ``dtype``
    (default: that of ``conf``); the slots are those of ``conf`` in its own dtype."""
    idx = bin_index(conf, n_bins)
    dtype = conf.dtype if dtype is None else dtype
    conf, correct = conf.to(dtype), correct.to(dtype)
    zeros = torch.zeros(n_bins + 1, dtype=dtype, device=conf.device)
    count = zeros.scatter_add(0, idx, torch.ones_like(conf))
    conf_sum = zeros.scatter_add(0, idx, conf)
    acc_sum = zeros.scatter_add(0, idx, correct)
    return count, conf_sum, acc_sum


def ece(probs: Tensor, labels: Tensor, n_bins: int = 15) -> Tensor:
    """Top-label expected calibration error with M equal-width bins.

    ``ECE = sum_m |B_m|/N * |acc(B_m) - conf(B_m)|`` :cite:`guo2017calibration,naeini2015obtaining`,
    equal to ``torchmetrics`` ``MulticlassCalibrationError(norm="l1")`` up to float round-off
    unless a confidence lies on a bin edge (module docstring).

    Args:
        probs: (N, C) probabilities. labels: (N,) int64. n_bins: M.

    Returns:
        0-dim tensor.
    """
    conf, correct = top_label(probs, labels)
    count, conf_sum, acc_sum = _bin_sums(conf, correct, n_bins)
    return (acc_sum - conf_sum).abs().sum() / conf.shape[0]


def signed_ece(probs: Tensor, labels: Tensor, n_bins: int = 15) -> Tensor:
    """Signed calibration error ``sum_m |B_m|/N * (conf(B_m) - acc(B_m))``.

    Positive means over-confident. Same bins as :func:`ece` :cite:`guo2017calibration`.
    Returns a 0-dim tensor.
    """
    conf, correct = top_label(probs, labels)
    count, conf_sum, acc_sum = _bin_sums(conf, correct, n_bins)
    return (conf_sum - acc_sum).sum() / conf.shape[0]


def mce(probs: Tensor, labels: Tensor, n_bins: int = 15) -> Tensor:
    """Maximum calibration error ``max_m |acc(B_m) - conf(B_m)|`` over non-empty bins.

    :cite:`naeini2015obtaining`; equals torchmetrics ``norm="max"`` (same proviso on bin edges as
    :func:`ece`). Returns a 0-dim tensor.
    """
    conf, correct = top_label(probs, labels)
    count, conf_sum, acc_sum = _bin_sums(conf, correct, n_bins)
    gap = (acc_sum - conf_sum).abs() / count.clamp_min(1)
    return gap.max()


def ece_equal_mass(probs: Tensor, labels: Tensor, n_bins: int = 15) -> Tensor:
    """Top-label ECE with M equal-mass (adaptive) bins :cite:`nixon2019measuring`.

    Examples are sorted by confidence (stable sort) and split into M contiguous groups whose sizes
    differ by at most one (the first ``N mod M`` groups get one extra example, as
    ``torch.tensor_split``); ties across a group boundary are split by the sort order.
    ``ECE_em = sum_m |B_m|/N * |acc(B_m) - conf(B_m)| = (1/N) sum_m |sum_{i in B_m} (y_i - c_i)|``.
    Requires ``N >= M``. Returns a 0-dim tensor.
    """
    conf, correct = top_label(probs, labels)
    idx = _equal_mass_index(conf, n_bins)
    resid = torch.zeros(n_bins, dtype=conf.dtype, device=conf.device)
    resid = resid.scatter_add(0, idx, correct - conf)
    return resid.abs().sum() / conf.shape[0]


def _equal_mass_index(conf: Tensor, n_bins: int) -> Tensor:
    _check_bins(n_bins)
    n = conf.shape[0]
    if n < n_bins:
        raise ValueError(f"equal-mass binning needs N >= n_bins; got N={n}, n_bins={n_bins}")
    order = torch.sort(conf, stable=True).indices
    base, extra = divmod(n, n_bins)
    sizes = torch.full((n_bins,), base, dtype=torch.int64, device=conf.device)
    sizes[:extra] += 1
    group_of_rank = torch.repeat_interleave(torch.arange(n_bins, device=conf.device), sizes)
    idx = torch.empty_like(order)
    idx[order] = group_of_rank
    return idx


def debiased_ece(
    probs: Tensor, labels: Tensor, n_bins: int = 15, binning: str = "equal_mass", squared: bool = False
) -> Tensor:
    """Debiased top-label l2 calibration error of :cite:`kumar2019verified`.

    The plug-in squared error ``sum_m p_m (a_m - c_m)^2`` (p_m = |B_m|/N, a_m, c_m bin accuracy and
    confidence) is biased upwards by the sampling variance of a_m. The debiased estimator
    (Kumar et al. 2019, Sec. 5; their ``unbiased_square_ce``) subtracts it bin by bin:

    ``ECE2_db = sum_m p_m [ (a_m - c_m)^2 - a_m (1 - a_m) / (|B_m| - 1) ]``

    where bins with fewer than 2 examples contribute 0. It is unbiased for the binned squared
    calibration error. With ``squared=False`` (default) we report ``sqrt(max(ECE2_db, 0))``, i.e.
    Kumar et al.'s ``unbiased_l2_ce``: the debiased **l2** ECE (not the l1 ECE, so it is on a
    different scale than :func:`ece`). ``squared=True`` returns the signed, unclipped
    ``ECE2_db`` (the unbiased quantity; may be negative).

    Args:
        probs: (N, C). labels: (N,). n_bins: M.
        binning: ``"equal_mass"`` (Kumar et al.'s default) or ``"equal_width"`` (M + 1 slots as
            in :func:`ece`).
        squared: see above.

    Returns:
        0-dim tensor.
    """
    conf, correct = top_label(probs, labels)
    if binning == "equal_mass":
        idx = _equal_mass_index(conf, n_bins)
        slots = n_bins
    elif binning == "equal_width":
        idx = bin_index(conf, n_bins)
        slots = n_bins + 1
    else:
        raise ValueError(f"binning must be 'equal_mass' or 'equal_width'; got {binning!r}")
    zeros = torch.zeros(slots, dtype=conf.dtype, device=conf.device)
    count = zeros.scatter_add(0, idx, torch.ones_like(conf))
    a = zeros.scatter_add(0, idx, correct) / count.clamp_min(1)
    c = zeros.scatter_add(0, idx, conf) / count.clamp_min(1)
    term = (a - c) ** 2 - a * (1 - a) / (count - 1).clamp_min(1)
    term = torch.where(count >= 2, term, torch.zeros_like(term))
    sq = (count / conf.shape[0] * term).sum()
    return sq if squared else sq.clamp_min(0).sqrt()


def classwise_ece(probs: Tensor, labels: Tensor, n_bins: int = 15) -> Tensor:
    """Classwise (static) calibration error :cite:`nixon2019measuring`.

    ``SCE = (1/C) sum_c sum_m |B_{c,m}|/N * |mean_{B_{c,m}} 1[y=c] - mean_{B_{c,m}} p_c|`` where
    ``B_{c,m}`` bins the class-c probabilities ``probs[:, c]`` with the equal-width slots of
    :func:`bin_index`. Computed for all classes in one scatter. Returns a 0-dim tensor.
    """
    _check(probs, labels)
    _check_bins(n_bins)
    n, c = probs.shape
    onehot = torch.nn.functional.one_hot(labels, c).to(probs.dtype)
    idx = bin_index(probs, n_bins)  # (N, C)
    flat = idx + (n_bins + 1) * torch.arange(c, device=probs.device)
    resid = torch.zeros(c * (n_bins + 1), dtype=probs.dtype, device=probs.device)
    resid = resid.scatter_add(0, flat.reshape(-1), (onehot - probs).reshape(-1))
    return resid.abs().sum() / (n * c)


def nll(probs: Tensor, labels: Tensor, eps: float = 1e-12) -> Tensor:
    """Negative log-likelihood ``-(1/N) sum_i log max(p_{i, y_i}, eps)`` (nats). 0-dim tensor."""
    _check(probs, labels)
    p = probs.gather(1, labels[:, None]).squeeze(1)
    return -p.clamp_min(eps).log().mean()


def brier(probs: Tensor, labels: Tensor) -> Tensor:
    """Multiclass Brier score ``(1/N) sum_i sum_c (p_ic - 1[y_i = c])^2`` (range [0, 2]).

    :cite:`brier1950verification`. 0-dim tensor.
    """
    _check(probs, labels)
    onehot = torch.nn.functional.one_hot(labels, probs.shape[1]).to(probs.dtype)
    return ((probs - onehot) ** 2).sum(dim=1).mean()


def accuracy(probs: Tensor, labels: Tensor) -> Tensor:
    """Top-1 accuracy ``(1/N) sum_i 1[argmax_c p_ic = y_i]``. 0-dim tensor."""
    return top_label(probs, labels)[1].mean()


# ---------------------------------------------------------------------------------------------
# Smooth ECE (Blasiok & Nakkiran 2023), re-implemented in torch following `relplot` 1.0.3.
# ---------------------------------------------------------------------------------------------


def _round_to_grid(f: Tensor, y: Tensor, g: int) -> Tensor:
    """Linear-interpolation deposit of weights y at positions f onto a grid of g points on [0, 1]."""
    pos = f * (g - 1)
    lo = pos.floor().to(torch.int64).clamp(0, g - 2)
    frac = pos - lo
    vals = torch.zeros(g, dtype=f.dtype, device=f.device)
    vals = vals.scatter_add(0, lo, (1 - frac) * y)
    return vals.scatter_add(0, lo + 1, frac * y)


def _reflected_gaussian_apply(f: Tensor, ys: Tensor, t: Tensor, sigma: float) -> Tensor:
    """Kernel sums ``sum_i K_sigma(t, f_i) ys[k, i]`` for each row k, reflected Gaussian kernel.

    Discretised exactly as ``relplot.kernels.ReflectedGaussianKernel.apply``: deposit on a grid of
    ``G = max(2000, round(20/sigma)) // 2 + 1`` points, reflect at 0 and 1, convolve, interpolate.
    """
    g = max(2000, round(20 / sigma)) // 2 + 1
    vals = torch.stack([_round_to_grid(f, y, g) for y in ys])  # (K, G)
    grid = torch.linspace(0, 1, g, dtype=f.dtype, device=f.device)
    ker = torch.exp(-((grid - 0.5) ** 2) / (2 * sigma**2)) / (math.sqrt(2 * math.pi) * sigma)
    ext = torch.cat([vals.flip(1)[:, :-1], vals, vals.flip(1)[:, 1:]], dim=1)
    conv = torch.nn.functional.conv1d(ext[:, None, :], ker.flip(0)[None, None, :]).squeeze(1)
    smoothed = conv[:, g // 2 : g // 2 + g]
    pos = t * (g - 1)
    inds = pos.floor().to(torch.int64).clamp(0, g - 2)
    res = pos - inds
    return smoothed[:, inds] * (1 - res) + smoothed[:, inds + 1] * res


def _smooth_ece_sigma(f: Tensor, y: Tensor, sigma: float) -> Tensor:
    n_eval = max(round(10 / sigma), 200)
    t = torch.linspace(0, 1, n_eval, dtype=f.dtype, device=f.device)
    num, den = _reflected_gaussian_apply(f, torch.stack([f - y, torch.ones_like(f)]), t, sigma)
    den = den + 1e-4
    r = num / den
    return (r.abs() * den).sum() / den.sum()


def smooth_ece(
    probs: Tensor, labels: Tensor, sigma: float | None = None, eps: float = 1e-3, return_sigma: bool = False
) -> Tensor | tuple[Tensor, float]:
    """Smooth ECE (smECE) of top-label confidences :cite:`blasiok2023smooth`.

    ``smECE_sigma = int |r_sigma(t)| delta_sigma(t) dt`` with kernel-smoothed residual
    ``r_sigma(t) = sum_i K(t, f_i)(f_i - y_i) / sum_i K(t, f_i)`` and density
    ``delta_sigma(t) = sum_i K(t, f_i) / N`` for the reflected Gaussian kernel K of width sigma.
    With ``sigma=None`` the bandwidth is the fixed point ``sigma* = smECE_{sigma*}`` found, as in
    the paper and in ``relplot.smECE``, by bisection on (0, 1] for the predicate
    ``sigma < eps or sigma < smECE_sigma`` (10 halvings, returning the end where the predicate is
    false, exactly as ``relplot.metrics.search_param``). The kernel is discretised as in
    ``relplot`` 1.0.3 so the value agrees with ``relplot.smECE`` to ~1e-10 in float64.
    Computation is in float64 on the input device.

    Args:
        probs: (N, C). labels: (N,).
        sigma: fixed bandwidth, or None for the fixed-point rule.
        eps: smallest bandwidth the search accepts.
        return_sigma: also return the bandwidth used.

    Returns:
        0-dim float64 tensor (and the bandwidth if ``return_sigma``).
    """
    conf, correct = top_label(probs, labels)
    f, y = conf.double(), correct.double()
    if sigma is None:
        def pred(a: float) -> bool:
            return a < eps or a < float(_smooth_ece_sigma(f, y, a))

        sigma = _search_param(pred)
    elif not 0 < sigma <= 1:
        raise ValueError(f"sigma must be in (0, 1]; got {sigma}")
    value = _smooth_ece_sigma(f, y, sigma)
    return (value, sigma) if return_sigma else value


def _search_param(pred: Callable[[float], bool], refine: int = 10) -> float:
    if pred(1.0):
        return 1.0
    start, end = 1.0, 0.0
    for _ in range(refine):
        mid = (start + end) / 2
        if pred(mid):
            end = mid
        else:
            start = mid
    return start


# ---------------------------------------------------------------------------------------------
# Summary, reliability data, weighted ECE for the bootstrap.
# ---------------------------------------------------------------------------------------------


def calibration_summary(probs: Tensor, labels: Tensor, n_bins: int = 15) -> dict[str, float]:
    """All scalar metrics of this module as python floats.

    Keys: ``ece`` (equal-width, l1), ``ece_em`` (equal-mass), ``ece_debiased`` (sqrt of Kumar et
    al.'s debiased squared l2 error, equal-mass bins), ``smece``, ``classwise_ece``, ``signed_ece``,
    ``mce``, ``nll``, ``brier``, ``accuracy``.
    """
    return {
        "ece": float(ece(probs, labels, n_bins)),
        "ece_em": float(ece_equal_mass(probs, labels, n_bins)),
        "ece_debiased": float(debiased_ece(probs, labels, n_bins)),
        "smece": float(smooth_ece(probs, labels)),
        "classwise_ece": float(classwise_ece(probs, labels, n_bins)),
        "signed_ece": float(signed_ece(probs, labels, n_bins)),
        "mce": float(mce(probs, labels, n_bins)),
        "nll": float(nll(probs, labels)),
        "brier": float(brier(probs, labels)),
        "accuracy": float(accuracy(probs, labels)),
    }


@dataclass(frozen=True)
class ReliabilityData:
    """Reliability-diagram data for one model (M equal-width bins + the point mass at 1).

    Attributes (all 1-D tensors on CPU, float64 except ``count``):
        edges: (M + 1,) bin edges ``k / M`` (:func:`bin_edges`, float64); slot m < M is
            ``[edges[m], edges[m+1])`` (the slots are taken in the dtype of the confidences).
        confidence: (M + 1,) mean confidence per slot (NaN where empty); slot M is ``{1}``.
        accuracy: (M + 1,) mean correctness per slot (NaN where empty).
        count: (M + 1,) int64 number of examples per slot.
    """

    edges: Tensor
    confidence: Tensor
    accuracy: Tensor
    count: Tensor

    @property
    def n(self) -> int:
        """Total number of examples."""
        return int(self.count.sum())

    @property
    def ece(self) -> float:
        """``sum_m count_m / N * |accuracy_m - confidence_m|`` (equals :func:`ece`)."""
        w = self.count.double() / self.n
        return float(torch.nansum(w * (self.accuracy - self.confidence).abs()))


def prepare_reliability(probs: Tensor, labels: Tensor, n_bins: int = 15) -> ReliabilityData:
    """Per-bin confidence, accuracy and count for a reliability diagram :cite:`guo2017calibration`.

    Uses the same M + 1 slots as :func:`ece` (binned in the dtype of ``probs``, summed in float64),
    so ``prepare_reliability(...).ece == ece(...)``.
    """
    conf, correct = top_label(probs, labels)
    count, conf_sum, acc_sum = _bin_sums(conf, correct, n_bins, torch.float64)
    nan = torch.full_like(count, float("nan"))
    has = count > 0
    return ReliabilityData(
        edges=bin_edges(n_bins),
        confidence=torch.where(has, conf_sum / count.clamp_min(1), nan).cpu(),
        accuracy=torch.where(has, acc_sum / count.clamp_min(1), nan).cpu(),
        count=count.round().to(torch.int64).cpu(),
    )


def ece_from_weights(conf: Tensor, correct: Tensor, weights: Tensor, n_bins: int = 15) -> Tensor:
    """Equal-width ECE of reweighted data, for R weight vectors at once.

    With bootstrap multiplicities ``w_ri`` (row r of ``weights``), the ECE of the resampled data is

    ``ECE_r = sum_m |sum_i w_ri 1[i in B_m] (y_i - c_i)| / sum_i w_ri``

    because the bin of an example does not change under resampling. All R values come from one
    matmul ``weights @ D`` with ``D[i, (p, m)] = 1[i in B_m^p] (y_i^p - c_i^p)`` (no loop over R).

    Args:
        conf: (N,) or (P, N) top-label confidences (P models sharing the same examples).
        correct: same shape as ``conf``, 0/1 correctness.
        weights: (R, N) nonnegative weights (e.g. multinomial counts; identity = all ones).
        n_bins: M (same slots as :func:`ece`).

    Returns:
        (R,) if ``conf`` is (N,), else (R, P); dtype of ``conf``.
    """
    single = conf.ndim == 1
    conf2 = conf[None] if single else conf
    corr2 = correct[None] if single else correct
    if conf2.ndim != 2 or corr2.shape != conf2.shape:
        raise ValueError(
            f"conf and correct must both be (N,) or (P, N); got {tuple(conf.shape)} and {tuple(correct.shape)}"
        )
    if weights.ndim != 2 or weights.shape[1] != conf2.shape[1]:
        raise ValueError(f"weights must be (R, N={conf2.shape[1]}); got {tuple(weights.shape)}")
    d = _residual_design(conf2, corr2.to(conf2.dtype), n_bins)
    w = weights.to(conf2.dtype)
    sums = (w @ d).reshape(w.shape[0], conf2.shape[0], n_bins + 1)
    out = sums.abs().sum(-1) / w.sum(1, keepdim=True)
    return out[:, 0] if single else out


def weighted_ece(conf: Tensor, correct: Tensor, weights: Tensor, n_bins: int = 15) -> Tensor:
    """Equal-width ECE of weighted examples whose confidences differ between rows.

    ``ECE = sum_m |sum_i w_i 1[c_i in B_m] (y_i - c_i)| / sum_i w_i`` over the last dimension, for
    every leading index at once (e.g. R bootstrap replicates, each with its own resampled
    predictive and example multiplicities). Unit weights give :func:`ece`
    :cite:`guo2017calibration`; when the confidences are shared by all rows,
    :func:`ece_from_weights` is the faster single-matmul form.

    Args:
        conf: (..., N) top-label confidences. correct: same shape, 0/1.
        weights: nonnegative, broadcastable to ``conf``. n_bins: M (same slots as :func:`ece`).

    Returns:
        (...) in the dtype of ``conf``.
    """
    if correct.shape != conf.shape:
        raise ValueError(f"conf and correct must have the same shape; got {tuple(conf.shape)} and {tuple(correct.shape)}")
    w = torch.broadcast_to(weights.to(conf.dtype), conf.shape)
    sums = torch.zeros(*conf.shape[:-1], n_bins + 1, dtype=conf.dtype, device=conf.device)
    sums.scatter_add_(-1, bin_index(conf, n_bins), (correct.to(conf.dtype) - conf) * w)
    return sums.abs().sum(-1) / w.sum(-1)


def _residual_design(conf: Tensor, correct: Tensor, n_bins: int) -> Tensor:
    """(N, P * (M + 1)) matrix with column (p, m) = 1[i in B_m^p] (y_i^p - c_i^p)."""
    p, n = conf.shape
    idx = bin_index(conf, n_bins) + (n_bins + 1) * torch.arange(p, device=conf.device)[:, None]
    d = torch.zeros(n, p * (n_bins + 1), dtype=conf.dtype, device=conf.device)
    d.scatter_(1, idx.T, (correct - conf).T)
    return d
