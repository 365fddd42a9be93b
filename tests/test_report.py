"""lib.report: the generated recommendation sentences follow the numbers they are given."""

from __future__ import annotations

import pandas as pd

from lib.report import recommendation


def _front(all_lower: float) -> pd.DataFrame:
    return pd.DataFrame({
        "name": ["single 3", "last 2", "all"], "cost": [1.0, 2.0, 4.0], "delta": [0.004, 0.009, 0.010],
        "lower": [-0.001, 0.002, all_lower], "upper": [0.008, 0.015, 0.016], "front": [True, True, True],
    })


def _baseline(ece_last2: float, ts_ece: float = 3.0) -> pd.DataFrame:
    return pd.DataFrame({
        "method": ["deterministic (MAP)", "temperature scaling (validation-fitted)", "Laplace, single 3",
                   "Laplace, last 2", "Laplace, all"],
        "ECE (%)": [6.0, ts_ece, 5.6, ece_last2, 5.0], "accuracy (%)": [90.0, 90.0, 90.1, 89.8, 89.5],
    })


def test_picks_cheapest_front_choice_with_80_percent_of_the_gain():
    text = recommendation(_front(0.004), 0.010, 4.0, _baseline(2.5))
    assert text.startswith("Make **last 2** Bayesian: it recovers 90% of the all-block calibration gain")
    assert "at 50% of the all-block extra latency" in text and "-0.20 pp" in text
    assert "tentative" not in text and "beats temperature scaling (2.50% vs 3.00% ECE)" in text


def test_caveat_when_the_all_block_interval_includes_zero_and_ts_wins():
    text = recommendation(_front(-0.001), 0.010, 4.0, _baseline(5.1))
    assert "tentative" in text and "+1.00 [-0.10, +1.60] pp" in text
    assert "Temperature scaling, fitted on the validation set, reaches a lower ECE (3.00% vs 5.10%)" in text


def test_no_recommendation_without_an_all_block_gain():
    text = recommendation(_front(-0.02), -0.001, 4.0, _baseline(5.1))
    assert text.startswith("On this profile the all-block Laplace does not improve ECE") and "3.00%" in text
