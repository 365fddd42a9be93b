"""lib.shift: the per-method shift table against lib.calibration, the OOD table against sklearn, Kendall's τ-b
against scipy, the paired rank-agreement bootstrap against a loop, and the box statistics against
matplotlib's boxplot_stats."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch
from matplotlib import cbook
from scipy.stats import kendalltau
from sklearn.metrics import average_precision_score, roc_auc_score

from lib.calibration import brier, ece, nll
from lib.shift import (
    gain_intervals,
    ood_table,
    prepare_shift_boxes,
    rank_agreement,
    shift_metrics,
)
from lib.resample import bootstrap_counts
from lib.stats import delta_ece

pytestmark = pytest.mark.usefixtures("one_thread")


def _probs(g: torch.Generator, n: int, c: int, sharp: float) -> torch.Tensor:
    return torch.softmax(sharp * torch.randn(n, c, generator=g, dtype=torch.float64), -1)


def test_shift_metrics_match_calibration_module():
    g = torch.Generator().manual_seed(0)
    labels = torch.randint(0, 5, (200,), generator=g)
    probs = {"map": _probs(g, 200, 5, 3.0), "ts": _probs(g, 200, 5, 1.0)}
    df = shift_metrics(probs, labels, corruption="fog", severity=3, n_bins=10)
    assert list(df["method"]) == ["map", "ts"] and set(df["family"]) == {"weather"}
    assert (df["severity"] == 3).all() and (df["n"] == 200).all()
    for row, p in zip(df.itertuples(), probs.values()):
        assert abs(row.ece - float(ece(p, labels, 10))) < 1e-12
        assert abs(row.nll - float(nll(p, labels))) < 1e-12
        assert abs(row.brier - float(brier(p, labels))) < 1e-12
        assert abs(row.accuracy - float((p.argmax(1) == labels).double().mean())) < 1e-12
    clean = shift_metrics(probs, labels, corruption="clean", severity=0)
    assert set(clean["family"]) == {"clean"}
    with pytest.raises(ValueError, match="severity 0"):
        shift_metrics(probs, labels, corruption="clean", severity=1)
    with pytest.raises(ValueError, match="unknown"):
        shift_metrics(probs, labels, corruption="rain", severity=1)
    with pytest.raises(ValueError, match="rows"):
        shift_metrics({"map": probs["map"][:10]}, labels, corruption="fog", severity=1)


def _sk(a: torch.Tensor, b: torch.Tensor) -> tuple[float, float]:
    y = np.r_[np.zeros(len(a)), np.ones(len(b))]
    s = np.r_[a.numpy(), b.numpy()]
    return roc_auc_score(y, s), average_precision_score(y, s)


def test_ood_table_against_sklearn():
    g = torch.Generator().manual_seed(1)
    p_in = {"map": _probs(g, 120, 5, 4.0), "la": _probs(g, 120, 5, 3.0)}
    p_out = {"map": _probs(g, 80, 5, 2.0), "la": _probs(g, 80, 5, 0.5)}
    df = ood_table(p_in, p_out, ood_set="far", n_resamples=300, generator=torch.Generator().manual_seed(0),
                   reference="map")
    assert len(df) == 4 and set(df["score"]) == {"max_prob", "entropy"} and set(df["ood_set"]) == {"far"}
    for row in df.itertuples():
        if row.score == "entropy":
            s = lambda p: -torch.special.xlogy(p, p).sum(1)  # noqa: E731
        else:
            s = lambda p: -p.max(1).values  # noqa: E731
        ref_roc, ref_ap = _sk(s(p_in[row.method]), s(p_out[row.method]))
        assert abs(row.auroc - ref_roc) < 1e-12 and abs(row.aupr - ref_ap) < 1e-12
        assert row.auroc_lower <= row.auroc <= row.auroc_upper
    ref_rows = df[df["method"] == "map"]
    assert (ref_rows["auroc_diff"] == 0).all()
    la = df[(df["method"] == "la") & (df["score"] == "entropy")].iloc[0]
    map_ = df[(df["method"] == "map") & (df["score"] == "entropy")].iloc[0]
    assert abs(la.auroc_diff - (la.auroc - map_.auroc)) < 1e-12 and la.auroc_diff > 0
    with pytest.raises(ValueError, match="same methods"):
        ood_table(p_in, {"map": p_out["map"]}, ood_set="far", n_resamples=5, generator=torch.Generator())


def test_rank_agreement_equals_a_loop_over_resamples():
    """Same generator seed → bootstrap_counts(N, R) rows; each replicate is τ-b (scipy) between the
    ΔECE vectors (lib.calibration.ece) of the explicitly resampled clean and corrupted images."""
    g = torch.Generator().manual_seed(3)
    n, p = 150, 4
    labels = torch.randint(0, 3, (n,), generator=g)
    clean = (_probs(g, n, 3, 3.0), torch.stack([_probs(g, n, 3, s) for s in (2.0, 1.5, 1.0, 0.7)]))
    shifted = (_probs(g, n, 3, 3.0), torch.stack([_probs(g, n, 3, s) for s in (2.0, 1.5, 1.0, 0.7)]))
    res = rank_agreement(clean, shifted, labels, n_resamples=6, generator=torch.Generator().manual_seed(9), n_bins=10)

    def delta(pair, idx):
        det, bayes = pair
        e0 = float(ece(det[idx], labels[idx], 10))
        return np.array([e0 - float(ece(b[idx], labels[idx], 10)) for b in bayes])

    full = torch.arange(n)
    assert np.allclose(res.delta_clean.numpy(), delta(clean, full), atol=1e-12)
    assert abs(res.tau - kendalltau(delta(clean, full), delta(shifted, full)).statistic) < 1e-12
    w = bootstrap_counts(n, 6, torch.Generator().manual_seed(9), torch.float64, "cpu")
    for r in range(6):
        idx = torch.arange(n).repeat_interleave(w[r].long())
        ref = kendalltau(delta(clean, idx), delta(shifted, idx)).statistic
        assert abs(float(res.samples[r]) - ref) < 1e-9
    assert res.lower <= res.upper and res.samples.shape == (6,)
    assert p == res.delta_shift.shape[0]


def test_prepare_shift_boxes_matches_matplotlib_boxplot_stats():
    g = np.random.default_rng(0)
    rows = []
    for sev in range(6):
        for c in (["clean"] if sev == 0 else [f"c{i}" for i in range(9)]):
            for m in ("map", "la"):
                val = 0.02 * sev + g.normal(scale=0.01) + (0.3 if (c == "c0" and m == "la") else 0.0)
                rows.append({"method": m, "corruption": c, "severity": sev, "ece": val})
    table = pd.DataFrame(rows)
    box = prepare_shift_boxes(table, "ece")
    assert len(box) == 12 and list(box["method"][:2]) == ["map", "la"]
    for row in box.itertuples():
        v = table.loc[(table.severity == row.severity) & (table.method == row.method), "ece"].to_numpy()
        ref = cbook.boxplot_stats(v)[0]
        for k in ("q1", "med", "q3", "whislo", "whishi", "mean"):
            assert abs(getattr(row, k) - ref[k]) < 1e-12, k
        assert np.allclose(sorted(ref["fliers"]), row.fliers)
    assert any(len(f) > 0 for f in box["fliers"])
    with pytest.raises(ValueError, match="metric"):
        prepare_shift_boxes(table, "mce")


def test_prepare_shift_boxes_averages_seeds_first():
    """Two seeds of 3 corruptions: the box of a severity is over the 3 seed-averaged values."""
    table = pd.DataFrame({"method": ["map"] * 6, "corruption": ["a", "b", "c"] * 2, "severity": [2] * 6,
                          "seed": [0, 0, 0, 1, 1, 1], "nll": [1.0, 2.0, 3.0, 3.0, 4.0, 5.0]})
    box = prepare_shift_boxes(table, "nll").iloc[0]
    assert box.n == 3 and box.med == 3.0 and box.whislo == 2.0 and box.whishi == 4.0 and box["mean"] == 3.0


def test_rank_agreement_cluster_bootstrap_equals_a_loop_over_resampled_groups():
    """Rows = 2 corruptions × 50 images (image ids 100..149 non-contiguous); each replicate resamples
    the 50 images (bootstrap_counts(50, ·), chunks of 4 resamples) and takes every row of a drawn
    image, so it equals τ-b of the ΔECE on the explicitly repeated rows."""
    g = torch.Generator().manual_seed(4)
    n, c = 100, 3
    labels = torch.randint(0, c, (n,), generator=g)
    clean = (_probs(g, n, c, 3.0), torch.stack([_probs(g, n, c, s) for s in (2.0, 1.5, 1.0)]))
    shifted = (_probs(g, n, c, 3.0), torch.stack([_probs(g, n, c, s) for s in (2.0, 1.5, 1.0)]))
    ids = torch.arange(100, 150).repeat(2)
    res = rank_agreement(clean, shifted, labels, n_resamples=10, generator=torch.Generator().manual_seed(2),
                         groups=ids, n_bins=8, chunk_size=4)
    gen = torch.Generator().manual_seed(2)
    w = torch.cat([bootstrap_counts(50, rows, gen, torch.float64, "cpu") for rows in (4, 4, 2)])

    def delta(pair, idx):
        det, bayes = pair
        e0 = float(ece(det[idx], labels[idx], 8))
        return np.array([e0 - float(ece(b[idx], labels[idx], 8)) for b in bayes])

    for r in range(10):
        rows = torch.arange(n).repeat_interleave(w[r][ids - 100].long())
        assert abs(float(res.samples[r]) - kendalltau(delta(clean, rows), delta(shifted, rows)).statistic) < 1e-9
    with pytest.raises(ValueError, match="groups"):
        rank_agreement(clean, shifted, labels, n_resamples=2, generator=g, groups=ids[:10])


def test_gain_intervals_equal_a_loop_and_delta_ece():
    """Two seeds, 3 methods, rows = 2 corruptions × 40 images: the estimate is the seed mean of
    lib.stats.delta_ece; replicate r (shared by the seeds) re-evaluates it on the explicitly
    repeated rows of the drawn images; the basic interval reflects those replicates' quantiles about
    the estimate, [2θ̂ − q_{1−α/2}, 2θ̂ − q_{α/2}]."""
    g = torch.Generator().manual_seed(6)
    n, c = 80, 4
    labels = torch.randint(0, c, (n,), generator=g)
    det = torch.stack([_probs(g, n, c, 3.0) for _ in range(2)])
    probs = torch.stack([torch.stack([_probs(g, n, c, s) for s in (2.5, 1.5, 1.0)]) for _ in range(2)])
    ids = torch.arange(40).repeat(2)
    est, lo, hi = gain_intervals(det, probs, labels, n_resamples=9, generator=torch.Generator().manual_seed(1),
                                 groups=ids, n_bins=6, chunk_size=4, alpha=0.2)
    ref = sum(delta_ece(det[s], probs[s], labels, 6) for s in range(2)) / 2
    assert torch.allclose(est, ref, atol=1e-12)
    gen = torch.Generator().manual_seed(1)
    w = torch.cat([bootstrap_counts(40, rows, gen, torch.float64, "cpu") for rows in (4, 4, 1)])
    reps = []
    for r in range(9):
        rows = torch.arange(n).repeat_interleave(w[r][ids].long())
        reps.append(sum(delta_ece(det[s][rows], probs[s][:, rows], labels[rows], 6) for s in range(2)) / 2)
    reps = torch.stack(reps)
    q = torch.quantile(reps, torch.tensor([0.1, 0.9], dtype=torch.float64), dim=0)
    assert torch.allclose(lo, 2 * est - q[1], atol=1e-12) and torch.allclose(hi, 2 * est - q[0], atol=1e-12)
    one, _, _ = gain_intervals(det[0], probs[0], labels, n_resamples=3, generator=torch.Generator(), n_bins=6)
    assert torch.allclose(one, delta_ece(det[0], probs[0], labels, 6), atol=1e-12)
    with pytest.raises(ValueError, match="groups"):
        gain_intervals(det, probs, labels, n_resamples=2, generator=g, groups=ids[:5])
