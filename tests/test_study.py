"""lib.study + lib.attribution + lib.report on a tiny synthetic profile, end to end."""

from __future__ import annotations

import pandas as pd
import pytest
import torch

from lib.attribution import attribution, block_subsets, cumulative, leave_one_out, rank_analysis, shapley
from lib.calibration import ece
from lib.config import Config, ParamsError, load_params
from lib.paths import PARAMS
from lib.report import answer, attribution_summary, statistics_summary
from lib.stats import pareto_front
from lib.study import run_all, run_seed


@pytest.fixture
def tiny_cfg(tmp_path, monkeypatch, one_thread) -> Config:
    monkeypatch.setenv("LLA_ARTIFACTS", str(tmp_path))
    d = load_params(PARAMS / "smoke.yml")
    d["seeds"] = [0, 1]
    d["model"]["kwargs"] = dict(img_size=16, patch_size=8, embed_dim=16, depth=3, num_heads=2)
    d["data"]["synthetic"] = dict(n_train=96, n_val=48, n_test=64, native_size=16, noise=1.5)
    d["train"]["epochs"] = 1
    d["laplace"]["fit_size"] = 48
    d["predictive"]["n_samples"] = 4
    d["stats"].update(n_boot=60, n_boot_shapley=20)
    return Config.from_dict(d)


def test_stages_cached_and_tables_consistent(tiny_cfg):
    cpu = torch.device("cpu")
    studies = run_all(tiny_cfg, cpu)
    again = run_seed(tiny_cfg, 0, cpu)
    assert again.subsets.path == studies[0].subsets.path and again.bank.path == studies[0].bank.path
    d = studies[0].named()
    # the 'none' posterior is the deterministic model; subset ECE row 0 column 0 is its ECE
    assert torch.allclose(d["probs"][d["names"].index("none")], d["det"], atol=1e-6)
    e = studies[0].subset_ece()
    assert e.shape == (tiny_cfg.stats.n_boot_shapley + 1, 2**3)
    assert abs(float(e[0, 0]) - float(ece(d["det"], d["labels"], tiny_cfg.stats.n_bins))) < 1e-5
    full = d["probs"][d["names"].index("all")]
    assert abs(float(e[0, -1]) - float(ece(full, d["labels"], tiny_cfg.stats.n_bins))) < 1e-5

    att = attribution(studies, tiny_cfg.stats, cpu)
    t = att.table.set_index("posterior")
    assert len(att.singles()) == 3 and att.samples.shape == (tiny_cfg.stats.n_boot, len(t))
    assert (t.lower <= t.delta + 1e-12).all() and (t.delta <= t.upper + 1e-12).all()
    mean_delta = sum(float(ece(s.named()["det"], s.named()["labels"], 10) - ece(
        s.named()["probs"][s.named()["names"].index("single 1")], s.named()["labels"], 10)) for s in studies) / 2
    assert abs(t.loc["single 1", "delta"] - mean_delta) < 1e-6

    values, pairs = shapley(studies, tiny_cfg.stats.alpha)
    assert abs(values.phi.sum() - t.loc["all", "delta"]) < 1e-6  # efficiency: Shapley sums to Δ(all)
    assert len(pairs) == 2
    heat, ranks = rank_analysis(att, tiny_cfg.stats)
    assert heat.shape == (3, 3) and torch.allclose(torch.tensor(heat.sum(1).to_numpy(), dtype=torch.float64), torch.ones(3, dtype=torch.float64))
    assert list(cumulative(att).k) == [1, 2, 3] and len(leave_one_out(att)) == 3

    text = attribution_summary(att.table, ranks, values, 0.05, 2) + statistics_summary(att.table, ranks, 2, 0.05)
    best = int(att.singles().sort_values("delta").block.iloc[-1])
    assert f"block {best}" in text and "pp" in text
    names = list(block_subsets(3))
    cost = torch.arange(len(names), dtype=torch.float64)
    delta = torch.tensor([t.loc[n, "delta"] for n in names], dtype=torch.float64)
    pareto = pd.DataFrame({"name": names, "cost": cost.numpy(), "delta": delta.numpy(), "front": pareto_front(cost, delta).numpy()})
    base = pd.DataFrame({"method": ["deterministic (MAP)", "temperature scaling (validation-fitted)",
                                    *[f"Laplace, {n}" for n in names]],
                         "ECE (%)": [5.0, 1.0, *[3.0] * len(names)], "accuracy (%)": [90.0, 90.0, *[80.0] * len(names)]})
    text = answer(att.table, ranks, values, pareto, base, tiny_cfg)
    assert "`smoke`" in text
    if t.loc["all", "delta"] > 0:
        assert "Temperature scaling" in text and "-10.00 pp" in text


def test_retune_with_shared_prior_is_refused(tiny_cfg):
    d = tiny_cfg.to_dict()
    d["laplace"].update(restricted_prior="retune", prior_per_block=False)
    with pytest.raises(ValueError, match="restricted_prior"):
        run_seed(Config.from_dict(d), 0, torch.device("cpu"))


def test_block_subsets_cover_the_priced_choices():
    s = block_subsets(4)
    assert s["all"] == [0, 1, 2, 3] and s["last 2"] == [2, 3] and s["first 3"] == [0, 1, 2]
    assert len(s) == 4 + 2 + 2 + 1


def test_bad_params_one_line():
    with pytest.raises(ParamsError) as err:
        Config.from_dict({"laplace": {"kfacc": "reduce"}}, source="params/x.yml")
    assert "\n" not in str(err.value) and "laplace.kfac" in str(err.value)
