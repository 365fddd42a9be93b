"""lib.interval: where an interval lies relative to zero, by hand."""

import math

import pandas as pd
import pytest

from lib.interval import Interval, blocks_of


@pytest.mark.parametrize("lower, upper, side", [
    (0.1, 0.3, "above"), (-0.3, -0.1, "below"), (-0.1, 0.2, "includes"),
    (0.0, 0.2, "includes"), (-0.2, 0.0, "includes"), (math.nan, math.nan, "includes"),
])
def test_side_by_hand(lower, upper, side):
    iv = Interval(0.0 if math.isnan(lower) else (lower + upper) / 2, lower, upper, 0.05)
    assert iv.side == side and iv.excludes_zero == (side != "includes")


def test_level_width_scaling_and_rows():
    iv = Interval(0.012, 0.004, 0.02, 0.1)
    assert iv.level == pytest.approx(0.9) and iv.width == pytest.approx(0.016)
    pp = iv.scaled(100)
    assert (pp.estimate, pp.lower, pp.upper) == pytest.approx((1.2, 0.4, 2.0)) and pp.alpha == 0.1
    flipped = iv.scaled(-1)
    assert (flipped.lower, flipped.upper) == pytest.approx((-0.02, -0.004)) and flipped.side == "below"
    row = pd.Series({"delta": 0.5, "lower": 0.1, "upper": 0.9, "other": 3})
    assert Interval.from_row(row, 0.05) == Interval(0.5, 0.1, 0.9, 0.05)
    assert Interval.from_row({"d": 1.0, "lo": -1.0, "hi": 2.0}, 0.05, "d", "lo", "hi").side == "includes"


def test_bad_intervals_are_named():
    with pytest.raises(ValueError, match="exceeds upper bound"):
        Interval(0.0, 1.0, -1.0, 0.05)
    with pytest.raises(ValueError, match="alpha must lie in"):
        Interval(0.0, -1.0, 1.0, 1.5)
    with pytest.raises(ValueError, match=r"no column\(s\) \['upper'\]"):
        Interval.from_row({"delta": 0.0, "lower": 0.0}, 0.05)
    with pytest.raises(ValueError, match="one NaN bound"):
        Interval.from_row({"delta": 0.0, "lower": math.nan, "upper": 1.0}, 0.05)


def test_blocks_of_gives_the_sorted_block_numbers_of_the_rows():
    assert blocks_of(pd.DataFrame({"block": [3, 1, 2]})) == (1, 2, 3)
    assert blocks_of(pd.DataFrame({"block": []})) == ()
    assert all(type(b) is int for b in blocks_of(pd.DataFrame({"block": [2.0, 0.0]})))
