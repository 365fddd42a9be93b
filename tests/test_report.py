"""lib.report: the result tables, the number formatting, and the sentences of chapters 04-06 that are still generated here."""

from __future__ import annotations

import json
import math
import re
from types import SimpleNamespace

import pandas as pd
import pytest
import torch

from lib.config import Config
from lib.report import (book_table, display_selection_table, selection_summary, attribution_summary, baseline_table, block_table, deterministic_table,
                        control_summary, display_control_table, display_layer_table, interval_check_summary,
                        statistics_summary, display_rank_table, estimator_summary, in_pp, laplace_fit_table,
                        mc_error_summary, readable, recommendation, scale_sensitivity_summary,
                        scale_summary)


def _front() -> pd.DataFrame:
    return pd.DataFrame({"name": ["single 3", "last 2", "all"], "cost": [1.0, 2.0, 4.0], "delta": [0.004, 0.009, 0.010],
                         "front": [True, True, True]})


def _table(lower: float = 0.002, ts: tuple = (0.005, 0.001, 0.009)) -> pd.DataFrame:
    """Attribution rows: last 2 with ΔECE +0.90 [lower, +1.50] pp and $\\mathrm{ECE}_{\\mathrm{TS}}-\\mathrm{ECE}$ = ts."""
    return pd.DataFrame({"posterior": ["single 3", "last 2", "all"], "delta": [0.004, 0.009, 0.010],
                         "lower": [-0.001, lower, 0.004], "upper": [0.008, 0.015, 0.016],
                         "ts_delta": [-0.01, ts[0], 0.001], "ts_lower": [-0.02, ts[1], -0.003],
                         "ts_upper": [0.0, ts[2], 0.006]})


def _baseline(ece_last2: float = 2.5, ts_ece: float = 3.0) -> pd.DataFrame:
    return pd.DataFrame({
        "method": ["deterministic (MAP)", "temperature scaling (validation-fitted)", "Laplace, block 3 only",
                   "Laplace, last 2 blocks", "Laplace, all blocks"],
        "ECE (%)": [6.0, ts_ece, 5.6, ece_last2, 5.0], "accuracy (%)": [90.0, 90.0, 90.1, 89.8, 89.5],
    })


def test_recommends_the_validation_choice_with_its_test_interval_and_the_paired_ts_interval():
    text = recommendation(_front(), _table(), _baseline(), "last 2", alpha=0.05)
    assert text.startswith("Make **last 2 blocks** Bayesian (chosen on the validation images as the cheapest priced "
                           "choice with at least 80% of the all-block validation gain): on the test set, which played no "
                           "part in choosing it, its ΔECE is +0.90 [+0.20, +1.50] pp, against +1.00 [+0.40, +1.60] pp for all blocks")
    assert "at 2 ms extra per image (50% of the all-block extra latency); its accuracy changes by −0.20 pp" in text
    assert ("It calibrates better than temperature scaling, which costs nothing at prediction time: "
            "$\\mathrm{ECE}_{\\mathrm{TS}}-\\mathrm{ECE}$ = +0.50 [+0.10, +0.90] pp (95% paired interval).") in text
    assert "2.50%" not in text and "3.00%" not in text  # never two point estimates side by side
    assert "(90% paired interval)" in recommendation(_front(), _table(), _baseline(), "last 2", alpha=0.1)


def test_temperature_scaling_verdict_follows_the_paired_interval():
    tie = recommendation(_front(), _table(ts=(0.002, -0.001, 0.004)), _baseline(), "last 2", alpha=0.05)
    assert "the data cannot tell the two apart: $\\mathrm{ECE}_{\\mathrm{TS}}-\\mathrm{ECE}$ = +0.20 [−0.10, +0.40] pp" in tie
    worse = recommendation(_front(), _table(ts=(-0.005, -0.009, -0.001)), _baseline(), "last 2", alpha=0.05)
    assert worse.startswith("Use temperature scaling, not a Bayesian block: on the test set it calibrates better than "
                            "**last 2 blocks**")
    assert "$\\mathrm{ECE}_{\\mathrm{TS}}-\\mathrm{ECE}$ = −0.50 [−0.90, −0.10] pp" in worse
    assert "Make" not in worse and "Bayesian (" not in worse
    gainless = recommendation(_front(), _table(lower=-0.001, ts=(-0.005, -0.009, -0.001)), _baseline(), "last 2",
                              alpha=0.05)
    assert "Temperature scaling, fitted on the validation set, calibrates better at no extra cost" in gainless


