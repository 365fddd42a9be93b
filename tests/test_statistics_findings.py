"""lib.statistics_findings: the statistics chapter's findings as values, from hand-made tables."""

from __future__ import annotations

import pandas as pd
import pytest

from conftest import selection_frame
from lib.statistics_findings import (MATERIAL, agreement_findings, decisions, interval_check, mc_findings,
                                     selection_findings)


def test_decisions_put_every_block_in_one_statement():
    """Holm-significant, above zero but not after correction, sign unclear, or worse."""
    table = pd.DataFrame({"kind": ["single"] * 5 + ["all"], "block": [0, 1, 2, 3, 4, -1],
                          "delta": [0.01, 0.008, 0.006, 0.001, -0.01, 0.01],
                          "lower": [0.004, 0.001, 0.0002, -0.003, -0.02, 0.002],
                          "upper": [0.02, 0.012, 0.011, 0.006, -0.001, 0.02],
                          "improves": [True, False, False, False, False, False]})
    ranks = pd.DataFrame({"block": [0, 1, 2, 3, 4], "surely_top_k": [True, False, False, False, False]})
    d = decisions(table, ranks, 2)
    assert (d.holm, d.above, d.uncorrected, d.below, d.unclear, d.certified) == ((0,), (0, 1, 2), (1, 2), (4,), (3,), (0,))
    assert d.blocks == 5 and d.top_k == 2 and d.singled_out
    assert d.median_width == pytest.approx(0.011)  # widths 1.6, 1.1, 1.08, 0.9, 1.9 pp
    flat = decisions(table.assign(lower=-0.03, upper=0.03, improves=False), ranks.assign(surely_top_k=False), 2)
    assert not flat.singled_out and flat.unclear == (0, 1, 2, 3, 4) and flat.holm == flat.certified == ()


def _mc(mc_se: list[float], halving: list[float], delta=(0.01, 0.01, 0.01)) -> pd.DataFrame:
    test_se = [0.004, 0.004, 0.005]
    return pd.DataFrame({"posterior": ["single 0", "single 1", "all"], "block": [0, 1, -1], "delta": list(delta),
                         "mc_se": mc_se, "halving": halving, "test_se": test_se,
                         "mc_share": [m / t for m, t in zip(mc_se, test_se)]})


def test_mc_findings_small_monte_carlo_error():
    m = mc_findings(_mc([0.0004, 0.0008, 0.0005], [-0.0002, 0.0001, -0.0005]), 0.05)
    assert m.max_se == 0.0008 and m.median_se == 0.0005 and m.median_share == pytest.approx(0.1)
    assert m.worst == "single 1" and m.worst_share == pytest.approx(0.2) and m.noisy == () and m.checked == 3
    assert m.widening == pytest.approx(1.04 ** 0.5 - 1)
    assert m.drifted == "all" and m.drift == pytest.approx(0.0005) and m.drift_ratio == pytest.approx(0.1)
    assert m.drift_share == pytest.approx(0.05) and m.settled  # ΔECE 1 pp > 1.96 × 0.5 pp: a share means something


def test_mc_findings_noisy_posteriors_drift_and_no_share_of_a_gain_within_its_error():
    m = mc_findings(_mc([0.0004, 0.0030, 0.0005], [-0.0002, 0.0001, -0.0040]), 0.05)
    assert m.noisy == ("single 1",) and not m.settled and m.drift_ratio == pytest.approx(0.8)
    tiny = mc_findings(_mc([0.0004, 0.0008, 0.0005], [-0.0002, 0.0001, -0.0045], delta=(0.01, 0.01, 0.00005)), 0.05)
    assert tiny.drifted == "all" and tiny.drift_share is None  # not "9000% of its ΔECE"
    assert tiny.z == pytest.approx(1.959964, abs=1e-6)
    # the rule is |Δ| > z·SE with z at the level: 0.9 pp is beyond 1.64 × 0.5 pp (α = 0.1) but not 1.96 × 0.5 pp
    edge = _mc([0.0004, 0.0008, 0.0005], [-0.0002, 0.0001, -0.0005], delta=(0.01, 0.01, 0.009))
    assert mc_findings(edge, 0.1).drift_share == pytest.approx(0.0005 / 0.009)
    assert mc_findings(edge, 0.05).drift_share is None
    every = mc_findings(_mc([0.004, 0.003, 0.005], [0.0, 0.0, 0.0]), 0.05)
    assert every.noisy == ("single 0", "single 1", "all")
    with pytest.raises(ValueError, match="mc_error"):
        mc_findings(_mc([0.1] * 3, [0.0] * 3).iloc[:0], 0.05)


