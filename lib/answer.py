"""The book's answer as values: what the Summary (``chapters/index.ipynb``) states, from the saved result tables.

Every "best" is chosen on the validation images (:func:`lib.attribution.choose_single`) and
reported on the test set, with its interval from :func:`lib.attribution.attribution`, which
includes the choice of κ_S (and of σ² and T) on the validation images. The Summary writes the
sentences; :class:`Answer` holds the numbers, intervals (:class:`lib.interval.Interval`, which know
their side of zero) and verdicts they state.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import pandas as pd

from lib.attribution import choose_single
from lib.attribution_findings import Shape, shape_verdict
from lib.config import Config
from lib.interval import Interval, blocks_of
from lib.statistics_findings import MATERIAL


Leader = Literal["same", "depends", "uncertified"]
"""Whether the single block that leads under the equal-width ECE leads under every other estimator
of calibration error (``same``); if not, whether the rank confidence set certifies that leader as
first (``depends``: the leader depends on the estimator) or not (``uncertified``: a change of
leader is expected when no leader is certified)."""


@dataclass(frozen=True)
class Answer:
    """The findings of the Summary (ΔECE and its intervals as fractions; positive: lower ECE).

    ``all_blocks``: ΔECE of the all-block posterior, ``all_blocks_accuracy`` its change of test
    accuracy; ``all_kappa_at_floor``: its κ_S sits at the lower end of the validation grid on at
    least one seed (validation prefers a posterior that predicts almost like the MAP).
    ``best_block``: the single block chosen on validation, ``best`` its test ΔECE. ``above`` and
    ``below``: the single blocks whose interval lies above, and below, zero; ``holm``: those that
    pass the Holm-corrected test on their own; ``certified``: those that the simultaneous rank
    confidence set certifies as top-k. ``shape``: Δ_Laplace − Δ_iso of the best block against
    isotropic noise of tuned size, ``shape_verdict`` what it supports (:data:`lib.attribution_findings.Shape`:
    equivalence only by TOST within ``stats.equivalence_margin``). ``leader`` (None without
    the estimator table): :data:`Leader`; ``estimators`` the other estimators and ``differing``
    those under which another block leads. ``mc_noisy`` of ``mc_checked`` posteriors have Monte Carlo
    error above :data:`MATERIAL` of the test-set error (first seed; 0 of 0 without the table);
    ``selection_material``: the choice of κ_S is a material part of some interval's width.
    """

    all_blocks: Interval
    all_blocks_accuracy: float
    all_kappa_at_floor: bool
    best_block: int
    best: Interval
    above: tuple[int, ...]
    below: tuple[int, ...]
    holm: tuple[int, ...]
    certified: tuple[int, ...]
    shape: Interval
    shape_verdict: Shape
    leader: Leader | None
    estimators: tuple[str, ...]
    differing: tuple[str, ...]
    mc_noisy: int
    mc_checked: int
    selection_material: bool

    @property
    def singled_out(self) -> bool:
        """Whether any single block's interval excludes zero."""
        return bool(self.above or self.below)


def answer(table: pd.DataFrame, ranks: pd.DataFrame, validation: pd.DataFrame, control: pd.DataFrame, cfg: Config,
           mc: pd.DataFrame | None = None, agreement: pd.DataFrame | None = None, scale: pd.DataFrame | None = None,
           selection: pd.DataFrame | None = None) -> Answer:
    """The :class:`Answer` from the saved tables: ``table`` (:attr:`lib.attribution.Attribution.table`),
    ``ranks`` (:func:`lib.attribution.rank_analysis`), ``validation`` (:func:`lib.attribution.validation_table`),
    ``control`` (:attr:`lib.attribution.Attribution.control`); optional: ``mc``
    (:func:`lib.attribution.mc_error` of the first seed), ``agreement``
    (:func:`lib.attribution.estimator_agreement`), ``scale`` (:func:`lib.report.scale_table`),
    ``selection`` (:func:`lib.attribution.scale_selection`)."""
    alpha = cfg.stats.alpha
    singles = table[table.kind == "single"]
    full = table[table.kind == "all"].iloc[0]
    best = choose_single(validation)
    top = singles.set_index("block").loc[best]
    shape = control.set_index("block").loc[best]
    floor = False
    if scale is not None and cfg.predictive.scale != "none":
        kappa_min = float(scale.set_index("posterior").loc["all", "κ min"])
        floor = kappa_min <= cfg.predictive.scale_range[0] * (1 + 1e-9)
    leader, estimators, differing = None, (), ()
    if agreement is not None:
        lead = int(agreement.top_block_study.iloc[0])
        estimators = tuple(agreement.estimator)
        differing = tuple(agreement[agreement.top_block != lead].estimator)
        certified_first = bool(ranks.set_index("block").loc[lead, "rank_upper"] == 1)
        leader = "same" if not differing else "depends" if certified_first else "uncertified"
    noisy = 0 if mc is None else int((mc.mc_share > MATERIAL).sum())
    return Answer(
        all_blocks=Interval.from_row(full, alpha), all_blocks_accuracy=float(full.d_acc), all_kappa_at_floor=floor,
        best_block=best, best=Interval.from_row(top, alpha),
        above=blocks_of(singles[singles.lower > 0]), below=blocks_of(singles[singles.upper < 0]),
        holm=blocks_of(singles[singles.improves.astype(bool)]), certified=blocks_of(ranks[ranks.surely_top_k.astype(bool)]),
        shape=Interval.from_row(shape, alpha, estimate="diff", lower="diff_lower", upper="diff_upper"),
        shape_verdict=shape_verdict(shape, alpha, cfg.stats.equivalence_margin),
        leader=leader, estimators=estimators, differing=differing, mc_noisy=noisy, mc_checked=0 if mc is None else len(mc),
        selection_material=selection is not None and not selection.empty and bool((selection.sel_share > MATERIAL).any()),
    )