def test_no_recommendation_when_the_chosen_sets_interval_includes_zero():
    text = recommendation(_front(), _table(lower=-0.001), _baseline(), "last 2", alpha=0.05)
    assert "**last 2 blocks** has on the test set ΔECE = +0.90 [−0.10, +1.50] pp: its interval includes zero, so no choice" in text
    assert "Make" not in text


def test_accuracy_loss_caveat_for_an_under_confident_model():
    """Under-confident everywhere, ECE = accuracy − confidence: a gain that is mostly lost accuracy is called so."""
    base = _baseline().assign(**{"signed ECE (pp)": [-6.0, 0.5, -5.0, -2.0, -4.0]})
    text = recommendation(_front(), _table(), base.assign(**{"accuracy (%)": [90.0, 90.0, 90.1, 89.4, 89.5]}), "last 2",
                          alpha=0.05)
    assert "under-confident (signed ECE −6.00 pp)" in text and "the accuracy loss of 0.60 pp accounts for at least half" in text
    assert "under-confident" not in recommendation(_front(), _table(), base, "last 2", alpha=0.05)  # 0.2 pp < half of 0.9


def test_no_recommendation_without_a_validation_gain():
    text = recommendation(_front(), _table(), _baseline(), None, alpha=0.05)
    assert text.startswith("On the validation images the all-block Laplace does not lower the ECE, so no "
                           "Bayesian-block choice is recommended for calibration (all blocks on the test set: "
                           "ΔECE = +1.00 [+0.40, +1.60] pp).")
    assert "cannot tell the two apart: $\\mathrm{ECE}_{\\mathrm{TS}}-\\mathrm{ECE}$ = +0.10 [−0.30, +0.60] pp" in text


def _mc(mc_se: list[float], halving: list[float]) -> pd.DataFrame:
    test_se = [0.004, 0.004, 0.005]
    return pd.DataFrame({"posterior": ["single 0", "single 1", "all"], "block": [0, 1, -1], "delta": [0.01] * 3,
                         "mc_se": mc_se, "halving": halving, "test_se": test_se,
                         "mc_share": [m / t for m, t in zip(mc_se, test_se)]})


def test_mc_error_summary_small_monte_carlo_error():
    text = mc_error_summary(_mc([0.0004, 0.0008, 0.0005], [-0.0002, 0.0001, -0.0005]), 32)
    assert text.startswith("With K = 32 posterior samples the Monte Carlo standard error of ΔECE is at most 0.08 pp")
    assert "10% of the test-set standard error at the median and 20% at most (block 1 only)" in text
    assert "by at most about 2% over the test-set error alone" in text
    assert ("shifts ΔECE on average by 0.05 pp for the all-block posterior (10% of its test-set standard error, the "
            "largest relative shift, and 5% of its ΔECE)") in text and "it is small next to the test-set error." in text


def test_mc_error_summary_flags_noisy_posteriors_and_drift():
    text = mc_error_summary(_mc([0.0004, 0.0030, 0.0005], [-0.0002, 0.0001, -0.0040]), 8)
    assert ("For block 1 only Monte Carlo noise is comparable to test-set noise (its standard error is more than half the "
            "test-set one). The intervals") in text
    assert "more samples (`predictive.n_samples`) would narrow them" in text
    assert "by 0.40 pp for the all-block posterior (80% of its test-set standard error" in text
    assert "may differ from the infinite-sample ones" in text


def _scales(kmin: list[float], kmax: list[float]) -> pd.DataFrame:
    nan = float("nan")
    return pd.DataFrame({
        "posterior": ["deterministic (MAP)", "all", "single 0", "single 1"],
        "κ median": [nan, *kmin], "κ min": [nan, *kmin], "κ max": [nan, *kmax],
        "ECE % κ=1": [5.0, 9.0, 6.0, 5.5], "ECE % κ_S": [5.0, 3.0, 4.0, 4.5],
        "acc % κ=1": [90.0, 50.0, 88.0, 89.0], "acc % κ_S": [90.0, 89.0, 90.0, 90.0],
    })


def test_scale_summary_flags_kappa_at_the_grid_ends():
    cfg = Config.from_dict({"predictive": {"scale": "val_nll", "scale_range": [1e-4, 10.0]}})
    inside = scale_summary(_scales([0.01, 0.1, 0.5], [0.02, 0.2, 0.9]), cfg)
    assert "end of the grid" not in inside and "κ = 0.01 for it" in inside
    edges = scale_summary(_scales([0.0001, 0.1, 2.0], [0.0002, 0.2, 10.0]), cfg)
    assert "For block 1 only the selected κ is at the upper end of the grid" in edges
    assert "For the all-block posterior the selected κ is at the lower end of the grid" in edges and "`predictive.scale_range`" in edges


