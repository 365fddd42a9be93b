"""lib.attribution_findings: the attribution chapter's findings as values, from hand-made tables."""

from __future__ import annotations

import pandas as pd
import pytest

from lib.attribution_findings import attribution_findings, certified_leader, control_findings, shape_verdict
from lib.interval import Interval


def _attribution(all_lower: float, single_lower=(-0.001, 0.001)) -> tuple[pd.DataFrame, pd.DataFrame]:
    """All blocks +1.00 [all_lower, +2.00] pp; block 0 +0.20, block 1 +0.60 [.., +1.10] pp (Holm: block 1)."""
    table = pd.DataFrame({"kind": ["all", "single", "single"], "block": [-1, 0, 1], "delta": [0.010, 0.002, 0.006],
                          "lower": [all_lower, *single_lower], "upper": [0.02, 0.005, 0.011], "d_acc": [-0.002, 0.0, 0.0],
                          "improves": [False, False, True]})
    ranks = pd.DataFrame({"block": [0, 1], "surely_top_k": [False, True], "top_k_candidate": [True, True]})
    return table, ranks


def _shapley(lower1: float) -> pd.DataFrame:
    """Block 0: +0.30 [−0.10, +0.60] pp; block 1: +0.70 [lower1, +1.20] pp."""
    return pd.DataFrame({"layer": ["block 0", "block 1"], "block": [0, 1], "phi": [0.003, 0.007],
                         "lower": [-0.001, lower1], "upper": [0.006, 0.012]})


def test_attribution_findings_follow_validation_and_the_sides_of_zero():
    table, ranks = _attribution(0.004)
    f = attribution_findings(table, ranks, _shapley(0.007), best=0, alpha=0.05, top_k=1)
    assert f.all_blocks == Interval(0.010, 0.004, 0.02, 0.05) and f.all_accuracy == -0.002
    assert f.best_block == 0 and f.best == Interval(0.002, -0.001, 0.005, 0.05)  # validation's choice, not the test's
    assert (f.above, f.below, f.holm, f.candidates, f.certified) == ((1,), (), (1,), (0, 1), (1,)) and f.singled_out
    flat = attribution_findings(*_attribution(0.004, single_lower=(-0.001, -0.002)), _shapley(0.007), 1, 0.05, 1)
    assert not flat.singled_out and flat.above == ()
    with pytest.raises(ValueError, match="choose_single"):
        attribution_findings(table, ranks, _shapley(0.007), best=5, alpha=0.05, top_k=1)


def test_shapley_leader_only_when_its_interval_lies_above_every_other():
    table, ranks = _attribution(0.004)
    certified = attribution_findings(table, ranks, _shapley(0.007), 1, 0.05, 1)  # [+0.70, +1.20] above [−0.10, +0.60]
    assert certified.shapley_leader == 1 and certified.leader_share == pytest.approx(0.7)
    assert certified.shapley_total == pytest.approx(0.010)
    overlapping = attribution_findings(table, ranks, _shapley(0.006), 1, 0.05, 1)  # 0.6 pp is not above 0.6 pp
    assert overlapping.shapley_leader is None and overlapping.leader_share is None
    unclear = attribution_findings(*_attribution(-0.004), _shapley(0.007), 1, 0.05, 1)
    assert unclear.shapley_leader == 1 and unclear.leader_share is None  # no share of a gain that may be zero


def test_certified_leader_by_hand():
    iv = lambda lo, hi: Interval((lo + hi) / 2, lo, hi, 0.05)  # noqa: E731
    assert certified_leader({0: iv(0.0, 1.0), 1: iv(2.0, 3.0), 2: iv(1.5, 1.9)}) == 1
    assert certified_leader({0: iv(0.0, 1.0), 1: iv(2.0, 3.0), 2: iv(1.5, 2.1)}) is None
    assert certified_leader({4: iv(-1.0, 1.0)}) == 4


def _control(diff, tost, edge=("", "", "")) -> pd.DataFrame:
    """Per block Δ_Laplace − Δ_iso with its 95% interval ``diff`` and its 90% interval ``tost``."""
    n = len(diff)
    return pd.DataFrame({"block": range(n), "kappa": [0.5] * n, "sigma2": [1e-4] * n, "sigma2_edge": list(edge)[:n],
                         "delta": [0.01] * n, "lower": [0.0] * n, "upper": [0.02] * n,
                         "delta_iso": [0.008] * n, "iso_lower": [-0.001] * n, "iso_upper": [0.017] * n,
                         "diff": [0.002] * n, "diff_lower": [d[0] for d in diff], "diff_upper": [d[1] for d in diff],
                         "tost_lower": [t[0] for t in tost], "tost_upper": [t[1] for t in tost]})


def test_control_verdicts_claim_equivalence_only_by_tost():
    control = _control([(0.001, 0.004), (-0.003, 0.005), (-0.004, -0.001), (-0.003, 0.004)],
                       [(0.0015, 0.0035), (-0.002, 0.0045), (-0.0035, -0.0015), (-0.006, 0.0035)],
                       ("", "upper", "lower", ""))
    c = control_findings(control, 0.05, 0.005)
    assert c.shape == {0: "better", 1: "equivalent", 2: "worse", 3: "cannot be distinguished"}
    assert c.blocks("equivalent") == (1,) and c.blocks("better") == (0,)
    assert c.diff[3] == Interval(0.002, -0.003, 0.004, 0.05) and c.margin == 0.005
    assert (c.lower_edge, c.upper_edge) == ((2,), (1,))
    narrow = control_findings(control, 0.05, 0.004)  # block 1's 90% upper bound +0.45 pp lies beyond ±0.4 pp
    assert narrow.shape[1] == "cannot be distinguished"
    assert shape_verdict(control.iloc[1], 0.05, 0.005) == "equivalent"
    with pytest.raises(ValueError, match="tost_lower"):
        control_findings(control.drop(columns="tost_lower"), 0.05, 0.005)
