"""What the fitted models show, as values the chapters state in their own sentences.

* :func:`map_calibration`: the MAP model's test accuracy and calibration over the seeds (setup chapter);
* :func:`prior_finding`: the evidence-tuned prior precisions against the prior the training L2 term
  implies, and where the posterior is widest (posterior chapter);
* :func:`width_finding`: how much of its prior variance each block's posterior keeps, which is
  why a covariance scale κ is tuned for prediction (posterior chapter);
* :func:`curvature_choice`: which curvature structure is closest to the exact block GGN on the
  profile, next to the one it uses (posterior chapter).

Each is a small frozen dataclass computed from result tables; the wording is the chapters'.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import pandas as pd


@dataclass(frozen=True)
class Range:
    """The mean of a quantity over seeds with its smallest and largest value."""

    mean: float
    low: float
    high: float

    @classmethod
    def of(cls, values: pd.Series) -> "Range":
        return cls(float(values.mean()), float(values.min()), float(values.max()))


@dataclass(frozen=True)
class MapCalibration:
    """The deterministic (MAP) model over ``seeds`` training seeds: test ``accuracy`` and top-label
    ``ece`` (fractions), and the mean signed calibration error ``signed_ece`` (mean confidence minus
    accuracy; positive: over-confident, guo2017calibration)."""

    seeds: int
    accuracy: Range
    ece: Range
    signed_ece: float

    @property
    def over_confident(self) -> bool:
        """Whether the model is over-confident on average (``signed_ece > 0``): averaging over a
        posterior mostly lowers confidence, which helps such a model and hurts an under-confident one."""
        return self.signed_ece > 0


def map_calibration(det: pd.DataFrame) -> MapCalibration:
    """From :func:`lib.report.deterministic_table` (one row per seed: ``accuracy``, ``ece``, ``signed_ece``)."""
    missing = {"accuracy", "ece", "signed_ece"} - set(det.columns)
    if missing or det.empty:
        raise ValueError(f"det needs rows with columns accuracy, ece, signed_ece (missing {sorted(missing)}); "
                         "pass lib.report.deterministic_table's output")
    return MapCalibration(len(det), Range.of(det.accuracy), Range.of(det.ece), float(det.signed_ece.mean()))


Relation = Literal["stronger", "weaker", "both sides"]
"""How the tuned per-block prior precisions δ_ℓ compare with the training prior δ = λN: all
``stronger`` (larger), all ``weaker``, or on ``both sides`` of it."""


@dataclass(frozen=True)
class PriorFinding:
    """The evidence-tuned prior precisions (immer2021scalable) against ``training`` = λN, under which
    the MAP was fitted: the lowest and highest δ_ℓ with their blocks, their ratios to ``training``,
    the :data:`Relation`; and the blocks with the largest and smallest posterior variance tr Σ_ℓ."""

    training: float
    lowest_block: int
    lowest: float
    highest_block: int
    highest: float
    widest_block: int
    widest: float
    narrowest_block: int
    narrowest: float

    @property
    def relation(self) -> Relation:
        if self.lowest > self.training:
            return "stronger"
        if self.highest < self.training:
            return "weaker"
        return "both sides"

    @property
    def ratio(self) -> tuple[float, float]:
        """``(lowest, highest) / training``."""
        return self.lowest / self.training, self.highest / self.training


def prior_finding(blocks: pd.DataFrame, training: float) -> PriorFinding:
    """From :func:`lib.report.block_table` (``block``, ``prior_precision``, ``variance_trace``, means
    over seeds) and the training prior precision δ = λN (``training`` > 0)."""
    if training <= 0:
        raise ValueError(f"training prior precision must be positive, got {training}; pass λN of the profile")
    b = blocks.set_index("block")
    delta, var = b.prior_precision, b.variance_trace
    return PriorFinding(float(training), int(delta.idxmin()), float(delta.min()), int(delta.idxmax()), float(delta.max()),
                        int(var.idxmax()), float(var.max()), int(var.idxmin()), float(var.min()))


@dataclass(frozen=True)
class WidthFinding:
    """How wide the evidence-tuned block posteriors are: the range over blocks of the share of its
    prior variance that each keeps, ``tr Σ_ℓ / (P_ℓ/δ_ℓ)`` (``prior_share``; per seed, then the mean
    over seeds), and of its effective number of parameters ``γ_ℓ = Σ_i λ_i/(λ_i + δ_ℓ)``
    (``effective``, mean over seeds, mackay1992practical), with ``n_params`` = P_ℓ (the largest
    block's)."""

    prior_share: tuple[float, float]
    effective: tuple[float, float]
    n_params: int


def width_finding(summaries: list[pd.DataFrame]) -> WidthFinding:
    """From each seed's per-block summary (its ``laplace`` stage's ``blocks.csv``:
    ``block``, ``prior_precision``, ``variance_trace``, ``effective_params``, ``n_params``).

    The share of block ℓ is ``tr Σ_ℓ · δ_ℓ / P_ℓ`` within each seed, averaged over seeds: a ratio of
    seed means would pair one seed's variance with another's precision (and can exceed 100%,
    which no single posterior does, since ``tr Σ_ℓ ≤ P_ℓ/δ_ℓ``)."""
    cols = {"block", "prior_precision", "variance_trace", "effective_params", "n_params"}
    bad = [i for i, s in enumerate(summaries) if s.empty or not cols <= set(s.columns)]
    if not summaries or bad:
        raise ValueError(f"width_finding needs one summary per seed, each with rows and columns {sorted(cols)} "
                         f"(got {len(summaries)} summaries, unusable: {bad}); pass "
                         "[pd.read_csv(stage.file('blocks.csv')) for stage, _ in study.fits]")
    stacked = pd.concat(summaries)
    per_block = stacked.assign(share=stacked.variance_trace * stacked.prior_precision / stacked.n_params
                               ).groupby("block")[["share", "effective_params"]].mean()
    return WidthFinding((float(per_block.share.min()), float(per_block.share.max())),
                        (float(per_block.effective_params.min()), float(per_block.effective_params.max())),
                        int(stacked.n_params.max()))


Closeness = Literal["closest", "closest in the predictive", "closest in the posterior", "not closest"]
"""Where the profile's curvature stands in :func:`curvature_choice`: closest to the exact GGN by both
measures, by the logit variance only, by the KL only, or by neither."""


@dataclass(frozen=True)
class CurvatureChoice:
    """The profile's curvature ``used`` (:attr:`lib.config.LaplaceConfig.approximation`) against the
    exact block GGN (:mod:`lib.laplace.quality`): per approximation, the median over blocks of the
    whole block's KL divergence from the exact posterior (``kl``) and of the mean relative error of
    the linearised logit variance (``variance_error``, what the predictive depends on,
    immer2021improving); ``by_kl`` and ``by_variance`` the approximations with the smallest of each."""

    used: str
    kl: dict[str, float]
    variance_error: dict[str, float]

    @property
    def by_kl(self) -> str:
        return min(self.kl, key=self.kl.get)

    @property
    def by_variance(self) -> str:
        return min(self.variance_error, key=self.variance_error.get)

    @property
    def closeness(self) -> Closeness:
        kl, var = self.used == self.by_kl, self.used == self.by_variance
        if kl and var:
            return "closest"
        if var:
            return "closest in the predictive"
        if kl:
            return "closest in the posterior"
        return "not closest"


def curvature_choice(quality: pd.DataFrame, used: str) -> CurvatureChoice:
    """From the curvature-quality table (:func:`lib.laplace.quality.prepare_curvature_quality`, the
    rows of ``module == 'block'``) and the profile's approximation ``used`` (one of its approximations)."""
    rows = quality[quality.module == "block"]
    if rows.empty:
        raise ValueError("quality has no 'block' rows; pass the curvature-quality table (Study.curvature_quality)")
    med = rows.groupby("approximation")[["kl", "logit_variance_error"]].median()
    if used not in med.index:
        raise ValueError(f"the profile's curvature {used!r} is not in the curvature-quality table "
                         f"({', '.join(med.index)}); compare it there or choose one of them in laplace.structure/kfac")
    return CurvatureChoice(used, {a: float(v) for a, v in med.kl.items()},
                           {a: float(v) for a, v in med.logit_variance_error.items()})
