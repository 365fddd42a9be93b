"""lib.baselines.run: every baseline of one seed on the tiny CPU profile — one signature, the rows
each yields, the MAP warm start and recipe of the trained ones, the study's MAP models as ensemble
members — cached and reused exactly."""

from __future__ import annotations

import pytest
import torch
from test_pipeline import tiny_profile

import lib.baselines.ensemble as bens
import lib.baselines.finetune as bft
import lib.baselines.importance as bimp
import lib.baselines.last_layer as bll
import lib.baselines.mc_dropout as bmc
import lib.baselines.variational as bvar
from lib.baselines.importance import SCORES, importance_scores, update_norm
from lib.baselines.run import METHODS, method_predictions
from lib.baselines.table import baseline_table, with_temperature
from lib.pipeline import map_run
from lib.train import predict_logits

pytestmark = pytest.mark.usefixtures("one_thread")

CPU = torch.device("cpu")
BASELINES = {
    "finetune": {"epochs": 2, "warmup_epochs": 0.5},
    "last_layer": {"structure": "kron", "batch_size": 16, "marglik_steps": 20},
    "ensemble": {"sizes": [1, 2]},
    "mc_dropout": {"rate": 0.2, "samples": 3},
    "variational": {"log_alpha_lr": 5.0, "beta_warmup_epochs": 1, "prune_every": 2, "samples": 3},
    "timing_batch": 4, "timing_iters": 1, "importance_batches": 2, "importance_batch_size": 4, "fisher_examples": 6,
}


def _profile(seeds=(0, 1), **baselines):
    return tiny_profile(seeds=list(seeds), baselines={**BASELINES, **baselines})
ROWS = {
    "last-layer Laplace": ["last-layer Laplace"],
    "LoRA ensemble": ["LoRA ensemble, M = 1", "LoRA ensemble, M = 2"],
    "MC dropout": ["MC dropout", "MC dropout, no dropout at test"],
    "variational LoRA": ["variational LoRA", "variational LoRA, mean gates"],
    "continued MAP": ["MAP, fine-tuned further"],
}


@pytest.fixture
def artifacts(tmp_path, monkeypatch):
    monkeypatch.setenv("LLA_ARTIFACTS", str(tmp_path / "artifacts"))
    return tmp_path / "artifacts"


def _refuse(monkeypatch, *targets):
    def refuse(*args, **kwargs):
        raise AssertionError("recomputed although the stage is done")

    for module, name in targets:
        monkeypatch.setattr(module, name, refuse)