def test_mc_error_summary_names_every_posterior_when_all_are_noisy():
    text = mc_error_summary(_mc([0.004, 0.003, 0.005], [0.0, 0.0, 0.0]), 8)
    assert "For every posterior in the table Monte Carlo noise is comparable" in text


def test_display_rank_table():
    ranks = pd.DataFrame({"block": [0, 1], "delta": [0.0123, -0.004], "rank": [1, 2], "rank_lower": [1, 1],
                          "rank_upper": [1, 2], "p_top_k": [0.97, 0.031], "top_k_candidate": [True, True],
                          "surely_top_k": [True, False]})
    shown = display_rank_table(ranks, 1, 0.1)
    assert list(shown.columns) == ["Block", "ΔECE (pp)", "Rank", "90% rank interval", "P(top 1)", "May be top 1",
                                   "Certified top 1"]
    assert list(shown.iloc[0]) == [0, "+1.23", 1, "[1, 1]", "0.97", "yes", "yes"]
    assert list(shown.iloc[1, 3:]) == ["[1, 2]", "0.03", "yes", "no"]


def test_readable_renames_columns_and_formats_by_quantity():
    df = pd.DataFrame({"block": [0, 1], "delta_seed0": [0.1, -0.2], "delta": [0.3, 0.4], "p_holm": [0.0315, 0.0002],
                       "train_seconds": [8.0384, 12.96], "fit_images_per_s": [2992.189, 41750.8],
                       "unknown_col": [1, 2]}).set_index("block")
    out = readable(df)
    assert list(out.columns) == ["seed 0", "ΔECE", "Holm p", "train s", "images / s", "unknown_col"]
    assert out.index.name == "Block" and list(out.index) == [0, 1]
    assert out.to_numpy().tolist() == [["+0.10", "+0.30", "0.032", "8.0", "2,992", 1],
                                       ["−0.20", "+0.40", "<0.001", "13.0", "41,751", 2]]
    named = readable(pd.DataFrame({"posterior": ["single 11", "all", "last 7"], "mc_se": [0.2012, 0.1, 0.3]})
                     .set_index("posterior"))
    assert list(named.index) == ["block 11 only", "all blocks", "last 7 blocks"] and named.index.name == "Posterior"
    assert list(named["MC SE"]) == ["0.20", "0.10", "0.30"]
    ci = pd.DataFrame({"delta": [0.1], "lower": [0.0], "upper": [0.2]})
    assert list(readable(ci).columns) == ["ΔECE", "lower", "upper"]
    assert list(readable(ci, alpha=0.05).columns) == ["ΔECE", "95% lower", "95% upper"]
    assert list(readable(ci, alpha=0.1).columns) == ["ΔECE", "90% lower", "90% upper"]


def test_book_table_has_one_header_row_with_the_row_labels_named_in_its_corner():
    """pandas writes an index name on a header row of its own, which Quarto's Typst PDF shows as an
    empty row; :func:`book_table` puts it in the header's corner, and further index levels into columns."""
    df = pd.DataFrame({"Posterior": ["all blocks", "block 0 only"], "ECE": ["1.0", "2.0"]}).set_index("Posterior")
    assert df.to_html().count("<tr") == 4  # the index-name row
    shown = book_table(df)
    html = shown.to_html()
    assert html.count("<tr") == 3 and re.findall(r"<th>([^<]*)</th>", html)[:2] == ["Posterior", "ECE"]
    assert list(shown.index) == ["all blocks", "block 0 only"] and list(shown["ECE"]) == ["1.0", "2.0"]
    two = pd.DataFrame({"a": ["k", "k"], "m": ["q", "v"], "x": [1, 2]}).set_index(["a", "m"])
    html = book_table(two).to_html()
    assert html.count("<tr") == 3 and re.findall(r"<th>([^<]*)</th>", html)[:3] == ["a", "m", "x"]
    plain = pd.DataFrame({"x": [1, 2]})
    assert book_table(plain).to_html() == plain.to_html()


def _attribution(all_lower: float, single_lower=(-0.001, 0.001)) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    table = pd.DataFrame({"kind": ["all", "single", "single"], "block": [-1, 0, 1], "delta": [0.010, 0.002, 0.006],
                          "lower": [all_lower, *single_lower], "upper": [0.02, 0.005, 0.011], "d_acc": [0.0, 0.0, 0.0],
                          "improves": [False, False, True]})
    ranks = pd.DataFrame({"block": [0, 1], "surely_top_k": [False, True], "top_k_candidate": [True, True]})
    shapley = pd.DataFrame({"layer": ["block 0", "block 1"], "phi": [0.003, 0.007], "lower": [-0.001, -0.002],
                            "upper": [0.006, 0.012]})
    return table, ranks, shapley


