"""lib.coverage: the coverage simulation with known truth (CI size), and its table by hand."""

from __future__ import annotations

import pandas as pd
import pytest

from lib.coverage import (
    METHODS,
    CoverageDesign,
    coverage_findings,
    coverage_table,
    display_coverage,
    load_coverage,
    run_studies,
    save_coverage,
)

CI_DESIGN = CoverageDesign(ranks=(16, 16, 16, 16), amplitudes=(1.0, 1.0, 1.0, 1.0), n_test=1500, n_val=500,
                           n_truth=20_000, n_boot=200)
"""The benchmark's structure (10 classes, over-confident MAP, coherent rank-d block perturbations,
K = 8, 3 seeds sharing test and validation images, κ tuned on 13 points by validation NLL) at CI
size: fewer test, validation and population images and replicates, all blocks of rank 16."""

CI_STUDIES = 24

BOUND = 0.88
"""Least pooled coverage (4 blocks × 24 studies = 96 intervals) of the chosen models' ΔECE at
nominal 95%. Were the 96 intervals independent, the binomial SE at 95% would be
sqrt(0.95 · 0.05 / 96) = 2.2 pp and the bound 3.2 SE below nominal; the blocks of one study share
its test images, so the effective count lies between 24 and 96 (SE 2.2–4.4 pp) and the bound is
1.6–3.2 SE below. The old interval's pooled coverage here is about 0.74 (0.74 in a 40-study run),
at least 3 of its own SEs (sqrt(0.74 · 0.26 / 96) = 4.5 pp) below the bound."""


@pytest.fixture(scope="module")
def ci_run() -> pd.DataFrame:
    return run_studies(CI_DESIGN, CI_STUDIES, progress=None)


def test_shared_basic_interval_covers_the_chosen_models_and_the_old_interval_does_not(ci_run):
    """The fix (lib.stats.tuned_bootstrap: one test and one validation resample per replicate for
    every seed, samples fixed; lib.stats.basic_interval) covers the chosen models' ΔECE in at least
    BOUND of the intervals; the bootstrap before issue 22 (per-seed test and sample resamples,
    seeds resampled, percentile interval; lib.coverage.per_seed_bootstrap) falls below it."""
    truth = ci_run.truth

    def pooled(method: str) -> float:
        return float(((ci_run[f"{method} lower"] <= truth) & (truth <= ci_run[f"{method} upper"])).mean())

    assert len(ci_run) == 4 * CI_STUDIES
    assert pooled("shared basic") >= BOUND, pooled("shared basic")
    assert pooled("per-seed percentile") < BOUND, pooled("per-seed percentile")  # the old design fails the bound


def test_coverage_table_hand_worked(tmp_path):
    """Two studies × one block: truths 1 and 3 (expected 2), intervals [0, 2] and [2.5, 4] cover both
    chosen truths, [0, 2] and [2.5, 4] cover the expected 2 once; widths 2 and 1.5 (mean 1.75)."""
    rows = pd.DataFrame({"study": [0, 1], "block": [0, 0], "estimate": [1.5, 3.0], "truth": [1.0, 3.0]})
    for m in METHODS:
        rows[f"{m} lower"], rows[f"{m} upper"] = [0.0, 2.5], [2.0, 4.0]
    table = coverage_table(rows)
    assert list(table.method) == list(METHODS)
    first = table.iloc[0]
    assert (first.chosen, first.expected, first.width, first.studies) == (1.0, 0.5, 1.75, 2)
    assert first.bias == pytest.approx(0.25) and first.expected_se == pytest.approx(2 ** 0.5 / 2 ** 0.5)
    save_coverage(rows, CI_DESIGN, tmp_path / "cov", seconds=1.0)
    loaded = load_coverage(tmp_path / "cov")
    pd.testing.assert_frame_equal(loaded, table)
    shown = display_coverage(loaded)
    assert shown["block 0"].tolist() == ["100.0 / 50.0"] * 4 and shown["width (pp)"].tolist() == ["175.00"] * 4
    found = coverage_findings(loaded)
    assert found.studies == 2 and found.basic_short == () and found.seed_spread_short == (0,)
    assert found.basic == (1.0, 1.0) and found.seed_spread == (0.5, 0.5) and found.old_expected == (0.5, 0.5)