def test_all_baselines_run_and_are_reused(artifacts, monkeypatch):
    cfg = _profile()
    run = map_run(cfg, 0, CPU)
    map_probs = predict_logits(run.model, run.splits.test, preprocess=run.preprocess, device=CPU).softmax(-1)
    before = [p.detach().clone() for p in run.model.parameters() if p.requires_grad]
    results = {name: fn(cfg, run, CPU) for name, fn in METHODS.items()}
    for name, res in results.items():
        assert res.method == name and list(res.rows) == ROWS[name] and res.stage.done
        for row in res.rows.values():
            assert row.val.shape == (16, 3) and row.test.shape == (24, 3) and row.ms_per_image > 0
            assert torch.allclose(row.test.sum(-1), torch.ones(24), atol=1e-5)
        assert res.cost["map_ms_per_image"] > 0 and res.cost["train_seconds"] >= 0 and "training" in res.cost
    # the baselines leave the MAP model as it was (they train copies)
    assert all(torch.equal(a, b) for a, b in zip(before, [p for p in run.model.parameters() if p.requires_grad]))
    ens = results["LoRA ensemble"]
    assert torch.allclose(ens.rows["LoRA ensemble, M = 1"].test, map_probs, atol=1e-6)  # member 0 is the MAP model
    other = map_run(cfg, 1, CPU)
    two = (map_probs + predict_logits(other.model, run.splits.test, preprocess=run.preprocess, device=CPU).softmax(-1)) / 2
    assert torch.allclose(ens.rows["LoRA ensemble, M = 2"].test, two, atol=1e-6)
    assert ens.cost["member_seeds"] == [0, 1] and ens.cost["training"]["kind"] == "members are the study's MAP models"
    assert ens.cost["train_seconds"] == pytest.approx(sum(r["seconds"] for r in other.history))
    assert (results["last-layer Laplace"].rows["last-layer Laplace"].test - map_probs).abs().max() > 1e-4
    mc, var, more = results["MC dropout"], results["variational LoRA"], results["continued MAP"]
    for res in (mc, var, more):  # fine-tuned from the MAP adapters with the MAP recipe
        t = res.cost["training"]
        assert t["kind"] == "fine-tuned from the MAP adapters" and t["epochs"] == 2 and t["l2"] == cfg.train.weight_decay
        assert t["lr"] == cfg.train.lr and t["grad_clip"] == cfg.train.grad_clip
    assert mc.rows["MC dropout"].forward_passes == 3 and mc.rows["MC dropout, no dropout at test"].forward_passes == 1
    assert (mc.rows["MC dropout"].test - mc.rows["MC dropout, no dropout at test"].test).abs().max() > 1e-5
    assert var.cost["ranks"] <= var.cost["ranks_before"] == 2 * 4 * 2
    assert (var.stage.path / "prune_log.json").is_file()

    predictions = method_predictions(list(results.values()))
    assert list(predictions) == [r for rows in ROWS.values() for r in rows]
    assert predictions["MC dropout"].train_seconds == mc.cost["train_seconds"]
    tuned = with_temperature(predictions, run.splits.val.y)
    table = baseline_table({"MAP": predictions["LoRA ensemble, M = 1"], "temperature scaling": tuned["LoRA ensemble, M = 1 + TS"],
                            **tuned}, run.splits.val.y, run.splits.test.y, n_resamples=20)
    assert len(table) == 2 + 2 * 8 and set(table.tuning) == {"none", "temperature"}
    # the control is the MC-dropout fine-tune without dropout: same recipe, same data order, other weights
    assert (more.rows["MAP, fine-tuned further"].test - map_probs).abs().max() > 1e-5
    assert (more.rows["MAP, fine-tuned further"].test - mc.rows["MC dropout, no dropout at test"].test).abs().max() > 1e-6

    _refuse(monkeypatch, (bll, "fit_last_layer"), (bens, "member_probs"), (bmc, "fit"), (bvar, "fit_variational"),
            (bft, "fit"))
    for name, fn in METHODS.items():
        again = fn(cfg, run, CPU)
        assert again.stage.path == results[name].stage.path and again.cost == results[name].cost
        for k, row in results[name].rows.items():
            assert torch.equal(again.rows[k].test, row.test) and torch.equal(again.rows[k].val, row.val)


def test_trained_baselines_are_reproducible_whatever_the_global_stream(artifacts, tmp_path, monkeypatch):
    cfg = _profile(seeds=[0], ensemble={"sizes": [1]})
    run = map_run(cfg, 0, CPU)
    a = METHODS["MC dropout"](cfg, run, CPU)
    monkeypatch.setenv("LLA_ARTIFACTS", str(tmp_path / "other"))
    torch.manual_seed(999)
    b = METHODS["MC dropout"](cfg, map_run(cfg, 0, CPU), CPU)
    assert a.stage.path.name == b.stage.path.name
    assert all(torch.equal(a.rows[k].test, b.rows[k].test) for k in a.rows)


def test_missing_section_is_refused(artifacts):
    cfg = tiny_profile()
    run = map_run(cfg, 0, CPU)
    with pytest.raises(ValueError, match="no 'baselines' section"):
        METHODS["MC dropout"](cfg, run, CPU)


def test_importance_scores_are_cached(artifacts, monkeypatch):
    cfg = _profile(seeds=[0], ensemble={"sizes": [1]})
    run = map_run(cfg, 0, CPU)
    st, scores = importance_scores(cfg, run, CPU)
    assert tuple(scores) == SCORES == ("AdaLoRA sensitivity", "Fisher trace", "LoRA update norm")
    assert all(v.shape == (2,) and v.dtype == torch.float64 and (v > 0).all() for v in scores.values())
    assert torch.equal(scores["LoRA update norm"], update_norm(run.model))
    _refuse(monkeypatch, (bimp, "fisher_trace"), (bimp, "adalora_sensitivity"))
    st2, again = importance_scores(cfg, run, CPU)
    assert st2.path == st.path and all(torch.equal(scores[k], again[k]) for k in scores)