def test_shapley_shares_only_of_a_gain_whose_interval_excludes_zero():
    text = attribution_summary(*_attribution(0.004), 0.05, 1, best=1)
    assert ("By Shapley value, block 1 contributes most on the test set, +0.70 [−0.20, +1.20] pp (70% of the all-block "
            "gain)") in text
    unclear = attribution_summary(*_attribution(-0.004), 0.05, 1, best=1)
    assert ("block 1 contributes most on the test set, +0.70 [−0.20, +1.20] pp; the Shapley values of all blocks sum to "
            "the all-block gain, +1.00 pp") in unclear
    assert "%" not in unclear.split("By Shapley value")[1]


def test_attribution_summary_reports_the_validation_choice_and_says_when_nothing_is_significant():
    """The block chosen on validation data is reported, even when another has the larger test ΔECE."""
    text = attribution_summary(*_attribution(0.004), 0.05, 1, best=0)
    assert "Chosen on the validation images, the best single block is block 0; on the test set its ΔECE is " \
           "+0.20 [−0.10, +0.50] pp." in text
    assert "The intervals of block 1 lie above zero." in text and "do not single out" not in text
    flat = attribution_summary(*_attribution(0.004, single_lower=(-0.001, -0.002)), 0.05, 1, best=0)
    assert "No block's interval excludes zero; the data do not single out a block." in flat


def test_statistics_summary_says_plainly_when_nothing_is_significant():
    table, ranks, _ = _attribution(0.004, single_lower=(-0.001, -0.002))
    text = statistics_summary(table.assign(improves=False), ranks.assign(surely_top_k=False), 2, 0.05, 1)
    assert "No block's interval excludes zero; the data do not single out a block." in text
    assert "include the choice of $\\kappa_S$" in text
    table, ranks, _ = _attribution(0.004)
    assert "do not single out" not in statistics_summary(table, ranks, 2, 0.05, 1)


def _control(diff_lower, diff_upper, edge=("", "", "")) -> pd.DataFrame:
    n = len(diff_lower)
    return pd.DataFrame({"block": range(n), "kappa": [0.5] * n, "sigma2": [1e-4] * n, "sigma2_edge": list(edge)[:n],
                         "delta": [0.01] * n, "lower": [0.0] * n, "upper": [0.02] * n,
                         "delta_iso": [0.008] * n, "iso_lower": [-0.001] * n, "iso_upper": [0.017] * n,
                         "diff": [0.002] * n, "diff_lower": diff_lower, "diff_upper": diff_upper})


def test_control_summary_verdict_per_block_from_the_paired_interval():
    text = control_summary(_control([0.001, -0.003, -0.004], [0.004, 0.005, -0.001]), 0.05)
    assert ("For block 0 the Laplace posterior's shape calibrates better than isotropic noise of tuned size "
            "(the 95% interval of $\\Delta_{\\mathrm{ECE}}^{\\mathrm{Laplace}}-\\Delta_{\\mathrm{ECE}}^{\\mathrm{iso}}$ lies above zero).") in text
    assert "For block 2 isotropic noise of tuned size calibrates better than the Laplace posterior" in text
    assert "For block 1 the control matches the Laplace block" in text and "not specific to the posterior's shape" in text
    same = control_summary(_control([-0.001, -0.003, -0.004], [0.004, 0.005, 0.001], ("", "upper", "lower")), 0.1)
    assert same.startswith("For every block the isotropic control matches the Laplace block's ΔECE")
    assert "the calibration gain is not specific to the posterior's shape" in same
    assert "For block 2 the tuned σ² sits at the lower end of its grid" in same and "almost like the MAP" in same
    assert "For block 1 the tuned σ² sits at the upper end of its grid" in same
    assert "end of its grid" not in text


def test_display_control_table_formats_intervals_and_verdicts():
    out = display_control_table(_control([0.001, -0.003], [0.004, 0.005], ("", "lower")), 0.05)
    assert list(out.columns) == ["Block", "tuned κ", "tuned σ²", "ΔECE Laplace, pp [95% CI]", "ΔECE isotropic, pp [95% CI]",
                                 "Laplace − isotropic, pp [95% CI]", "Laplace shape"]
    assert out.iloc[0].tolist() == [0, "0.5", "0.0001", "+1.00 [+0.00, +2.00]", "+0.80 [−0.10, +1.70]",
                                    "+0.20 [+0.10, +0.40]", "better"]
    assert out.iloc[1, 2] == "0.0001 (lower end of grid)" and out.iloc[1, 6] == "no difference shown"


