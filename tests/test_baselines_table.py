"""lib.baselines.table: metrics, paired intervals against MAP and temperature scaling, Pareto front
and the validation-chosen recommendation, on hand-made probabilities."""

from __future__ import annotations

import pytest
import torch

from lib.baselines.table import (MethodPredictions, baseline_table, paired_ece_bootstrap, paired_nll_bootstrap,
                                  with_temperature)
from lib.calibration import ece, nll


def _data(seed=0, n=200, c=3):
    g = torch.Generator().manual_seed(seed)
    logits = 2 * torch.randn(2, n, c, generator=g, dtype=torch.float64)
    labels = torch.randint(0, c, (2, n), generator=g)
    return logits, labels


@pytest.fixture
def methods():
    logits, labels = _data()
    (lv, lt), (yv, yt) = logits, labels

    def m(t, ms):
        return MethodPredictions(val=(lv / t).softmax(-1), test=(lt / t).softmax(-1), ms_per_image=ms)

    return {"MAP": m(1.0, 1.0), "temperature scaling": m(2.0, 1.0), "copy of MAP": m(1.0, 3.0),
            "hot": m(4.0, 5.0)}, yv, yt


def test_rows_deltas_and_intervals(methods):
    ms, yv, yt = methods
    t = baseline_table(ms, yv, yt, n_resamples=200, seed=3).set_index("method")
    for name, m in ms.items():
        assert t.loc[name, "ece"] == pytest.approx(float(ece(m.test, yt, 15)), abs=1e-12)
        assert t.loc[name, "val_nll"] == pytest.approx(float(nll(m.val, yv)), abs=1e-12)
        ref_d = float(ece(ms["MAP"].test, yt, 15) - ece(m.test, yt, 15))
        assert t.loc[name, "d_ece_map"] == pytest.approx(ref_d, abs=1e-12)
        ref_n = float(nll(ms["temperature scaling"].test, yt) - nll(m.test, yt))
        assert t.loc[name, "d_nll_ts"] == pytest.approx(ref_n, abs=1e-9)
    for col in ("d_ece_map", "d_ece_map_lo", "d_ece_map_hi", "d_nll_map", "d_nll_map_lo", "d_nll_map_hi"):
        assert t.loc["copy of MAP", col] == 0.0
    assert t.loc["temperature scaling", "d_ece_ts"] == 0.0
    assert t.loc["hot", "d_nll_map_lo"] <= t.loc["hot", "d_nll_map"] <= t.loc["hot", "d_nll_map_hi"]
    assert t.loc["hot", "extra_ms"] == 4.0


def test_pareto_and_recommendation(methods):
    ms, yv, yt = methods
    t = baseline_table(ms, yv, yt, n_resamples=50).set_index("method")
    # the copy of MAP costs more for the same ECE: dominated; the front by explicit pairwise checks
    assert not t.loc["copy of MAP", "pareto_ece"]
    for metric in ("ece", "nll"):
        for j in t.index:
            dominated = any(t.loc[i, "extra_ms"] <= t.loc[j, "extra_ms"] and t.loc[i, metric] <= t.loc[j, metric]
                            and (t.loc[i, "extra_ms"] < t.loc[j, "extra_ms"] or t.loc[i, metric] < t.loc[j, metric])
                            for i in t.index)
            assert t.loc[j, f"pareto_{metric}"] == (not dominated), (metric, j)
    assert t.pareto_ece.any() and not t.pareto_ece.all()
    best = t.val_nll.idxmin()
    assert t.recommended.sum() == 1 and t.loc[best, "recommended"]
    by_ece = baseline_table(ms, yv, yt, n_resamples=50, select_by="ece").set_index("method")
    assert by_ece.loc[by_ece.val_ece.idxmin(), "recommended"]


