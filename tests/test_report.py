"""lib.report: the result tables (the chapters write the sentences; their findings are tested in tests/test_*_findings.py)."""

from __future__ import annotations

import json
import math
import re
from types import SimpleNamespace

import pandas as pd
import pytest
import torch

from conftest import selection_frame
from lib.report import (baseline_table, block_table, book_table, deterministic_table, display_control_table,
                        display_layer_table, display_rank_table, display_selection_table, in_pp, laplace_fit_table,
                        readable)


def _baseline(ece_last2: float = 2.5, ts_ece: float = 3.0) -> pd.DataFrame:
    return pd.DataFrame({
        "method": ["deterministic (MAP)", "temperature scaling (validation-fitted)", "Laplace, block 3 only",
                   "Laplace, last 2 blocks", "Laplace, all blocks"],
        "ECE (%)": [6.0, ts_ece, 5.6, ece_last2, 5.0], "accuracy (%)": [90.0, 90.0, 90.1, 89.8, 89.5],
    })


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


def _control(diff_lower, diff_upper, tost_lower, tost_upper, edge=("", "", "")) -> pd.DataFrame:
    n = len(diff_lower)
    return pd.DataFrame({"block": range(n), "kappa": [0.5] * n, "sigma2": [1e-4] * n, "sigma2_edge": list(edge)[:n],
                         "delta": [0.01] * n, "lower": [0.0] * n, "upper": [0.02] * n,
                         "delta_iso": [0.008] * n, "iso_lower": [-0.001] * n, "iso_upper": [0.017] * n,
                         "diff": [0.002] * n, "diff_lower": diff_lower, "diff_upper": diff_upper,
                         "tost_lower": tost_lower, "tost_upper": tost_upper})


def test_display_control_table_formats_intervals_and_verdicts():
    control = _control([0.001, -0.003, -0.003], [0.004, 0.005, 0.004], [0.0015, -0.002, -0.002], [0.0035, 0.0045, 0.003],
                       ("", "lower", ""))
    out = display_control_table(control, 0.05, 0.005)
    assert list(out.columns) == ["Block", "tuned κ", "tuned σ²", "ΔECE Laplace, pp [95% CI]", "ΔECE isotropic, pp [95% CI]",
                                 "Laplace − isotropic, pp [95% CI]", "Laplace shape"]
    assert out.iloc[0].tolist() == [0, "0.5", "0.0001", "+1.00 [+0.00, +2.00]", "+0.80 [−0.10, +1.70]",
                                    "+0.20 [+0.10, +0.40]", "better"]
    assert out.iloc[1, 2] == "0.0001 (lower end of grid)"
    assert list(out["Laplace shape"]) == ["better", "equivalent", "equivalent"]
    assert list(display_control_table(control, 0.05, 0.004)["Laplace shape"]) == [
        "better", "cannot be distinguished", "equivalent"]  # +0.45 pp lies beyond a ±0.4 pp margin


def test_in_pp_converts_only_the_named_columns():
    df = pd.DataFrame({"block": [0, 1], "delta": [0.012345, -0.0004], "p_holm": [0.5, 1.0]})
    out = in_pp(df, ["delta"])
    assert list(out.delta) == [1.234, -0.04] and list(out.p_holm) == [0.5, 1.0] and list(out.block) == [0, 1]
    with pytest.raises(ValueError, match="columns \\['ece'\\] not in the table"):
        in_pp(df, ["ece"])


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


def test_display_selection_table_in_pp():
    out = display_selection_table(selection_frame([0.001, 0.002], [0.01, 0.01], [0.9, 0.6]), alpha=0.1)
    assert list(out.columns) == ["Posterior", "tuned κ (median)", "same κ selected",
                                 "ΔECE, pp [90% range, re-tuned κ]", "SD, re-tuned κ (pp)", "SD, bootstrap (pp)",
                                 "ratio"]
    assert out.iloc[1].tolist() == ["all blocks", "0.5", "60%", "+1.00 [+0.00, +2.00]", "0.20", "1.00", "0.20"]


def test_temperature_gain():
    from lib.report import temperature_gain

    assert temperature_gain(_baseline(2.5, ts_ece=3.0)) == pytest.approx(0.03)