def test_selection_findings():
    small = selection_findings(selection_frame([0.001, 0.002, 0.0005], [0.01, 0.01, 0.008], [0.9, 0.6, 0.95]))
    assert small.validation_images == 1000 and small.stable == (0.6, 0.95) and small.max_se == 0.002
    assert small.worst == "single 1" and small.worst_share == pytest.approx(0.2) and small.material == ()
    material = selection_findings(selection_frame([0.008, 0.002, 0.006], [0.01, 0.01, 0.008], [0.3, 0.6, 0.4]))
    assert material.material == ("single 0", "all") and material.worst_share > MATERIAL
    assert selection_findings(selection_frame([0.001], [0.01], [0.9]).iloc[0:0]) is None


def test_interval_check_largest_shift_and_changed_verdicts():
    intervals = pd.DataFrame({"block": [0, 1, 2], "delta": [0.0, 0.01, -0.01],
                              "percentile_lower": [-0.01, 0.001, -0.02], "percentile_upper": [0.01, 0.02, 0.0],
                              "bca_lower": [-0.012, -0.002, -0.021], "bca_upper": [0.01, 0.019, 0.001]})
    chk = interval_check(intervals)
    # shifts: 0.2 pp of 2 pp (10%), 0.3 pp of 1.9 pp (16%), 0.1 pp of 2 pp (5%); block 1 loses its sign
    assert chk.shift == pytest.approx(0.003) and chk.share == pytest.approx(0.003 / 0.019) and chk.at == 1
    assert chk.differ == (1,)
    assert interval_check(intervals.assign(bca_lower=[-0.012, 0.0005, -0.021])).differ == ()


def _agreement(tops: list[int], all_same: list[bool] = (True, True)) -> pd.DataFrame:
    return pd.DataFrame({"estimator": ["equal-mass ECE", "smooth ECE"], "kendall_tau": [0.8, 0.6], "discordant": [6, 13],
                         "pairs": [66, 66], "top_block": tops, "top_block_study": [11, 11], "same_sign": [12, 10],
                         "blocks": [12, 12], "all_same_sign": list(all_same)})


def _ranks(leader_upper: int) -> pd.DataFrame:
    return pd.DataFrame({"block": [3, 11], "rank_upper": [2, leader_upper]})


def test_agreement_findings_leaders_and_signs():
    same = agreement_findings(_agreement([11, 11]), _ranks(1))
    assert same.leader == 11 and same.leader_certified and same.blocks == 12 and same.differing == () and same.flipped == ()
    assert [(a.name, a.tau, a.discordant, a.pairs, a.same_sign) for a in same.alternatives] == [
        ("equal-mass ECE", 0.8, 6, 66, 12), ("smooth ECE", 0.6, 13, 66, 10)]
    differ = agreement_findings(_agreement([11, 3], [True, False]), _ranks(4))
    assert [(a.name, a.leader) for a in differ.differing] == [("smooth ECE", 3)] and not differ.leader_certified
    assert differ.flipped == ("smooth ECE",)
    with pytest.raises(ValueError, match="ranking_agreement"):
        agreement_findings(_agreement([11, 11]).iloc[:0], _ranks(1))
