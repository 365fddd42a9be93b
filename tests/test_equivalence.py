"""lib.equivalence: the two one-sided tests (TOST) and the three verdicts, on hand-made intervals."""

from __future__ import annotations

import pytest
import torch

from lib.equivalence import equivalence_verdict, tost
from lib.interval import Interval


def test_tost_holds_only_inside_the_margin():
    assert tost(Interval(0.0, -0.004, 0.004, 0.1), 0.005)
    assert not tost(Interval(0.0, -0.004, 0.006, 0.1), 0.005)  # upper bound beyond the margin
    assert not tost(Interval(0.0, -0.005, 0.001, 0.1), 0.005)  # a bound on the margin is not inside it
    assert not tost(Interval(0.0, float("nan"), float("nan"), 0.1), 0.005)
    with pytest.raises(ValueError, match="stats.equivalence_margin"):
        tost(Interval(0.0, -0.001, 0.001, 0.1), 0.0)


def test_verdict_differs_equivalent_or_cannot_be_distinguished():
    def verdict(lo, hi, tlo, thi, margin=0.005):
        return equivalence_verdict(Interval(0.0, lo, hi, 0.05), Interval(0.0, tlo, thi, 0.1), margin)

    assert verdict(0.001, 0.009, 0.002, 0.008) == "differs"
    assert verdict(-0.009, -0.001, -0.008, -0.002) == "differs"
    assert verdict(0.001, 0.003, 0.0015, 0.0025) == "differs"  # a significant difference inside the margin still differs
    assert verdict(-0.004, 0.004, -0.003, 0.003) == "equivalent"
    assert verdict(-0.0078, 0.0282, -0.006, 0.025) == "cannot be distinguished"  # e.g. +0.58 [−0.78, +2.82] pp
    assert verdict(-0.004, 0.004, -0.003, 0.003, margin=0.002) == "cannot be distinguished"
    with pytest.raises(ValueError, match="1 − 2α"):
        equivalence_verdict(Interval(0.0, -0.001, 0.001, 0.05), Interval(0.0, -0.001, 0.001, 0.05), 0.005)


def test_tost_rejects_at_most_alpha_of_the_time_on_the_margin():
    """θ exactly on the margin: the TOST at α = 0.05 (normal (1 − 2α) interval of a mean, known SD)
    declares equivalence in at most about α of 4,000 simulated studies, and far more often at θ = 0."""
    g = torch.Generator().manual_seed(0)
    n, sd, margin, z = 1600, 0.05, 0.005, 1.6448536269514722
    se = sd / n ** 0.5

    def rate(theta: float) -> float:
        means = theta + sd * torch.randn(4000, n, generator=g, dtype=torch.float64).mean(1)
        return sum(tost(Interval(float(m), float(m - z * se), float(m + z * se), 0.1), margin) for m in means) / 4000

    assert rate(margin) <= 0.05 + 3 * (0.05 * 0.95 / 4000) ** 0.5
    assert rate(0.0) > 0.5
