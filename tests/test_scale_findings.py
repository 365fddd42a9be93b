"""lib.scale_findings: the covariance-scale table's findings as values."""

from __future__ import annotations

import pandas as pd
import pytest

from lib.scale_findings import scale_findings


def _scales(kmin: list[float], kmax: list[float]) -> pd.DataFrame:
    nan = float("nan")
    return pd.DataFrame({
        "posterior": ["deterministic (MAP)", "all", "single 0", "single 1"],
        "κ median": [nan, *kmin], "κ min": [nan, *kmin], "κ max": [nan, *kmax],
        "ECE % κ=1": [5.0, 9.0, 6.0, 5.5], "ECE % κ_S": [5.0, 3.0, 4.0, 4.5],
        "acc % κ=1": [90.0, 50.0, 88.0, 89.0], "acc % κ_S": [90.0, 89.0, 90.0, 90.0],
    })


def test_scale_findings_values_and_grid_ends():
    inside = scale_findings(_scales([0.01, 0.1, 0.5], [0.02, 0.2, 0.9]), (1e-4, 10.0))
    assert (inside.map_accuracy, inside.map_ece, inside.all_accuracy_raw, inside.all_ece_raw) == (90.0, 5.0, 50.0, 9.0)
    assert (inside.all_accuracy, inside.all_ece, inside.kappa_all) == (89.0, 3.0, 0.01)
    assert inside.single_kappa == (0.1, 0.9) and inside.posteriors == 3
    assert inside.at_upper == () and inside.at_lower == ()
    edges = scale_findings(_scales([0.0001, 0.1, 2.0], [0.0002, 0.2, 10.0]), (1e-4, 10.0))
    assert edges.at_upper == ("single 1",) and edges.at_lower == ("all",)
    with pytest.raises(ValueError, match="scale_table"):
        scale_findings(_scales([0.01, 0.1, 0.5], [0.02, 0.2, 0.9]).iloc[1:], (1e-4, 10.0))
