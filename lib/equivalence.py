"""Equivalence by two one-sided tests (TOST): "no difference shown" is not "equivalent".

An interval that holds zero says that the data cannot tell two things apart, not that they are
alike. The book claims equivalence only when the two one-sided tests of schuirmann1987comparison
both reject at level α: H₀⁻: θ ≤ −m and H₀⁺: θ ≥ +m, for a stated margin m > 0
(``stats.equivalence_margin``). With intervals this reads: θ is equivalent to zero within ±m iff
the two-sided (1 − 2α) interval of θ lies inside (−m, +m).
"""

from __future__ import annotations

import math
from typing import Literal

from lib.interval import Interval

Verdict = Literal["differs", "equivalent", "cannot be distinguished"]
"""What a paired difference θ supports: ``differs`` (its 1 − α interval excludes zero), else
``equivalent`` (TOST at level α rejects both one-sided nulls for the margin), else ``cannot be
distinguished`` (neither a difference nor equivalence is shown)."""


def tost(interval: Interval, margin: float) -> bool:
    """Whether the TOST at level α rejects, from the (1 − 2α) interval ``interval`` of θ:
    −margin < lower and upper < +margin (schuirmann1987comparison). NaN bounds: False."""
    if not margin > 0:
        raise ValueError(f"equivalence margin must be positive, got {margin}; set stats.equivalence_margin")
    if math.isnan(interval.lower) or math.isnan(interval.upper):
        return False
    return -margin < interval.lower and interval.upper < margin


def equivalence_verdict(interval: Interval, tost_interval: Interval, margin: float) -> Verdict:
    """The :data:`Verdict` of θ from its two-sided 1 − α ``interval`` and its (1 − 2α)
    ``tost_interval`` (same estimate, ``tost_interval.alpha == 2 · interval.alpha``) at ``margin``."""
    if not math.isclose(tost_interval.alpha, 2 * interval.alpha):
        raise ValueError(f"tost_interval must have level 1 − 2α = {1 - 2 * interval.alpha:g} for the interval at "
                         f"1 − α = {interval.level:g}, got {tost_interval.level:g}")
    if interval.excludes_zero:
        return "differs"
    return "equivalent" if tost(tost_interval, margin) else "cannot be distinguished"
