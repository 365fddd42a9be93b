"""What the statistics chapter finds, as values its sentences state.

* :func:`decisions`: which single blocks the Holm-corrected tests support, which intervals lie
  above zero without surviving the correction, which lie below, which hold zero, and the rank sets;
* :func:`mc_findings`: the Monte Carlo error of ΔECE next to its test-set error, and the bias of a
  finite number of posterior samples;
* :func:`selection_findings`: the error of choosing κ_S on the validation images;
* :func:`interval_check`: how far BCa endpoints lie from the percentile ones where BCa is exact;
* :func:`agreement_findings`: whether the single-block ranking depends on an analysis choice (the
  calibration-error estimator, or the covariance scaling).

Each is a small frozen dataclass computed from a result table; the wording is the chapters'.
"""

from __future__ import annotations

from dataclasses import dataclass
from statistics import NormalDist

import pandas as pd

from lib.interval import blocks_of

MATERIAL = 0.5
"""An extra error (Monte Carlo, κ_S selection) is called material when its standard deviation
exceeds this fraction of the intervals' one: added in variance it widens them by more than ~12%."""


@dataclass(frozen=True)
class Decisions:
    """The per-block decisions of the attribution table (widths as fractions).

    ``median_width``: the median width of a single block's 1 − α interval; ``holm``: blocks the
    Holm-adjusted one-sided test finds improving (family-wise error α, holm1979simple); ``above``:
    blocks whose interval lies above zero, ``uncorrected`` those of them that the Holm test does
    not reject; ``below``: blocks whose interval lies below zero; ``unclear``: blocks whose interval
    holds zero; ``certified``: blocks the simultaneous rank confidence set puts in the top
    ``top_k`` for sure.
    """

    blocks: int
    median_width: float
    holm: tuple[int, ...]
    above: tuple[int, ...]
    uncorrected: tuple[int, ...]
    below: tuple[int, ...]
    unclear: tuple[int, ...]
    certified: tuple[int, ...]
    top_k: int

    @property
    def singled_out(self) -> bool:
        """Whether any single block's interval excludes zero."""
        return bool(self.above or self.below)


def decisions(table: pd.DataFrame, ranks: pd.DataFrame, top_k: int) -> Decisions:
    """From :attr:`lib.attribution.Attribution.table` (``kind``, ``block``, ``lower``, ``upper``,
    ``improves``) and :func:`lib.attribution.rank_analysis`'s ranks (``surely_top_k``)."""
    singles = table[table.kind == "single"]
    improves = singles.improves.astype(bool)
    return Decisions(
        blocks=len(singles), median_width=float((singles.upper - singles.lower).median()),
        holm=blocks_of(singles[improves]), above=blocks_of(singles[singles.lower > 0]),
        uncorrected=blocks_of(singles[(singles.lower > 0) & ~improves]),
        below=blocks_of(singles[singles.upper < 0]), unclear=blocks_of(singles[(singles.lower <= 0) & (singles.upper >= 0)]),
        certified=blocks_of(ranks[ranks.surely_top_k.astype(bool)]), top_k=top_k,
    )


@dataclass(frozen=True)
class McFindings:
    """Monte Carlo error of ΔECE (fractions) from :func:`lib.attribution.mc_error`.

    ``max_se``/``median_se``: the largest and median Monte Carlo standard error; ``median_share``:
    the median ratio to the test-set standard error, ``worst`` the posterior with the largest ratio
    ``worst_share``; ``noisy``: posteriors whose ratio exceeds :data:`MATERIAL` (of ``checked``).
    ``drift``: the largest change of ΔECE when half the samples are used, relative to the test-set
    standard error (``drift_ratio``), of posterior ``drifted``; ``drift_share``: that change as a
    share of the posterior's ΔECE, None when ΔECE lies within ``z`` test-set standard errors of
    zero (z = Φ⁻¹(1 − α/2); the share of a gain that cannot be told from zero is undefined).
    """

    max_se: float
    median_se: float
    median_share: float
    worst: str
    worst_share: float
    noisy: tuple[str, ...]
    checked: int
    drifted: str
    drift: float
    drift_ratio: float
    drift_share: float | None
    z: float

    @property
    def widening(self) -> float:
        """Relative widening √(1 + r²) − 1 of an interval by an independent error ``worst_share`` (r)
        times its standard deviation, added in variance."""
        return (1 + self.worst_share ** 2) ** 0.5 - 1

    @property
    def settled(self) -> bool:
        """Whether halving the samples moves ΔECE by at most half its test-set standard error."""
        return self.drift_ratio <= 0.5


def mc_findings(table: pd.DataFrame, alpha: float) -> McFindings:
    """From :func:`lib.attribution.mc_error` (``posterior``, ``delta``, ``mc_se``, ``halving``,
    ``test_se``, ``mc_share``); ``alpha`` sets z = Φ⁻¹(1 − α/2) of the "ΔECE within z·SE of zero" rule."""
    if table.empty:
        raise ValueError("mc table is empty; pass lib.attribution.mc_error's output")
    worst = table.loc[table.mc_share.idxmax()]
    moved = table.halving.abs() / table.test_se
    drift = table.loc[moved.idxmax()]
    z = NormalDist().inv_cdf(1 - alpha / 2)
    clear = abs(float(drift.delta)) > z * float(drift.test_se)
    return McFindings(
        max_se=float(table.mc_se.max()), median_se=float(table.mc_se.median()),
        median_share=float(table.mc_share.median()), worst=str(worst.posterior), worst_share=float(worst.mc_share),
        noisy=tuple(table[table.mc_share > MATERIAL].posterior), checked=len(table), drifted=str(drift.posterior),
        drift=abs(float(drift.halving)), drift_ratio=float(moved.max()),
        drift_share=abs(float(drift.halving)) / abs(float(drift.delta)) if clear else None, z=z,
    )


