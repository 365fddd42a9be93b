"""What the attribution chapter finds, as values its sentences state.

* :func:`attribution_findings`: the all-block gain, the single block chosen on validation data, the
  single blocks whose interval lies above or below zero, the Holm and rank-set verdicts, and the
  Shapley leader, named only when certified;
* :func:`control_findings`: per block, whether the Laplace posterior's shape calibrates better or
  worse than isotropic noise of tuned size, is equivalent to it within the margin (TOST, :mod:`lib.equivalence`),
  or cannot be distinguished from it.

Each is a small frozen dataclass computed from the saved tables; the wording is the chapters'.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import pandas as pd

from lib.equivalence import equivalence_verdict
from lib.interval import Interval, blocks_of


@dataclass(frozen=True)
class AttributionFindings:
    """The single-block attribution (ΔECE as fractions; positive: lower ECE than the MAP model).

    ``all_blocks``: ΔECE of the all-block posterior, ``all_accuracy`` its accuracy change;
    ``best_block``: the single block chosen on validation data, ``best`` its test-set ΔECE;
    ``above``/``below``: single blocks whose interval lies above/below zero; ``holm``: those the
    Holm-corrected one-sided test finds improving; ``candidates``/``certified``: blocks the
    simultaneous rank confidence set cannot exclude from, and certifies as members of, the top
    ``top_k``. ``shapley``: every block's Shapley value with its interval; ``shapley_leader``: the
    block whose Shapley interval lies above every other block's interval (None: no leader is
    certified); ``shapley_total``: the sum of the Shapley values (the all-block gain).
    """

    all_blocks: Interval
    all_accuracy: float
    best_block: int
    best: Interval
    above: tuple[int, ...]
    below: tuple[int, ...]
    holm: tuple[int, ...]
    candidates: tuple[int, ...]
    certified: tuple[int, ...]
    top_k: int
    shapley: dict[int, Interval]
    shapley_leader: int | None
    shapley_total: float

    @property
    def singled_out(self) -> bool:
        """Whether any single block's interval excludes zero."""
        return bool(self.above or self.below)

    @property
    def leader_share(self) -> float | None:
        """The certified Shapley leader's share of the all-block gain; None without a certified
        leader or when the all-block interval does not lie above zero (a share of a gain that may be
        zero or negative means nothing)."""
        if self.shapley_leader is None or self.all_blocks.side != "above":
            return None
        return self.shapley[self.shapley_leader].estimate / self.shapley_total


def certified_leader(intervals: dict[int, Interval]) -> int | None:
    """The key whose interval lies wholly above every other interval (lower bound above each other
    upper bound), else None; with a single key, that key."""
    for key, iv in intervals.items():
        if all(iv.lower > other.upper for k, other in intervals.items() if k != key):
            return key
    return None


def attribution_findings(table: pd.DataFrame, ranks: pd.DataFrame, shapley: pd.DataFrame, best: int, alpha: float,
                         top_k: int) -> AttributionFindings:
    """From :attr:`lib.attribution.Attribution.table`, :func:`lib.attribution.rank_analysis`'s
    ranks, :func:`lib.attribution.shapley`'s values (``block``, ``phi``, ``lower``, ``upper``) and
    the single block ``best`` chosen on validation data (:func:`lib.attribution.choose_single`)."""
    singles = table[table.kind == "single"]
    if best not in set(singles.block):
        raise ValueError(f"best block {best} is not a single block of the table ({sorted(singles.block)}); "
                         "pass lib.attribution.choose_single(validation)")
    full = table[table.kind == "all"].iloc[0]
    values = {int(r.block): Interval(float(r.phi), float(r.lower), float(r.upper), alpha) for r in shapley.itertuples()}
    return AttributionFindings(
        all_blocks=Interval.from_row(full, alpha), all_accuracy=float(full.d_acc), best_block=int(best),
        best=Interval.from_row(singles.set_index("block").loc[best], alpha),
        above=blocks_of(singles[singles.lower > 0]), below=blocks_of(singles[singles.upper < 0]),
        holm=blocks_of(singles[singles.improves.astype(bool)]),
        candidates=blocks_of(ranks[ranks.top_k_candidate.astype(bool)]), certified=blocks_of(ranks[ranks.surely_top_k.astype(bool)]),
        top_k=top_k, shapley=values, shapley_leader=certified_leader(values), shapley_total=float(shapley.phi.sum()),
    )


Shape = Literal["better", "worse", "equivalent", "cannot be distinguished"]
"""The Laplace posterior's shape against isotropic noise of tuned size, from the paired difference
θ = Δ_Laplace − Δ_iso: ``better``/``worse`` (its 1 − α interval lies above/below zero),
``equivalent`` (TOST within the margin), else ``cannot be distinguished``."""


def shape_verdict(row: pd.Series, alpha: float, margin: float) -> Shape:
    """The :data:`Shape` of one row of :attr:`lib.attribution.Attribution.control` (``diff`` with
    ``diff_lower``/``diff_upper`` at 1 − α and ``tost_lower``/``tost_upper`` at 1 − 2α)."""
    diff = Interval.from_row(row, alpha, estimate="diff", lower="diff_lower", upper="diff_upper")
    tost = Interval.from_row(row, 2 * alpha, estimate="diff", lower="tost_lower", upper="tost_upper")
    verdict = equivalence_verdict(diff, tost, margin)
    if verdict == "differs":
        return "better" if diff.side == "above" else "worse"
    return verdict


@dataclass(frozen=True)
class ControlFindings:
    """The isotropic control of every block: ``shape`` per block (:data:`Shape`), ``diff`` per
    block (Δ_Laplace − Δ_iso with its 1 − α interval), the equivalence ``margin`` (a fraction), and
    the blocks whose tuned σ² sits at the ``lower``/``upper`` end of its grid on some seed."""

    shape: dict[int, Shape]
    diff: dict[int, Interval]
    margin: float
    lower_edge: tuple[int, ...]
    upper_edge: tuple[int, ...]

    def blocks(self, verdict: Shape) -> tuple[int, ...]:
        """The blocks with that verdict, in order."""
        return tuple(b for b, v in self.shape.items() if v == verdict)


def control_findings(control: pd.DataFrame, alpha: float, margin: float) -> ControlFindings:
    """From :attr:`lib.attribution.Attribution.control` at the intervals' ``alpha`` and the
    equivalence ``margin`` (``stats.equivalence_margin``)."""
    rows = control.sort_values("block")
    edge = rows.sigma2_edge.fillna("")
    return ControlFindings(
        shape={int(r.block): shape_verdict(r, alpha, margin) for _, r in rows.iterrows()},
        diff={int(r.block): Interval.from_row(r, alpha, estimate="diff", lower="diff_lower", upper="diff_upper")
              for _, r in rows.iterrows()},
        margin=margin, lower_edge=blocks_of(rows[edge == "lower"]), upper_edge=blocks_of(rows[edge == "upper"]),
    )