def test_nll_bootstrap_equals_explicit_resampling():
    logits, labels = _data(1, n=30)
    p_ref, y = logits[0].softmax(-1), labels[0]
    probs = torch.stack([logits[1].softmax(-1), (logits[0] / 3).softmax(-1)])
    est, reps = paired_nll_bootstrap(p_ref, probs, y, 7, torch.Generator().manual_seed(5))
    idx = torch.randint(0, 30, (7, 30), generator=torch.Generator().manual_seed(5))
    d = -p_ref.gather(1, y[:, None]).log().squeeze(1)[None] + torch.stack([p.gather(1, y[:, None]).log().squeeze(1) for p in probs])
    assert torch.allclose(est, d.mean(1), atol=1e-12)
    assert torch.allclose(reps, torch.stack([d[:, i].mean(1) for i in idx]), atol=1e-12)


def test_missing_reference_is_an_error(methods):
    ms, yv, yt = methods
    with pytest.raises(ValueError, match="temperature scaling"):
        baseline_table({"MAP": ms["MAP"]}, yv, yt)


def test_with_temperature_adds_a_tuned_row_per_method(methods):
    """A method whose probabilities are softmax(f / 4) gets T ≈ 1/4 × (MAP's T on the same logits);
    the tuned row is softmax(log p / T) on both splits, costs one parameter more, and its
    validation NLL is not above the untuned one's (T = 1 is a candidate); the untuned rows stay."""
    from lib.temperature import apply_temperature, fit_temperature

    ms, yv, yt = methods
    base = {k: ms[k] for k in ("copy of MAP", "hot")}
    out = with_temperature(base, yv)
    assert list(out) == ["copy of MAP", "hot", "copy of MAP + TS", "hot + TS"]
    t_map = fit_temperature(ms["MAP"].val.log(), yv)
    assert out["copy of MAP + TS"].temperature == pytest.approx(t_map, rel=1e-6)
    assert out["hot + TS"].temperature == pytest.approx(t_map / 4, rel=1e-3)  # L-BFGS tolerance
    hot = out["hot + TS"]
    assert torch.allclose(hot.test, apply_temperature(ms["hot"].test.log(), hot.temperature).double(), atol=1e-6)
    assert hot.tuning == "temperature" and hot.extra_params == 1 and hot.ms_per_image == ms["hot"].ms_per_image
    assert float(nll(hot.val, yv)) <= float(nll(ms["hot"].val, yv)) + 1e-9
    # the tuned copy of MAP is MAP's temperature scaling itself (same logits, same T)
    assert torch.allclose(out["copy of MAP + TS"].test, apply_temperature(ms["MAP"].test.log(), t_map).double(), atol=1e-6)
    t = baseline_table({**ms, **out}, yv, yt, n_resamples=20).set_index("method")
    assert t.loc["hot + TS", "tuning"] == "temperature" and t.loc["hot", "tuning"] == "none"
    assert t.loc["hot + TS", "temperature"] == pytest.approx(hot.temperature)


def test_seeds_share_one_test_resample_per_replicate():
    """With S seeds, ΔECE and ΔNLL are seed means of the per-seed differences, and every replicate
    is the same explicit resample of the test images for all seeds (checked by indexing)."""
    g = torch.Generator().manual_seed(7)
    n, c = 40, 3
    y = torch.randint(0, c, (n,), generator=g)
    ref = (2 * torch.randn(2, n, c, generator=g, dtype=torch.float64)).softmax(-1)
    other = (torch.randn(1, 2, n, c, generator=g, dtype=torch.float64)).softmax(-1)
    est, reps = paired_ece_bootstrap(ref, other, y, 5, torch.Generator().manual_seed(3), n_bins=4)
    assert torch.allclose(est, torch.stack([(ece(ref[s], y, 4) - ece(other[0, s], y, 4)) for s in range(2)]).mean()[None],
                          atol=1e-12)
    idx = torch.randint(0, n, (5, n), generator=torch.Generator().manual_seed(3))
    explicit = torch.stack([torch.stack([ece(ref[s][i], y[i], 4) - ece(other[0, s][i], y[i], 4) for s in range(2)]).mean()
                            for i in idx])
    assert torch.allclose(reps[:, 0], explicit, atol=1e-12)
    est, reps = paired_nll_bootstrap(ref, other, y, 5, torch.Generator().manual_seed(3))
    d = torch.stack([nll(ref[s], y) - nll(other[0, s], y) for s in range(2)]).mean()
    assert torch.allclose(est, d[None], atol=1e-12)
    explicit = torch.stack([torch.stack([nll(ref[s][i], y[i]) - nll(other[0, s][i], y[i]) for s in range(2)]).mean()
                            for i in idx])
    assert torch.allclose(reps[:, 0], explicit, atol=1e-12)