@dataclass(frozen=True)
class SelectionFindings:
    """The error of choosing κ_S, from :func:`lib.attribution.scale_selection` (fractions).

    ``validation_images``: the validation images κ_S is tuned on; ``stable``: the smallest and
    largest share of resamples that select the same κ_S again; ``max_se``: the largest standard
    deviation of ΔECE over re-tuned κ_S, ``worst`` the posterior with the largest ratio
    ``worst_share`` of it to the intervals' bootstrap standard deviation; ``material``: the
    posteriors whose ratio exceeds :data:`MATERIAL`.
    """

    validation_images: int
    stable: tuple[float, float]
    max_se: float
    worst: str
    worst_share: float
    material: tuple[str, ...]


def selection_findings(table: pd.DataFrame) -> SelectionFindings | None:
    """From :func:`lib.attribution.scale_selection`; None when κ is not tuned (the table is empty)."""
    if table.empty:
        return None
    worst = table.loc[table.sel_share.idxmax()]
    return SelectionFindings(int(table.n_val.iloc[0]), (float(table.stable.min()), float(table.stable.max())),
                             float(table.sel_se.max()), str(worst.posterior), float(worst.sel_share),
                             tuple(table[table.sel_share > MATERIAL].posterior))


@dataclass(frozen=True)
class IntervalCheck:
    """Percentile against BCa endpoints where BCa is exact (:func:`lib.attribution.interval_comparison`):
    the largest endpoint ``shift`` (a fraction), its share of the percentile interval's width
    (largest at block ``at``, ``share``), and the blocks whose verdict (interval excludes zero or
    not) differs between the two types."""

    shift: float
    share: float
    at: int
    differ: tuple[int, ...]


def interval_check(intervals: pd.DataFrame) -> IntervalCheck:
    """From :func:`lib.attribution.interval_comparison` (``block``, ``percentile_lower/upper``, ``bca_lower/upper``)."""
    width = intervals.percentile_upper - intervals.percentile_lower
    shift = pd.concat([(intervals.bca_lower - intervals.percentile_lower).abs(),
                       (intervals.bca_upper - intervals.percentile_upper).abs()], axis=1).max(axis=1)
    share = shift / width
    i = int(share.to_numpy().argmax())

    def excludes(lo: pd.Series, hi: pd.Series) -> pd.Series:
        return (lo > 0) | (hi < 0)

    differ = intervals[excludes(intervals.percentile_lower, intervals.percentile_upper)
                       != excludes(intervals.bca_lower, intervals.bca_upper)]
    return IntervalCheck(float(shift.max()), float(share.iloc[i]), int(intervals.block.iloc[i]), blocks_of(differ))


@dataclass(frozen=True)
class Alternative:
    """One alternative analysis against the reference: Kendall's τ of the single-block ΔECE,
    ``discordant`` of ``pairs`` block pairs ordered differently, the block ranked first under it
    (``leader``), the single blocks whose ΔECE keeps its sign (``same_sign``) and whether the
    all-block gain keeps its sign."""

    name: str
    tau: float
    discordant: int
    pairs: int
    leader: int
    same_sign: int
    all_same_sign: bool


@dataclass(frozen=True)
class AgreementFindings:
    """Whether the single-block ranking depends on an analysis choice
    (:func:`lib.attribution.ranking_agreement`): the reference ``leader`` (point estimate), whether
    the simultaneous rank confidence set certifies it as first (``leader_certified``), the
    ``alternatives`` and the number of single ``blocks``."""

    leader: int
    leader_certified: bool
    alternatives: tuple[Alternative, ...]
    blocks: int

    @property
    def differing(self) -> tuple[Alternative, ...]:
        """The alternatives under which another block leads."""
        return tuple(a for a in self.alternatives if a.leader != self.leader)

    @property
    def flipped(self) -> tuple[str, ...]:
        """The alternatives under which the all-block gain changes sign."""
        return tuple(a.name for a in self.alternatives if not a.all_same_sign)


def agreement_findings(agreement: pd.DataFrame, ranks: pd.DataFrame) -> AgreementFindings:
    """From :func:`lib.attribution.ranking_agreement` and :func:`lib.attribution.rank_analysis`'s ranks (``rank_upper``)."""
    if agreement.empty:
        raise ValueError("agreement is empty; pass lib.attribution.ranking_agreement's output")
    leader = int(agreement.top_block_study.iloc[0])
    alternatives = tuple(Alternative(str(r.estimator), float(r.kendall_tau), int(r.discordant), int(r.pairs),
                                     int(r.top_block), int(r.same_sign), bool(r.all_same_sign))
                         for r in agreement.itertuples())
    return AgreementFindings(leader, bool(ranks.set_index("block").loc[leader, "rank_upper"] == 1), alternatives,
                             int(agreement.blocks.iloc[0]))
