"""The benchmark scripts run end to end at CPU sizes and their agreement checks hold.

They are meant for the lent GPU, where a crash costs device time; here they run on tiny shapes.
No timing is asserted (speed targets live in the printed ratios, benchmarks/README.md).
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path


from lib.laplace.reference import RTOL_CURVATURE

ROOT = Path(__file__).resolve().parents[1]


def _run(script: str, *args: str, out: Path) -> tuple[dict, str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "MPLBACKEND": "agg"}
    proc = subprocess.run([sys.executable, f"benchmarks/{script}", *args, "--out", str(out)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(out.read_text()), proc.stdout


def test_bench_laplace_fit_factors_equal_laplace_torch(tmp_path):
    res, stdout = _run("bench_laplace.py", "--tiny", "--parts", "fit", "--repeats", "1", "--fit-n", "16",
                       "--fit-batch-size", "8", out=tmp_path / "fit.json")
    diffs = {k: v for k, v in res.items() if k.endswith("_factor_max_rel_diff")}
    assert set(diffs) == {f"fit_expand_exact_ours_fp32_chunk{c}_factor_max_rel_diff" for c in (1, 10)}
    assert all(v <= RTOL_CURVATURE for v in diffs.values()), diffs
    speeds = [k for k in res if k.endswith("_img_per_s")]
    assert len(speeds) == 5 and all(res[k] > 0 for k in speeds)
    assert "target >= 3x" in stdout


def test_bench_laplace_sweep_agrees(tmp_path):
    res, stdout = _run("bench_laplace.py", "--tiny", "--parts", "sweep", "--n-test", "16", "--batch-size", "8",
                       "--peer-budget-s", "1", "--check-samples", "64", "--fit-n", "8", out=tmp_path / "sweep.json")
    assert res["bank_reverse_max_abs_diff"] <= 1e-3  # same samples, forward vs reverse mode
    assert res["bank_pair_max_abs_diff"] <= 1e-5 and res["bank_two_passes_over_pair"] > 0  # one pass, same banks
    assert "two passes / one shared pass" in stdout
    assert res["max_abs_dp_probit_check"] <= 0.05  # K = 64 samples vs laplace-torch's exact variance
    assert res["sweep_ratio"] > 0 and math.isfinite(res["peer_sweep_extrapolated_s"])
    assert "sweep speed-up vs laplace-torch" in stdout


def test_bench_laplace_profile_takes_the_profiles_model_and_images(tmp_path):
    """``--profile smoke``: the smoke ViT (4 blocks, width 64, r 4, 5 classes) on the smoke profile's
    images; the fit factors still equal laplace-torch's."""
    res, _ = _run("bench_laplace.py", "--profile", "smoke", "--parts", "fit", "--repeats", "1", "--fit-n", "16",
                  "--fit-batch-size", "8", out=tmp_path / "profile.json")
    assert res["n_blocks"] == 4 and res["args"]["classes"] == 5 and res["args"]["r"] == 4
    assert res["n_lora_params"] == 4 * 4 * (3 * 64 + 64 + 64 + 64 + 64 + 256 + 256 + 64)
    diffs = [v for k, v in res.items() if k.endswith("_factor_max_rel_diff")]
    assert diffs and all(v <= RTOL_CURVATURE for v in diffs)


def test_bench_laplace_profile_rejects_more_images_than_the_split(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, "benchmarks/bench_laplace.py", "--profile", "smoke", "--parts", "fit",
                           "--fit-n", "100000", "--out", str(tmp_path / "x.json")], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode != 0 and "lower --n-test or --fit-n" in proc.stderr


def test_bench_train_runs_and_gives_no_reference_ratio_off_setting(tmp_path):
    res, stdout = _run("bench_train.py", "--model", "vit_tiny_patch16_224", "--img", "32", "--classes", "10",
                       "--r", "2", "--batch", "4", "--iters", "1", out=tmp_path / "train.json")
    for key in ("train_eager", "infer_peft", "infer_merged", "infer_plain", "train_flops_per_image"):
        assert res[key] > 0, key
    assert "vs earlier" not in stdout  # the H100 ViT-B/16 figures are not a peer for a tiny CPU model


def test_bench_stats_estimates_equal_peer(tmp_path):
    res, _ = _run("bench_stats.py", "--n", "500", "--r", "50", "--p", "4", "--c", "10", "--peer-resamples", "10",
                  out=tmp_path / "stats.json")
    assert res["max_abs_diff_estimate"] <= 1e-6
    assert res["speedup"] > 0


def test_bench_coverage_writes_the_table_so_far(tmp_path):
    """Three tiny studies written in parts of two: the JSON holds the design and the coverage table
    of all three (4 intervals × 4 blocks), the CSV one row per study × block."""
    out = tmp_path / "cov"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "benchmarks/bench_coverage.py", "--studies", "3", "--save-every", "2",
                           "--n-test", "300", "--n-truth", "2000", "--n-boot", "20", "--out", str(out)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    record = json.loads(out.with_suffix(".json").read_text())
    assert record["design"]["n_test"] == 300 and len(record["table"]) == 16
    assert {r["studies"] for r in record["table"]} == {3}
    assert len(out.with_suffix(".csv").read_text().splitlines()) == 1 + 3 * 4
    assert "seed-spread t" in proc.stdout
