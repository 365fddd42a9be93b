"""What the covariance-scale table finds, as values the attribution chapter states.

:func:`scale_findings` reads :func:`lib.report.scale_table`: how the evidence-tuned all-block
posterior (κ = 1) predicts next to the MAP model, the κ_S that validation NLL selects, and which
posteriors' κ_S sit at an end of the grid (ritter2018scalable). The wording is the chapter's.
"""

from __future__ import annotations

from dataclasses import dataclass

import pandas as pd

MAP_ROW = "deterministic (MAP)"
"""The first row of the scale table: the MAP model."""


@dataclass(frozen=True)
class ScaleFindings:
    """Accuracy and ECE (in %) of the MAP model and of the all-block posterior at κ = 1 and at its
    tuned κ_S (means over seeds); ``kappa_all``: the all-block κ_S (median over seeds);
    ``single_kappa``: the smallest and largest κ_S of a single block over seeds; ``at_upper`` /
    ``at_lower``: the posteriors whose κ_S sits at the upper/lower end of the grid on some seed, of
    ``posteriors`` named ones."""

    map_accuracy: float
    map_ece: float
    all_accuracy_raw: float
    all_ece_raw: float
    all_accuracy: float
    all_ece: float
    kappa_all: float
    single_kappa: tuple[float, float]
    at_upper: tuple[str, ...]
    at_lower: tuple[str, ...]
    posteriors: int


def scale_findings(table: pd.DataFrame, grid: tuple[float, ...]) -> ScaleFindings:
    """From :func:`lib.report.scale_table` (indexed by nothing; a ``posterior`` column with the
    :data:`MAP_ROW`, ``all`` and ``single ℓ`` rows) and the κ grid's end points ``grid``
    (``predictive.scale_range``); a κ within 1e-9 (relative) of an end counts as at it."""
    t = table.set_index("posterior")
    if MAP_ROW not in t.index or "all" not in t.index:
        raise ValueError(f"table needs the rows '{MAP_ROW}' and 'all'; pass lib.report.scale_table's output")
    det, full = t.loc[MAP_ROW], t.loc["all"]
    named = t.drop(index=MAP_ROW)
    singles = named[named.index.str.startswith("single ")]
    upper = named.index[named["κ max"] >= grid[1] * (1 - 1e-9)]
    lower = named.index[named["κ min"] <= grid[0] * (1 + 1e-9)]
    return ScaleFindings(
        map_accuracy=float(det["acc % κ=1"]), map_ece=float(det["ECE % κ=1"]),
        all_accuracy_raw=float(full["acc % κ=1"]), all_ece_raw=float(full["ECE % κ=1"]),
        all_accuracy=float(full["acc % κ_S"]), all_ece=float(full["ECE % κ_S"]), kappa_all=float(full["κ median"]),
        single_kappa=(float(singles["κ min"].min()), float(singles["κ max"].max())),
        at_upper=tuple(upper), at_lower=tuple(lower), posteriors=len(named),
    )
