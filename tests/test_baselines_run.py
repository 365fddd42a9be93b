"""lib.baselines.run: every baseline of one seed on the tiny CPU profile, cached and reused exactly."""

from __future__ import annotations

import pytest
import torch
from test_pipeline import tiny_profile

import lib.baselines.run as brun
from lib.baselines.ensemble import ensemble_probs
from lib.baselines.importance import update_norm
from lib.baselines.run import (
    BaselinesConfig,
    ensemble_run,
    importance_run,
    last_layer_run,
    mc_dropout_run,
    variational_run,
)
from lib.config import ParamsError
from lib.pipeline import map_run
from lib.train import predict_logits

pytestmark = pytest.mark.usefixtures("one_thread")

CPU = torch.device("cpu")
BC = BaselinesConfig.from_dict({
    "last_layer": {"structure": "kron", "batch_size": 16, "marglik_steps": 20},
    "ensemble": {"sizes": [1, 2]},
    "mc_dropout": {"rate": 0.2, "samples": 3},
    "variational": {"epochs": 2, "batch_size": 16, "lr": 3e-3, "samples": 3},
    "timing_batch": 4, "timing_iters": 1,
})


@pytest.fixture
def artifacts(tmp_path, monkeypatch):
    monkeypatch.setenv("LLA_ARTIFACTS", str(tmp_path / "artifacts"))
    return tmp_path / "artifacts"


def _check(res, n_val=16, n_test=24, c=3):
    assert res.val_probs.shape[-2:] == (n_val, c) and res.test_probs.shape[-2:] == (n_test, c)
    assert torch.allclose(res.test_probs.sum(-1), torch.ones(res.test_probs.shape[:-1]), atol=1e-5)
    assert res.stage.done


def _refuse(monkeypatch, *names):
    def refuse(*args, **kwargs):
        raise AssertionError("recomputed although the stage is done")

    for name in names:
        monkeypatch.setattr(brun, name, refuse)


def test_all_baselines_run_and_are_reused(artifacts, monkeypatch):
    cfg = tiny_profile()
    run = map_run(cfg, 0, CPU)
    results = [last_layer_run(cfg, BC, run, CPU), ensemble_run(cfg, BC, 0, CPU),
               mc_dropout_run(cfg, BC, 0, CPU), variational_run(cfg, BC, 0, CPU)]
    for res in results:
        _check(res)
        assert res.cost["map_ms_per_image"] > 0
    ll, ens, mc, var = results
    assert ens.test_probs.shape == (2, 24, 3)
    # member 0 is the seed's MAP model
    map_probs = predict_logits(run.model, run.splits.test, preprocess=run.preprocess, device=CPU).softmax(-1)
    assert torch.allclose(ensemble_probs(ens.test_probs, 1), map_probs, atol=1e-6)
    assert ens.cost["sizes"]["2"]["train_factor"] == 2.0 and ens.cost["member_seeds"] == [0, 1000]
    assert (ll.test_probs - map_probs).abs().max() > 1e-4
    assert mc.cost["forward_passes"] == 3 and var.cost["ranks"] >= 1
    assert (var.stage.path / "prune_log.json").is_file()

    _refuse(monkeypatch, "fit_last_layer", "member_probs", "mc_dropout_probs", "fit_variational")
    again = [last_layer_run(cfg, BC, run, CPU), ensemble_run(cfg, BC, 0, CPU),
             mc_dropout_run(cfg, BC, 0, CPU), variational_run(cfg, BC, 0, CPU)]
    for a, b in zip(results, again):
        assert a.stage.path == b.stage.path and a.cost == b.cost
        assert torch.equal(a.test_probs, b.test_probs) and torch.equal(a.val_probs, b.val_probs)


def test_importance_scores_are_cached(artifacts, monkeypatch):
    cfg = tiny_profile()
    run = map_run(cfg, 0, CPU)
    bc = BaselinesConfig.from_dict({"importance_batches": 2, "importance_batch_size": 4})
    st, scores = importance_run(bc, run, CPU)
    assert list(scores) == ["AdaLoRA sensitivity", "Fisher trace", "gradient norm", "LoRA update norm"]
    assert all(v.shape == (2,) and v.dtype == torch.float64 and (v > 0).all() for v in scores.values())
    assert torch.equal(scores["LoRA update norm"], update_norm(run.model))
    _refuse(monkeypatch, "fisher_and_gradient", "adalora_sensitivity")
    st2, again = importance_run(bc, run, CPU)
    assert st2.path == st.path and all(torch.equal(scores[k], again[k]) for k in scores)


def test_config_nested_unknown_key():
    with pytest.raises(ParamsError, match="unknown key 'baselines.ensemble.size'"):
        BaselinesConfig.from_dict({"ensemble": {"size": [3]}})
    with pytest.raises(ParamsError, match="unknown key 'baselines.ensembles'"):
        BaselinesConfig.from_dict({"ensembles": {}})
    assert BaselinesConfig.from_dict({}).mc_dropout.samples == 16
