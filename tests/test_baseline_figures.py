"""lib.baseline_figures: the points, labels and Pareto front of the baselines figure, by hand."""

from __future__ import annotations

import matplotlib
import pandas as pd
import pytest

from lib.baseline_figures import plot_baseline_pareto, prepare_baseline_pareto, short_method

matplotlib.use("Agg")


def test_short_labels():
    assert short_method("temperature scaling") == "TS"
    assert short_method("Laplace, validation-chosen set (last 2 blocks)") == "LA validation-chosen"
    assert short_method("LoRA ensemble, M = 5 + TS") == "Ens 5+TS"
    assert short_method("MC dropout, no dropout at test") == "MCD det"
    assert short_method("something new") == "something new"


def test_points_and_front():
    table = pd.DataFrame({"method": ["MAP", "temperature scaling", "slow good", "slow bad"],
                          "extra_ms": [0.0, 0.0, 5.0, 6.0], "d_ece_map": [0.0, 0.02, 0.03, 0.01],
                          "d_ece_map_lo": [0.0, 0.01, 0.02, 0.0], "d_ece_map_hi": [0.0, 0.03, 0.04, 0.02],
                          "tuning": ["none", "temperature", "none", "none"]})
    data = prepare_baseline_pareto(table)
    assert list(data.front) == [False, True, True, False]  # MAP dominated by TS at the same cost; slow bad by slow good
    assert list(data.tuned) == [False, True, False, False] and list(data.label[:2]) == ["MAP", "TS"]
    fig = plot_baseline_pareto(data)
    assert fig.axes[0].get_xlabel().startswith("Extra latency")
    with pytest.raises(ValueError, match="lacks columns"):
        prepare_baseline_pareto(table.drop(columns=["tuning"]))
