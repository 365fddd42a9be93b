"""A point estimate with its two-sided 1 − α interval, the value every finding of the book is stated with.

The chapters write their own sentences (issue: the argument lives in the chapters); lib hands them
small frozen values like this one, which know where they stand relative to zero, so that a chapter
says "above zero" only when the interval says so and never reads "not significant" as "equal".
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Literal, Mapping

Side = Literal["above", "below", "includes"]


@dataclass(frozen=True)
class Interval:
    """``estimate`` with the interval ``[lower, upper]`` at level ``1 − alpha``.

    ``side``: ``'above'`` when the whole interval is above ``0``, ``'below'`` when below, else
    ``'includes'`` (it holds zero, or it is undefined: NaN bounds). A bound on zero counts as holding it.
    """

    estimate: float
    lower: float
    upper: float
    alpha: float

    def __post_init__(self) -> None:
        if not 0.0 < self.alpha < 1.0:
            raise ValueError(f"Interval alpha must lie in (0, 1), got {self.alpha}")
        if self.lower > self.upper:
            raise ValueError(f"Interval lower bound {self.lower} exceeds upper bound {self.upper}; pass them in order")

    @property
    def level(self) -> float:
        """The confidence level 1 − α."""
        return 1.0 - self.alpha

    @property
    def side(self) -> Side:
        """Where the interval lies relative to zero (see the class docstring)."""
        if self.lower > 0.0:
            return "above"
        if self.upper < 0.0:
            return "below"
        return "includes"

    @property
    def excludes_zero(self) -> bool:
        """Whether the interval lies wholly on one side of zero."""
        return self.side != "includes"

    @property
    def width(self) -> float:
        """upper − lower (NaN when a bound is)."""
        return self.upper - self.lower

    def scaled(self, factor: float) -> "Interval":
        """The same interval in other units (e.g. ×100 for percentage points); a negative factor
        flips the bounds."""
        lo, hi = sorted((factor * self.lower, factor * self.upper))
        return Interval(factor * self.estimate, lo, hi, self.alpha)

    @classmethod
    def from_row(cls, row: Mapping[str, Any], alpha: float, estimate: str = "delta", lower: str = "lower",
                 upper: str = "upper") -> "Interval":
        """From a table row with the named columns (a ``pandas`` row or a dict)."""
        missing = [c for c in (estimate, lower, upper) if c not in row]
        if missing:
            raise ValueError(f"row has no column(s) {missing}; it has {sorted(row.keys())}")
        values = [float(row[c]) for c in (estimate, lower, upper)]
        if any(math.isnan(v) for v in values[1:]) and not all(math.isnan(v) for v in values[1:]):
            raise ValueError(f"row has one NaN bound ({lower}={values[1]}, {upper}={values[2]}); both or neither")
        return cls(*values, alpha=alpha)


def blocks_of(rows: Any) -> tuple[int, ...]:
    """The block numbers of a result table's rows (its ``block`` column), sorted: the block sets
    that findings state beside their intervals (e.g. the single blocks whose interval lies above zero)."""
    return tuple(sorted(int(b) for b in rows.block))