def _agreement(tops: list[int], all_same: list[bool] = (True, True)) -> pd.DataFrame:
    return pd.DataFrame({"estimator": ["equal-mass ECE", "smooth ECE"], "kendall_tau": [0.8, 0.6], "discordant": [6, 13],
                         "pairs": [66, 66], "top_block": tops, "top_block_study": [11, 11], "same_sign": [12, 10],
                         "blocks": [12, 12], "all_same_sign": list(all_same)})


def _ranks(leader_upper: int) -> pd.DataFrame:
    return pd.DataFrame({"block": [3, 11], "rank_upper": [2, leader_upper]})


def test_estimator_summary_names_disagreeing_leaders():
    same = estimator_summary(_agreement([11, 11]), False, _ranks(1))
    assert ("Kendall's τ of the single-block ΔECE is 0.80 (equal-mass ECE; 6 of 66 block pairs ordered differently), "
            "0.60 (smooth ECE; 13 of 66 block pairs ordered differently).") in same
    assert "Block 11 ranks first under every one of them." in same and "12 of 12 (equal-mass ECE), 10 of 12 (smooth ECE)" in same
    assert "keeps its sign under every one of them" in same and "reduces to" not in same
    differ = estimator_summary(_agreement([11, 3]), False, _ranks(1))
    assert "but block 3 under the smooth ECE, so which block leads depends on this choice" in differ
    uncertified = estimator_summary(_agreement([11, 3], [True, False]), True, _ranks(4))
    assert "in the first place, this is no evidence against the ranking" in uncertified
    assert "the all-block gain changes sign under the smooth ECE" in uncertified
    assert uncertified.startswith("Equal-width and equal-mass bins give the same gains")


def test_in_pp_converts_only_the_named_columns():
    df = pd.DataFrame({"block": [0, 1], "delta": [0.012345, -0.0004], "p_holm": [0.5, 1.0]})
    out = in_pp(df, ["delta"])
    assert list(out.delta) == [1.234, -0.04] and list(out.p_holm) == [0.5, 1.0] and list(out.block) == [0, 1]
    with pytest.raises(ValueError, match="columns \\['ece'\\] not in the table"):
        in_pp(df, ["ece"])


def test_scale_sensitivity_summary_uses_the_scalings_as_names():
    agree = _agreement([11, 3], [False, True]).assign(estimator=["shared κ_all", "κ = 1"])
    text = scale_sensitivity_summary(agree, _ranks(1))
    assert text.startswith("Against each subset's own $\\kappa_S$, Kendall's τ of the single-block ΔECE is 0.80 "
                           "(the all-block $\\kappa_{\\mathrm{all}}$;")
    assert "but block 3 under $\\kappa = 1$, so which block leads depends on this choice" in text
    assert "the all-block gain changes sign under the all-block $\\kappa_{\\mathrm{all}}$." in text
    assert "κ_S" not in text and "κ_all" not in text


def _metrics(ece: float) -> pd.DataFrame:
    return pd.DataFrame({"posterior": ["none", "temperature scaling", "all"], "ece": [0.06, 0.03, ece],
                         "signed_ece": [-0.06, 0.01, -0.04], "nll": [0.5, 0.4, 0.45], "accuracy": [0.9, 0.9, 0.89]})


def test_baseline_table_means_over_seeds_and_memory_only_where_measured():
    latency = pd.DataFrame({"posterior": ["deterministic", "all"], "extra_ms": [0.0, 2.5],
                            "peak_mib": [float("nan"), float("nan")]})
    table = baseline_table([_metrics(0.05), _metrics(0.03)], ["all"], latency).set_index("method")
    assert table.loc["Laplace, all blocks", "ECE (%)"] == 4.0 and table.loc["Laplace, all blocks", "signed ECE (pp)"] == -4.0
    assert table.loc["Laplace, all blocks", "extra ms / image"] == 2.5 and "peak MiB" not in table.columns
    cuda = baseline_table([_metrics(0.05)], ["all"], latency.assign(peak_mib=[120.0, 900.0])).set_index("method")
    assert list(cuda["peak MiB"]) == [120.0, 120.0, 900.0]


