"""lib.fit_findings: the findings of the setup and posterior chapters, as values from hand-made tables."""

from __future__ import annotations

import pandas as pd
import pytest

from lib.fit_findings import Range, curvature_choice, map_calibration, prior_finding, width_finding


def test_map_calibration_means_ranges_and_direction_over_seeds():
    det = pd.DataFrame({"seed": [0, 1, 2], "accuracy": [0.80, 0.90, 0.85], "ece": [0.02, 0.06, 0.04],
                        "signed_ece": [0.01, 0.03, -0.01]})
    m = map_calibration(det)
    assert m.seeds == 3
    assert m.accuracy == Range(pytest.approx(0.85), 0.80, 0.90) and m.ece == Range(pytest.approx(0.04), 0.02, 0.06)
    assert m.signed_ece == pytest.approx(0.01) and m.over_confident
    assert not map_calibration(det.assign(signed_ece=[-0.01, -0.03, 0.01])).over_confident
    with pytest.raises(ValueError, match="signed_ece"):
        map_calibration(det.drop(columns="signed_ece"))


def test_prior_finding_relates_the_tuned_prior_to_the_training_prior():
    blocks = pd.DataFrame({"block": [0, 1, 2], "prior_precision": [9.0, 24.0, 12.0],
                           "variance_trace": [171.0, 439.0, 50.0]})
    f = prior_finding(blocks, 0.04)
    assert (f.lowest_block, f.lowest, f.highest_block, f.highest) == (0, 9.0, 1, 24.0)
    assert (f.widest_block, f.widest, f.narrowest_block, f.narrowest) == (1, 439.0, 2, 50.0)
    assert f.relation == "stronger" and f.ratio == pytest.approx((225.0, 600.0))
    assert prior_finding(blocks, 100.0).relation == "weaker"
    assert prior_finding(blocks, 10.0).relation == "both sides"
    assert prior_finding(blocks, 9.0).relation == "both sides"  # a bound on the training prior is not "stronger"
    with pytest.raises(ValueError, match="positive"):
        prior_finding(blocks, 0.0)


def _quality(kl: dict[str, list[float]], var: dict[str, list[float]]) -> pd.DataFrame:
    """Block rows (two blocks) and a module row that must be ignored."""
    rows = []
    for a in kl:
        for b in range(2):
            rows.append({"block": b, "module": "block", "approximation": a, "kl": kl[a][b],
                         "logit_variance_error": var[a][b]})
        rows.append({"block": 0, "module": "fc1", "approximation": a, "kl": 0.0, "logit_variance_error": 0.0})
    return pd.DataFrame(rows)


def test_curvature_choice_medians_over_blocks_and_the_closest_structure():
    q = _quality({"K-FAC-expand": [100.0, 140.0], "K-FAC-reduce": [300.0, 340.0], "diagonal": [380.0, 400.0]},
                 {"K-FAC-expand": [0.3, 0.4], "K-FAC-reduce": [1.8, 1.6], "diagonal": [1.6, 1.6]})
    c = curvature_choice(q, "K-FAC-reduce")
    assert c.kl == {"K-FAC-expand": 120.0, "K-FAC-reduce": 320.0, "diagonal": 390.0}
    assert c.variance_error == pytest.approx({"K-FAC-expand": 0.35, "K-FAC-reduce": 1.7, "diagonal": 1.6})
    assert (c.by_kl, c.by_variance, c.closeness) == ("K-FAC-expand", "K-FAC-expand", "not closest")
    assert curvature_choice(q, "K-FAC-expand").closeness == "closest"
    q2 = _quality({"K-FAC-expand": [100.0, 100.0], "K-FAC-reduce": [300.0, 300.0]},
                  {"K-FAC-expand": [0.9, 0.9], "K-FAC-reduce": [0.1, 0.1]})
    assert curvature_choice(q2, "K-FAC-reduce").closeness == "closest in the predictive"
    assert curvature_choice(q2, "K-FAC-expand").closeness == "closest in the posterior"
    with pytest.raises(ValueError, match="dense block"):
        curvature_choice(q2, "dense block")
    with pytest.raises(ValueError, match="'block' rows"):
        curvature_choice(q2[q2.module != "block"], "K-FAC-reduce")


def _summary(delta: list[float], trace: list[float], gamma: list[float], n_params: int) -> pd.DataFrame:
    """One seed's ``blocks.csv`` of two blocks."""
    return pd.DataFrame({"block": [0, 1], "in_posterior": [True, True], "n_params": [n_params, n_params],
                         "prior_precision": delta, "curvature_trace": [1.0, 1.0], "variance_trace": trace,
                         "effective_params": gamma})


def test_width_finding_by_hand():
    """Shares of the prior variance P/δ kept: 1360·17.7/24576 ≈ 0.98 and 5193·4.71/24576 ≈ 0.995."""
    one = _summary([17.7, 4.71], [1360.0, 5193.0], [490.8, 125.3], 24576)
    w = width_finding([one])
    assert w.prior_share == pytest.approx((1360 * 17.7 / 24576, 5193 * 4.71 / 24576))
    assert w.effective == (125.3, 490.8) and w.n_params == 24576
    with pytest.raises(ValueError, match="blocks.csv"):
        width_finding([one, one.drop(columns="n_params")])
    with pytest.raises(ValueError, match="blocks.csv"):
        width_finding([])


def test_width_finding_averages_each_seeds_share_not_a_ratio_of_seed_means():
    """P = 100. Block 0: seed a δ = 1, tr Σ = 90 (share 0.9), seed b δ = 9, tr Σ = 10 (share 0.9):
    mean share 0.9, whereas the ratio of seed means 50 · 5 / 100 = 2.5 would claim 250% of the prior
    variance. Block 1: shares 25 · 2 / 100 = 0.5 and 17.5 · 4 / 100 = 0.7, mean 0.6 (ratio of seed
    means 21.25 · 3 / 100 = 0.6375)."""
    a = _summary([1.0, 2.0], [90.0, 25.0], [10.0, 4.0], 100)
    b = _summary([9.0, 4.0], [10.0, 17.5], [30.0, 8.0], 100)
    w = width_finding([a, b])
    assert w.prior_share == pytest.approx((0.6, 0.9))
    assert w.effective == (6.0, 20.0) and w.n_params == 100
