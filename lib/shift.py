"""Calibration under dataset shift and OOD detection per method: tables and the box statistics
(drawn by :mod:`lib.shift_figures`).

The protocol is Ovadia et al.'s :cite:`ovadia2019can`: every method (MAP, temperature scaling,
Laplace posteriors over block subsets, ...) is evaluated on the clean test set (severity 0) and on
each corrupted copy (:mod:`lib.corruptions`, CIFAR-10-C constants :cite:`hendrycks2019benchmarking`)
at severities 1..5, with accuracy, ECE, NLL and Brier score (:mod:`lib.calibration`); a box per
method and severity summarises the spread over corruptions. OOD detection follows Laplace Redux
:cite:`daxberger2021laplace` with the metrics of :mod:`lib.ood`.

The OOD image sets (near-OOD held-out classes; natural-photograph patches, handwritten digits and
synthetic far-OOD images) are built in :mod:`lib.ood_sets`.

:func:`gain_intervals` gives the ECE gain of each method over MAP per severity with paired
intervals, and :func:`rank_agreement` whether the ranking of blocks by ΔECE changes under shift: Kendall's τ-b :cite:`kendall1938new`
between the per-block ΔECE on clean images and on their corrupted copies. Their bootstraps resample
test images, as clusters with all their corrupted copies when corruptions are pooled
(:func:`cluster_counts`, :cite:`efron1993introduction`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch
from torch import Tensor

from lib.calibration import accuracy, brier, ece, ece_from_weights, nll, top_label
from lib.corruptions import CORRUPTIONS
from lib.ood import auroc_difference, average_precision, ood_scores, paired_bootstrap_auroc
from lib.resample import bootstrap_counts
from lib.stats import basic_interval, kendall_tau_b, percentile_interval

__all__ = [
    "METRICS",
    "shift_metrics",
    "ood_table",
    "cluster_counts",
    "gain_intervals",
    "RankAgreement",
    "rank_agreement",
    "prepare_shift_boxes",
]

METRICS = ("accuracy", "ece", "nll", "brier")
"""Columns of :func:`shift_metrics` (fractions; NLL in nats)."""

def shift_metrics(
    probs: Mapping[str, Tensor],
    labels: Tensor,
    *,
    corruption: str,
    severity: int,
    n_bins: int = 15,
) -> pd.DataFrame:
    """Accuracy, equal-width ECE, NLL and Brier score of each method on one (corrupted) test set.

    Args:
        probs: method name → (N, C) predictive probabilities on the same N images.
        labels: (N,) int64.
        corruption: a name of :data:`lib.corruptions.CORRUPTIONS`, or ``'clean'`` with severity 0.
        severity: 0 (clean) or 1..5.
        n_bins: M of :func:`lib.calibration.ece`.

    Returns:
        One row per method: ``method, corruption, family, severity, n, accuracy, ece, nll, brier``
        (``family`` is ``'clean'`` for the clean set). Concatenate the frames of all corruptions and
        severities for :func:`prepare_shift_boxes`.
    """
    if corruption == "clean":
        if severity != 0:
            raise ValueError(f"the clean test set has severity 0; got severity {severity}")
        family = "clean"
    elif corruption in CORRUPTIONS:
        if severity not in (1, 2, 3, 4, 5):
            raise ValueError(f"severity of corruption {corruption!r} must be in 1..5; got {severity}")
        family = CORRUPTIONS[corruption].family
    else:
        raise ValueError(f"corruption {corruption!r} is unknown; use 'clean' or one of {', '.join(CORRUPTIONS)}")
    if not probs:
        raise ValueError("probs is empty: pass at least one method's probabilities")
    rows = []
    for method, p in probs.items():
        if p.shape[0] != labels.shape[0]:
            raise ValueError(f"probs[{method!r}] has {p.shape[0]} rows but labels has {labels.shape[0]}")
        rows.append({
            "method": method, "corruption": corruption, "family": family, "severity": severity,
            "n": int(labels.shape[0]), "accuracy": float(accuracy(p, labels)), "ece": float(ece(p, labels, n_bins)),
            "nll": float(nll(p, labels)), "brier": float(brier(p, labels)),
        })
    return pd.DataFrame(rows)


def ood_table(
    probs_in: Mapping[str, Tensor],
    probs_out: Mapping[str, Tensor],
    *,
    ood_set: str,
    n_resamples: int,
    generator: torch.Generator,
    alpha: float = 0.05,
    reference: str | None = None,
) -> pd.DataFrame:
    """AUROC and AUPR (OOD positive) of both OOD scores for every method, with bootstrap intervals.

    Args:
        probs_in: method → (N_in, C) probabilities on the in-distribution test images.
        probs_out: method → (N_out, C) on the OOD images (same methods).
        ood_set: label of the OOD set (e.g. ``'near'``, ``'far'``), copied into the table.
        n_resamples, generator: the paired stratified bootstrap of :func:`lib.ood.paired_bootstrap_auroc`
            (one draw shared by all methods and both scores).
        alpha: 1 − level of the percentile intervals.
        reference: a method name; adds ``auroc_diff_*`` = AUROC(method) − AUROC(reference) with its
            paired interval (0 for the reference itself).

    Returns:
        One row per (method, score ∈ {max_prob, entropy}): ``method, ood_set, score, auroc,
        auroc_lower, auroc_upper, aupr`` and with ``reference`` ``auroc_diff, auroc_diff_lower,
        auroc_diff_upper``.
    """
    methods = list(probs_in)
    if set(methods) != set(probs_out):
        raise ValueError(f"probs_in and probs_out must have the same methods; got {sorted(probs_in)} and {sorted(probs_out)}")
    if reference is not None and reference not in probs_in:
        raise ValueError(f"reference {reference!r} is not one of the methods {methods}")
    s_in = {m: ood_scores(probs_in[m]) for m in methods}
    s_out = {m: ood_scores(probs_out[m]) for m in methods}
    rows = []
    for score in ("max_prob", "entropy"):
        a = torch.stack([s_in[m][score] for m in methods])
        b = torch.stack([s_out[m][score] for m in methods])
        res = paired_bootstrap_auroc(a, b, n_resamples, generator)
        lo, hi = percentile_interval(res.samples, alpha)
        aupr = average_precision(a, b)
        for k, m in enumerate(methods):
            row = {"method": m, "ood_set": ood_set, "score": score, "auroc": float(res.estimate[k]),
                   "auroc_lower": float(lo[k]), "auroc_upper": float(hi[k]), "aupr": float(aupr[k])}
            if reference is not None:
                d, dlo, dhi = auroc_difference(res, k, methods.index(reference), alpha)
                row.update(auroc_diff=d, auroc_diff_lower=dlo, auroc_diff_upper=dhi)
            rows.append(row)
    return pd.DataFrame(rows)


def cluster_counts(groups: Tensor, rows: int, generator: torch.Generator, dtype: torch.dtype) -> Tensor:
    """(rows, N) bootstrap multiplicities of N rows resampled by cluster: the G distinct values of
    ``groups`` (N,) int64 (in increasing order) are drawn with replacement
    (:func:`lib.resample.bootstrap_counts` of G) and every row takes its cluster's count
    :cite:`davison1997bootstrap`. With distinct groups this is the ordinary bootstrap of the rows."""
    if groups.ndim != 1 or groups.dtype != torch.int64:
        raise ValueError(f"groups must be (N,) int64 cluster ids; got {tuple(groups.shape)} {groups.dtype}")
    ids, inverse = torch.unique(groups, return_inverse=True)
    return bootstrap_counts(len(ids), rows, generator, dtype, groups.device).index_select(1, inverse)


def gain_intervals(
    det: Tensor,
    probs: Tensor,
    labels: Tensor,
    *,
    n_resamples: int,
    generator: torch.Generator,
    groups: Tensor | None = None,
    n_bins: int = 15,
    alpha: float = 0.05,
    chunk_size: int = 256,
) -> tuple[Tensor, Tensor, Tensor]:
    """ECE gain over a reference, ``ECE_ref − ECE_m``, of M methods, averaged over S training seeds,
    with paired basic intervals (:func:`lib.stats.basic_interval`, davison1997bootstrap).

    The same (cluster) bootstrap multiplicities of the N test rows (:func:`cluster_counts`) weight
    the reference and every method of every seed (the seeds share the test images), and each
    replicate's ECEs come from :func:`lib.calibration.ece_from_weights` (:cite:`guo2017calibration`,
    :cite:`efron1993introduction`); the intervals reflect the test images, the seeds held fixed.
    Pass the image id as ``groups`` when the rows pool several corrupted copies of the same images.

    Args:
        det: (S, N, C) or (N, C) reference probabilities (e.g. MAP).
        probs: (S, M, N, C) or (M, N, C) the methods' probabilities on the same rows.
        labels: (N,) int64. groups: optional (N,) int64 cluster ids (default: every row its own).

    Returns:
        (estimate (M,), lower (M,), upper (M,)) of the seed-mean gain.
    """
    if det.ndim == 2:
        det, probs = det[None], probs[None]
    if det.ndim != 3 or probs.ndim != 4 or probs.shape[0] != det.shape[0] or probs.shape[2:] != det.shape[1:] \
            or det.shape[1] != labels.shape[0]:
        raise ValueError(f"det must be (S, N, C) and probs (S, M, N, C) with N = {labels.shape[0]}; "
                         f"got {tuple(det.shape)}, {tuple(probs.shape)}")
    n_seeds, m = probs.shape[:2]
    conf, corr = zip(*(top_label(p, labels) for d, ps in zip(det, probs) for p in (d, *ps)))
    conf, corr = torch.stack(conf), torch.stack(corr)  # (S (M + 1), N)
    n = labels.shape[0]
    groups = torch.arange(n, device=det.device) if groups is None else groups
    if groups.shape != (n,):
        raise ValueError(f"groups must have shape ({n},); got {tuple(groups.shape)}")

    def gain(w: Tensor) -> Tensor:
        e = ece_from_weights(conf, corr, w, n_bins).reshape(-1, n_seeds, m + 1)
        return (e[..., :1] - e[..., 1:]).mean(1)

    estimate = gain(torch.ones(1, n, dtype=conf.dtype, device=conf.device))[0]
    samples = torch.cat([gain(cluster_counts(groups, min(chunk_size, n_resamples - start), generator, conf.dtype))
                         for start in range(0, n_resamples, chunk_size)])
    lo, hi = basic_interval(samples, estimate, alpha)
    return estimate, lo, hi


@dataclass(frozen=True)
class RankAgreement:
    """Kendall's τ-b between per-posterior ΔECE on clean images and on their corrupted copies.

    Attributes:
        tau: τ-b on the data. lower, upper: percentile interval. samples: (R,) bootstrap replicates.
        delta_clean, delta_shift: (P,) ΔECE on the clean and the corrupted images.
    """

    tau: float
    lower: float
    upper: float
    samples: Tensor
    delta_clean: Tensor
    delta_shift: Tensor


def rank_agreement(
    clean: tuple[Tensor, Tensor],
    shifted: tuple[Tensor, Tensor],
    labels: Tensor,
    *,
    n_resamples: int,
    generator: torch.Generator,
    groups: Tensor | None = None,
    n_bins: int = 15,
    alpha: float = 0.05,
    chunk_size: int = 256,
) -> RankAgreement:
    """Does the ranking of posteriors (e.g. single blocks) by ΔECE change under shift?

    ``ΔECE(ℓ) = ECE_det − ECE_Bayes(ℓ)`` is computed on N clean rows and on their N corrupted
    copies (row i of both conditions is the same image, e.g. ``clean[·][:, index]`` with the index
    of :func:`lib.corruptions.corrupt_split`); τ-b between the two ΔECE vectors is bootstrapped by
    resampling with the *same* multiplicities for both conditions (paired), with
    :func:`lib.calibration.ece_from_weights`. With ``groups`` (N,) int64 in 0..G−1 the G groups
    (the distinct ids, in increasing order) are resampled and every row takes its group's
    multiplicity (a cluster bootstrap: pass the image id when the rows pool several corruptions of
    the same images), else the N rows are.

    Args:
        clean: (probs_det (N, C), probs_bayes (P, N, C)) on the clean images.
        shifted: the same on the corrupted copies.
        labels: (N,) int64. n_resamples: R. generator: seeded, on the data's device.
        groups: optional (N,) int64 cluster ids (any values). chunk_size: resamples per batch.

    Returns:
        :class:`RankAgreement`.
    """
    def stacked(pair: tuple[Tensor, Tensor]) -> tuple[Tensor, Tensor]:
        det, bayes = pair
        if bayes.ndim != 3 or bayes.shape[1:] != det.shape or det.shape[0] != labels.shape[0]:
            raise ValueError(
                f"each of clean and shifted must be (probs_det (N, C), probs_bayes (P, N, C)) with N = "
                f"{labels.shape[0]}; got {tuple(det.shape)}, {tuple(bayes.shape)}"
            )
        conf, corr = zip(*(top_label(p, labels) for p in (det, *bayes)))
        return torch.stack(conf), torch.stack(corr)

    (c0, y0), (c1, y1) = stacked(clean), stacked(shifted)
    if c0.shape[0] < 3:
        raise ValueError("rank agreement needs at least 2 Bayesian posteriors (P >= 2)")
    n = labels.shape[0]
    groups = torch.arange(n, device=c0.device) if groups is None else groups
    if groups.shape != (n,):
        raise ValueError(f"groups must be int64 cluster ids of shape ({n},); got {tuple(groups.shape)}")

    def delta(conf: Tensor, corr: Tensor, w: Tensor) -> Tensor:
        e = ece_from_weights(conf, corr, w, n_bins)
        return e[:, :1] - e[:, 1:]

    ones = torch.ones(1, n, dtype=c0.dtype, device=c0.device)
    d0, d1 = delta(c0, y0, ones)[0], delta(c1, y1, ones)[0]
    chunks = []
    for start in range(0, n_resamples, chunk_size):
        rows = min(chunk_size, n_resamples - start)
        w = cluster_counts(groups, rows, generator, c0.dtype)
        chunks.append(kendall_tau_b(delta(c0, y0, w), delta(c1, y1, w)))
    samples = torch.cat(chunks)
    lo, hi = percentile_interval(samples[:, None], alpha)
    return RankAgreement(float(kendall_tau_b(d0, d1)), float(lo[0]), float(hi[0]), samples, d0, d1)


def prepare_shift_boxes(table: pd.DataFrame, metric: str, methods: Sequence[str] | None = None) -> pd.DataFrame:
    """Tukey box statistics of ``metric`` over corruptions, per severity and method (Ovadia-style).

    Args:
        table: concatenated :func:`shift_metrics` frames (the clean rows give severity 0); with a
            ``seed`` column the metric is first averaged over seeds per (method, corruption, severity).
        metric: one of :data:`METRICS`.
        methods: order of the methods (default: order of first appearance).

    Returns:
        One row per (severity, method): ``severity, method, n, mean, q1, med, q3, whislo, whishi,
        fliers`` — quartiles by linear interpolation, whiskers at the most extreme values within
        1.5 IQR of the box (matplotlib's ``boxplot`` convention), ``fliers`` a tuple of the rest.
    """
    if metric not in METRICS:
        raise ValueError(f"metric must be one of {METRICS}; got {metric!r}")
    missing = [c for c in ("method", "severity", "corruption", metric) if c not in table.columns]
    if missing:
        raise ValueError(f"table is missing columns {missing}; pass concatenated shift_metrics frames")
    order = list(dict.fromkeys(table["method"])) if methods is None else list(methods)
    if "seed" in table.columns:
        table = table.groupby(["method", "corruption", "severity"], sort=False)[metric].mean().reset_index()
    rows = []
    for severity in sorted(table["severity"].unique()):
        for method in order:
            v = table.loc[(table["severity"] == severity) & (table["method"] == method), metric].to_numpy(float)
            if len(v) == 0:
                continue
            q1, med, q3 = np.percentile(v, [25, 50, 75])
            iqr = q3 - q1
            inside = v[(v >= q1 - 1.5 * iqr) & (v <= q3 + 1.5 * iqr)]
            fliers = tuple(float(x) for x in np.sort(v[(v < q1 - 1.5 * iqr) | (v > q3 + 1.5 * iqr)]))
            rows.append({"severity": int(severity), "method": method, "n": len(v), "mean": float(v.mean()),
                         "q1": float(q1), "med": float(med), "q3": float(q3), "whislo": float(inside.min()),
                         "whishi": float(inside.max()), "fliers": fliers})
    return pd.DataFrame(rows)