def test_block_table_mean_and_range_over_seeds():
    def seed(prior, curv, var, eff):
        return pd.DataFrame({"block": [1, 0], "n_params": [64, 48], "prior_precision": prior, "curvature_trace": curv,
                             "variance_trace": var, "effective_params": eff})

    table = block_table([seed([2.0, 10.0], [100.0, 7.0], [3.0, 0.5], [6.0, 1.0]),
                         seed([4.0, 30.0], [300.0, 5.0], [1.0, 1.5], [8.0, 3.0])])
    cols = ["prior_precision", "curvature_trace", "variance_trace", "effective_params"]
    assert list(table.columns) == ["block", *cols, *[f"{c}_{s}" for c in cols for s in ("min", "max")], "n_params"]
    assert list(table.block) == [0, 1] and list(table.n_params) == [48, 64]
    expected = {  # block 0, block 1
        "prior_precision": [20.0, 3.0], "prior_precision_min": [10.0, 2.0], "prior_precision_max": [30.0, 4.0],
        "curvature_trace": [6.0, 200.0], "curvature_trace_min": [5.0, 100.0], "curvature_trace_max": [7.0, 300.0],
        "variance_trace": [1.0, 2.0], "variance_trace_min": [0.5, 1.0], "variance_trace_max": [1.5, 3.0],
        "effective_params": [2.0, 7.0], "effective_params_min": [1.0, 6.0], "effective_params_max": [3.0, 8.0],
    }
    for col, values in expected.items():
        assert list(table[col]) == pytest.approx(values, abs=1e-12), col


def _fake_run(tmp_path, seed: int, logits: torch.Tensor, labels: torch.Tensor, history: list[dict]):
    folder = tmp_path / f"map{seed}"
    folder.mkdir()
    torch.save(logits, folder / "test_logits.pt")
    return SimpleNamespace(seed=seed, stage=SimpleNamespace(file=lambda name: folder / name),
                           splits=SimpleNamespace(test=SimpleNamespace(y=labels)), history=history)


def test_deterministic_table_metrics_from_the_cached_test_logits(tmp_path):
    """Four test images, two bins: probabilities (0.9, 0.1) right, (0.8, 0.2) wrong, (0.3, 0.7) right,
    (0.6, 0.4) right; all confidences in the upper bin [0.5, 1): ECE = |3 − 3.0| / 4 = 0,
    signed 0; NLL = −(ln .9 + ln .2 + ln .7 + ln .6) / 4; Brier = 2 (.01 + .64 + .09 + .16) / 4."""
    probs = torch.tensor([[0.9, 0.1], [0.8, 0.2], [0.3, 0.7], [0.6, 0.4]], dtype=torch.float64)
    labels = torch.tensor([0, 1, 1, 0])
    hist = [{"val_acc": 0.5, "seconds": 2.0}, {"val_acc": 0.75, "seconds": 3.5}]
    shifted = torch.tensor([[0.99, 0.01], [0.3, 0.7], [0.3, 0.7], [0.8, 0.2]], dtype=torch.float64)
    runs = [_fake_run(tmp_path, 0, probs.log().float(), labels, hist),
            _fake_run(tmp_path, 3, shifted.log().float(), labels, hist[:1])]
    table = deterministic_table(runs, n_bins=2)
    assert list(table.columns) == ["seed", "accuracy", "ece", "signed_ece", "nll", "brier", "val_accuracy",
                                   "train_seconds"]
    assert list(table.seed) == [0, 3] and list(table.val_accuracy) == [0.75, 0.5] and list(table.train_seconds) == [5.5, 2.0]
    first = table.iloc[0]
    assert first.accuracy == pytest.approx(0.75, abs=1e-6)
    assert first.ece == pytest.approx(0.0, abs=1e-6) and first.signed_ece == pytest.approx(0.0, abs=1e-6)
    assert first.nll == pytest.approx(-(math.log(0.9) + math.log(0.2) + math.log(0.7) + math.log(0.6)) / 4, abs=1e-6)
    assert first.brier == pytest.approx(2 * (0.01 + 0.64 + 0.09 + 0.16) / 4, abs=1e-6)
    # second seed: all right, confidences .99, .7, .7, .8, all in [0.5, 1): ECE = signed = −(3.19 − 4) / 4
    second = table.iloc[1]
    assert second.accuracy == pytest.approx(1.0, abs=1e-6)
    assert second.ece == pytest.approx(0.2025, abs=1e-6) and second.signed_ece == pytest.approx(-0.2025, abs=1e-6)