def test_table_with_seeds_averages_metrics_and_needs_equal_seed_counts(methods):
    ms, yv, yt = methods
    stacked = {k: MethodPredictions(val=torch.stack([m.val, m.val.flip(0)]), test=torch.stack([m.test, m.test.flip(0)]),
                                    ms_per_image=m.ms_per_image) for k, m in ms.items()}
    t = baseline_table(stacked, yv, yt, n_resamples=20).set_index("method")
    for k, m in ms.items():
        expect = (float(ece(m.test, yt, 15)) + float(ece(m.test.flip(0), yt, 15))) / 2
        assert t.loc[k, "ece"] == pytest.approx(expect, abs=1e-12)
    tuned = with_temperature({"hot": stacked["hot"]}, yv)["hot + TS"]
    assert tuned.test.shape == stacked["hot"].test.shape
    with pytest.raises(ValueError, match="same number of seeds"):
        baseline_table({**stacked, "MAP": ms["MAP"]}, yv, yt, n_resamples=5)


def _verdict_table(ts_lo: float, hot_ts: tuple, hot_nll_hi: float = 0.1) -> "pd.DataFrame":
    import pandas as pd

    rows = {"MAP": dict(d_ece_map=(0, 0, 0), d_ece_ts=(-0.02, -0.03, -0.01)),
            "temperature scaling": dict(d_ece_map=(0.02, ts_lo, 0.03), d_ece_ts=(0, 0, 0)),
            "hot": dict(d_ece_map=(0.03, 0.01, 0.05), d_ece_ts=hot_ts),
            "cheap hot": dict(d_ece_map=(0.03, 0.01, 0.05), d_ece_ts=hot_ts)}
    out = []
    for name, r in rows.items():
        row = {"method": name, "ece": 0.1, "extra_ms": {"hot": 3.0, "cheap hot": 1.0}.get(name, 0.0),
               "train_seconds": 0.0, "extra_params": 0, "d_nll_ts": 0.0, "d_nll_ts_lo": -0.1,
               "d_nll_ts_hi": hot_nll_hi if "hot" in name else 0.1}
        for col, (e, lo, hi) in r.items():
            row.update({col: e, f"{col}_lo": lo, f"{col}_hi": hi})
        out.append(row)
    return pd.DataFrame(out)


def test_recommend_leads_with_what_the_paired_intervals_support():
    from lib.baselines.table import recommend

    better = recommend(_verdict_table(0.01, (0.01, 0.002, 0.02)), 0.05)
    assert better.method == "cheap hot" and better.basis == "beats temperature scaling"
    assert better.beat_ts == ("cheap hot", "hot") and better.versus_ts.side == "above"
    # an ECE gain over TS that costs NLL significantly is not preferred
    nll_worse = recommend(_verdict_table(0.01, (0.01, 0.002, 0.02), hot_nll_hi=-0.01), 0.05)
    assert nll_worse.method == "temperature scaling" and nll_worse.basis == "temperature scaling"
    tie = recommend(_verdict_table(0.01, (0.01, -0.002, 0.02)), 0.05)
    assert tie.method == "temperature scaling" and tie.beat_ts == () and tie.lose_to_ts == ("MAP",)
    nothing = recommend(_verdict_table(-0.01, (0.01, -0.002, 0.02)), 0.05)
    assert nothing.method == "MAP" and nothing.basis == "none"
    # where nothing is supported, temperature scaling's own gain is still the one to quote, not MAP's zero
    assert nothing.versus_map.estimate == 0.0
    gain = nothing.temperature_gain
    assert (gain.estimate, gain.lower, gain.upper, gain.side) == (0.02, -0.01, 0.03, "includes")
    assert better.temperature_gain.estimate == 0.02 and better.temperature_gain.side == "above"