def test_laplace_fit_table_reads_each_stages_info(tmp_path):
    stages = []
    for i, (images, secs, evidence, device) in enumerate([(48, 2.0, -12.5, "cpu (2 cores)"), (96, 0.5, -7.25, "NVIDIA H100")]):
        folder = tmp_path / f"laplace{i}"
        folder.mkdir()
        (folder / "info.json").write_text(json.dumps({
            "fit_seconds": secs, "fit_images": images, "fit_images_per_s": images / secs, "prior_init": 0.05 * (i + 1),
            "log_marginal_likelihood": evidence, "environment": {"git_sha": "abc", "device": device}}))
        stages.append(SimpleNamespace(file=lambda name, folder=folder: folder / name))
    table = laplace_fit_table(stages, [4, 9])
    assert list(table.columns) == ["seed", "fit_images", "fit_seconds", "fit_images_per_s", "prior_init",
                                   "log_marginal_likelihood", "device"]
    assert list(table.seed) == [4, 9] and list(table.fit_images) == [48, 96]
    assert list(table.fit_seconds) == [2.0, 0.5] and list(table.fit_images_per_s) == [24.0, 192.0]
    assert list(table.prior_init) == pytest.approx([0.05, 0.1], abs=1e-15)
    assert list(table.log_marginal_likelihood) == [-12.5, -7.25] and list(table.device) == ["cpu (2 cores)", "NVIDIA H100"]


def test_display_layer_table_formats_in_pp_with_typographic_minus():
    table = pd.DataFrame({"posterior": ["all", "single 0"], "ece": [0.041234, 0.0535], "delta": [0.0123, -0.004],
                          "lower": [0.008, -0.0105], "upper": [0.017, 0.0021], "d_nll": [0.01234, -0.00456],
                          "d_brier": [0.0005, -0.00012], "d_acc": [-0.0025, 0.001], "p_holm": [float("nan"), 0.012345]})
    shown = display_layer_table(table, 0.05)
    assert list(shown.columns) == ["Posterior", "ECE (%)", "ΔECE, pp [95% CI]", "ΔNLL", "ΔBrier", "Δacc. (pp)", "Holm p"]
    assert list(shown.Posterior) == ["all blocks", "block 0 only"]
    assert list(shown["ECE (%)"]) == ["4.12", "5.35"]
    assert list(shown["ΔECE, pp [95% CI]"]) == ["+1.23 [+0.80, +1.70]", "−0.40 [−1.05, +0.21]"]
    assert list(shown["ΔNLL"]) == ["+0.0123", "−0.0046"] and list(shown["ΔBrier"]) == ["+0.0005", "−0.0001"]
    assert list(shown["Δacc. (pp)"]) == ["−0.25", "+0.10"] and list(shown["Holm p"]) == ["", "0.012"]
    assert "Holm p" not in display_layer_table(table.drop(columns=["p_holm"]), 0.05).columns
    assert list(display_layer_table(table, 0.1).columns)[2] == "ΔECE, pp [90% CI]"


def _selection(sel_se: list[float], boot_se: list[float], stable: list[float]) -> pd.DataFrame:
    n = len(sel_se)
    return pd.DataFrame({"posterior": [f"single {i}" for i in range(n - 1)] + ["all"], "kappa": [0.5] * n,
                         "stable": stable, "delta": [0.01] * n, "sel_lower": [0.0] * n, "sel_upper": [0.02] * n,
                         "sel_se": sel_se, "boot_se": boot_se,
                         "sel_share": [a / b for a, b in zip(sel_se, boot_se)], "lower": [-0.01] * n,
                         "upper": [0.03] * n, "n_val": [1000] * n})


def test_selection_summary_small_selection_error():
    text = selection_summary(_selection([0.001, 0.002, 0.0005], [0.01, 0.01, 0.008], [0.9, 0.6, 0.95]))
    assert "1000 validation images" in text and "60–95%" in text and "at most 0.20 pp" in text
    assert "20% of the" in text and "(block 1 only)" in text
    assert "The intervals of @sec-attribution include this error" in text
    assert "It is a small part of every interval's width." in text and "material" not in text
    assert "wider" not in text  # the intervals already include it: no "would be wider" remark


def test_selection_summary_flags_material_selection_error():
    text = selection_summary(_selection([0.008, 0.002, 0.006], [0.01, 0.01, 0.008], [0.3, 0.6, 0.4]))
    assert ("For block 0 only and the all-block posterior the choice of $\\kappa_S$ is a material part of the interval's "
            "width") in text
    assert "wider" not in text


def test_selection_summary_without_tuning():
    empty = _selection([0.001], [0.01], [0.9]).iloc[0:0]
    assert "not tuned" in selection_summary(empty)


def test_display_selection_table_in_pp():
    out = display_selection_table(_selection([0.001, 0.002], [0.01, 0.01], [0.9, 0.6]), alpha=0.1)
    assert list(out.columns) == ["Posterior", "tuned κ (median)", "same κ selected",
                                 "ΔECE, pp [90% range, re-tuned κ]", "SD, re-tuned κ (pp)", "SD, bootstrap (pp)",
                                 "ratio"]
    assert out.iloc[1].tolist() == ["all blocks", "0.5", "60%", "+1.00 [+0.00, +2.00]", "0.20", "1.00", "0.20"]


def test_interval_check_summary_largest_shift_and_changed_verdicts():
    intervals = pd.DataFrame({"block": [0, 1, 2], "delta": [0.0, 0.01, -0.01],
                              "percentile_lower": [-0.01, 0.001, -0.02], "percentile_upper": [0.01, 0.02, 0.0],
                              "bca_lower": [-0.012, -0.002, -0.021], "bca_upper": [0.01, 0.019, 0.001]})
    text = interval_check_summary(intervals)
    # shifts: 0.2 pp of 2 pp (10%), 0.3 pp of 1.9 pp (16%), 0.1 pp of 2 pp (5%); block 1 loses its sign
    assert text.startswith("Where BCa is exact, its endpoints lie at most 0.30 pp from the percentile ones (16% of "
                           "the interval's width, block 1); for block 1 the two disagree")
    same = interval_check_summary(intervals.assign(bca_lower=[-0.012, 0.0005, -0.021]))
    assert "no block's verdict (interval excludes zero or not) depends on the interval type" in same


def test_format_number_one_rule_per_quantity():
    from lib.report import format_number

    assert format_number(0.8512, "delta_pp") == "+0.85" and format_number(-0.061, "delta_pp") == "−0.06"
    assert format_number(0.0315, "p") == "0.032" and format_number(0.06, "p") == "0.060"
    assert format_number(0.0001, "p") == "<0.001"
    assert format_number(8.0384, "seconds") == "8.0" and format_number(2992.189, "rate") == "2,992"
    assert format_number(0.063095, "kappa") == "0.0631" and format_number(float("nan"), "kappa") == "–"
    assert format_number(0.47055, "metric") == "0.4706" and format_number(8.4e-07, "tolerance") == "8.4e−07"
    with pytest.raises(ValueError, match="no display rule"):
        format_number(1.0, "furlongs")


def test_statistics_summary_names_every_block():
    """Every single block lands in one statement: Holm-significant, interval above zero but not
    significant after correction, sign unclear, or worse."""
    from lib.report import statistics_summary

    table = pd.DataFrame({"kind": ["single"] * 5 + ["all"], "block": [0, 1, 2, 3, 4, -1],
                          "delta": [0.01, 0.008, 0.006, 0.001, -0.01, 0.01],
                          "lower": [0.004, 0.001, 0.0002, -0.003, -0.02, 0.002],
                          "upper": [0.02, 0.012, 0.011, 0.006, -0.001, 0.02],
                          "improves": [True, False, False, False, False, False]})
    ranks = pd.DataFrame({"block": [0, 1, 2, 3, 4], "surely_top_k": [True, False, False, False, False]})
    text = statistics_summary(table, ranks, 3, 0.05, 2)
    assert "Supported: block 0 improves calibration" in text
    assert ("For blocks 1 and 2 the 95% interval lies above zero, but the Holm-adjusted test does not reject: the gain "
            "is not established once the 5 blocks are tested together.") in text
    assert "For block 3 the data cannot tell the sign" in text and "Block 4 makes calibration worse" in text


def test_temperature_gain():
    from lib.report import temperature_gain

    assert temperature_gain(_baseline(2.5, ts_ece=3.0)) == pytest.approx(0.03)


def test_interval_and_block_formatting():
    from lib.interval import Interval
    from lib.report import blocks_text, pp_interval, words

    assert pp_interval(Interval(0.0123, -0.004, 0.02, 0.05)) == "+1.23 [−0.40, +2.00]"
    assert [blocks_text(b) for b in ([], [3], [4, 1], [2, 0, 1], [0, 2, 5])] == [
        "no block", "block 3", "blocks 1 and 4", "blocks 0–2", "blocks 0, 2 and 5"]
    assert [words(w) for w in ([], ["a"], ["a", "b"], ["a", "b", "c"])] == ["", "a", "a and b", "a, b and c"]
