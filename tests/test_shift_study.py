"""lib.shift_study on the tiny synthetic study of tests/test_study.py: predictions on new images
reproduce the study on its own test set and are those of its named posteriors only, corrupted sets
are cached and paired, and evaluate_shift's tables agree with the metric functions applied by hand."""

from __future__ import annotations

import inspect

import pandas as pd
import pytest
import torch

from conftest import tiny_study_params
from lib.calibration import ece, nll
from lib.config import Config, ParamsError
from lib.data import Split
from lib.ood_sets import synthetic_ood_images
from lib.shift import shift_metrics
from lib.shift_study import (clean_predictions, corrupted_predictions, corrupted_test_sets, evaluate_shift,
                             ood_predictions, shift_predictions, study_shift)
from lib.stats import delta_ece, kendall_tau_b
from lib.study import Study

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """The tiny synthetic study of tests/test_study.py (one seed, 3 blocks) with a small shift section."""
    mp = pytest.MonkeyPatch()
    mp.setenv("LLA_ARTIFACTS", str(tmp_path_factory.mktemp("artifacts")))
    d = tiny_study_params([0])
    d["shift"] = {"corruptions": ["gaussian_noise", "contrast"], "severities": [1, 5], "max_images": 40, "seed": 3,
                  "far_ood_images": 12}
    cfg = Config.from_dict(d)
    study = Study(cfg, torch.device("cpu")).seed(0)
    yield cfg, study
    mp.undo()


def test_predictions_reproduce_the_study_on_its_test_set(tiny):
    cfg, study = tiny
    cpu = torch.device("cpu")
    named, test = study.named(), study.run.splits.test
    new = shift_predictions(cfg, study, test.x, test.y, {"set": "clean test"}, cpu)
    old = clean_predictions(cfg, study, cpu)
    for pred in (new, old):
        assert pred.names == tuple(named["names"]) and torch.equal(pred.labels, test.y)
        assert torch.allclose(pred.probs, named["probs"], atol=1e-5)
        assert torch.allclose(pred.det, named["det"], atol=1e-5) and torch.allclose(pred.ts, named["ts"], atol=1e-5)
    again = shift_predictions(cfg, study, test.x, test.y, {"set": "clean test"}, cpu)
    assert torch.equal(again.probs, new.probs)


def test_only_the_named_posteriors_predict_under_shift(tiny):
    """The methods are MAP, temperature scaling and named posteriors in the order asked for; no
    entry point takes other block subsets, whose κ_S the subsets stage leaves NaN unless their
    ordering visits them (stats.shapley_permutations)."""
    cfg, study = tiny
    pred = clean_predictions(cfg, study, torch.device("cpu"))
    methods = pred.methods(["all but 1", "single 1"])
    assert list(methods) == ["MAP", "temperature scaling", "Laplace, all but 1", "Laplace, single 1"]
    assert torch.equal(methods["Laplace, single 1"], pred.probs[pred.names.index("single 1")])
    with pytest.raises(ValueError, match="named posteriors"):
        pred.methods(["single 7"])
    for f in (clean_predictions, shift_predictions, corrupted_predictions, ood_predictions, evaluate_shift, study_shift):
        assert "extra" not in inspect.signature(f).parameters, f.__name__


def test_corrupted_sets_are_cached_paired_and_change_predictions(tiny):
    cfg, study = tiny
    cpu = torch.device("cpu")
    test = study.run.splits.test
    sets = list(corrupted_test_sets(cfg, test))
    assert [(s.name, s.severity) for s in sets] == [("gaussian_noise", 1), ("gaussian_noise", 5), ("contrast", 1), ("contrast", 5)]
    assert all(torch.equal(s.index, sets[0].index) and len(s.index) == 40 for s in sets)
    assert [s.stage.path for s in corrupted_test_sets(cfg, test)] == [s.stage.path for s in sets]
    clean = clean_predictions(cfg, study, cpu)
    s = sets[-1]
    pred = shift_predictions(cfg, study, s.split.x, s.split.y, {"corrupt": s.stage.key}, cpu, upstream=[s.stage])
    assert pred.probs.shape == (len(clean.names), 40, cfg.data.num_classes)
    assert not torch.allclose(pred.det, clean.det[s.index], atol=1e-3)
    far = synthetic_ood_images(10, seed=0, size=16)
    ood = shift_predictions(cfg, study, far, None, {"set": "far", "n": 10}, cpu)
    assert (ood.labels == 0).all() and ood.probs.shape[1] == 10


def test_evaluate_shift_tables(tiny):
    cfg, study = tiny
    cpu = torch.device("cpu")
    res = evaluate_shift(cfg, [study], cpu, posteriors=["all", "single 1"])
    m = res.metrics
    assert len(m) == (1 + 4) * 4 and set(m.seed) == {0}
    assert set(m.method) == {"MAP", "temperature scaling", "Laplace, all", "Laplace, single 1"}
    clean = clean_predictions(cfg, study, cpu)
    row = m[(m.severity == 0) & (m.method == "Laplace, all")].iloc[0]
    assert abs(row.ece - float(ece(clean.probs[clean.names.index("all")], clean.labels, cfg.stats.n_bins))) < 1e-9

    sets = list(corrupted_test_sets(cfg, study.run.splits.test))
    preds = [shift_predictions(cfg, study, s.split.x, s.split.y, {"corrupt": s.stage.key}, cpu, upstream=[s.stage])
             for s in sets]
    row = m[(m.corruption == "contrast") & (m.severity == 5) & (m.method == "MAP")].iloc[0]
    assert abs(row.nll - float(nll(preds[3].det, sets[3].split.y))) < 1e-9
    ref = shift_metrics(preds[0].methods(["all", "single 1"]), sets[0].split.y, corruption="gaussian_noise", severity=1,
                        n_bins=cfg.stats.n_bins)
    got = m[(m.corruption == "gaussian_noise") & (m.severity == 1)].drop(columns="seed").reset_index(drop=True)
    pd.testing.assert_frame_equal(got, ref)

    assert list(res.ranks.severity) == [1, 5]
    singles = [clean.names.index(f"single {i}") for i in range(3)]
    idx = torch.cat([sets[0].index, sets[2].index])  # severity 1: gaussian_noise, contrast pooled
    d_clean = delta_ece(clean.det[idx], clean.probs[singles][:, idx], clean.labels[idx], cfg.stats.n_bins)
    det_s = torch.cat([preds[0].det, preds[2].det])
    bayes_s = torch.cat([preds[0].probs[singles], preds[2].probs[singles]], 1)
    d_shift = delta_ece(det_s, bayes_s, clean.labels[idx], cfg.stats.n_bins)
    r1 = res.ranks[res.ranks.severity == 1].iloc[0]
    assert abs(r1.tau - float(kendall_tau_b(d_clean, d_shift))) < 1e-9
    assert r1.lower <= r1.upper

    g = res.gains
    assert list(g.columns) == ["severity", "reference", "method", "gain", "lower", "upper"]
    assert sorted(g.severity.unique()) == [0, 1, 5]
    assert set(g[g.reference == "temperature scaling"].method) == {"Laplace, all", "Laplace, single 1"}
    versus_ts = g[(g.severity == 0) & (g.method == "Laplace, all") & (g.reference == "temperature scaling")].iloc[0]
    ref = float(delta_ece(clean.ts, clean.probs[[clean.names.index("all")]], clean.labels, cfg.stats.n_bins)[0])
    assert abs(versus_ts.gain - ref) < 1e-6 and versus_ts.lower <= versus_ts.upper
    g = g[g.reference == "MAP"]
    assert set(g.method) == {"temperature scaling", "Laplace, all", "Laplace, single 1"}
    row = g[(g.severity == 0) & (g.method == "Laplace, all")].iloc[0]
    ref = float(delta_ece(clean.det, clean.probs[[clean.names.index("all")]], clean.labels, cfg.stats.n_bins)[0])
    assert abs(row.gain - ref) < 1e-6 and row.lower <= row.upper  # fp32 probabilities, another summation order
    row = g[(g.severity == 1) & (g.method == "temperature scaling")].iloc[0]
    ref = float(delta_ece(det_s, torch.cat([preds[0].ts, preds[2].ts])[None], clean.labels[idx], cfg.stats.n_bins)[0])
    assert abs(row.gain - ref) < 1e-6

    o = res.ood
    # synthetic data: no near-OOD set; the three far-OOD sets, 2 scores × 4 methods each
    assert list(dict.fromkeys(o.ood_set)) == ["natural", "digits", "synthetic"] and len(o) == 3 * 2 * 4
    assert ((o.auroc >= 0) & (o.auroc <= 1)).all() and (o[o.method == "MAP"].auroc_diff == 0).all()


def test_missing_or_bad_shift_section_is_reported():
    split = Split(torch.zeros(1, 3, 8, 8, dtype=torch.uint8), torch.zeros(1, dtype=torch.int64))
    with pytest.raises(ValueError, match="no 'shift' section"):
        list(corrupted_test_sets(Config.from_dict({"profile": "p"}), split))
    with pytest.raises(ParamsError, match="shift.corruptions has unknown names"):
        Config.from_dict({"shift": {"corruptions": ["rain"]}}, source="p.yml")
    with pytest.raises(ParamsError, match="shift.severities"):
        Config.from_dict({"shift": {"severities": [0]}}, source="p.yml")
    with pytest.raises(ParamsError, match="'shift.far_ood_sets' is 'faces'"):
        Config.from_dict({"shift": {"far_ood_sets": ["faces"]}}, source="p.yml")
    with pytest.raises(ParamsError, match="distinct names"):
        Config.from_dict({"shift": {"far_ood_sets": ["digits", "digits"]}}, source="p.yml")
    with pytest.raises(ParamsError, match="'digits' set has 1797 images"):
        Config.from_dict({"shift": {"far_ood_images": 1798}}, source="p.yml")
    assert Config.from_dict({"shift": {"far_ood_sets": ["natural"], "far_ood_images": 5000}}).shift.far_ood_images == 5000
    with pytest.raises(ParamsError, match="did you mean 'shift.max_images'"):
        Config.from_dict({"shift": {"max_imgs": 3}}, source="p.yml")
    assert Config.from_dict({}).shift is None


def test_ensembles_of_the_seeds_map_models_under_shift(tmp_path, monkeypatch):
    """With a baselines section, evaluate_shift adds the LoRA ensembles of the seeds' MAP models: on
    every image set the mean of the members' MAP softmax (both seeds' M = 2 ensembles are the same
    two models), also compared with temperature scaling, and in the OOD table."""
    from test_baselines_run import BASELINES

    monkeypatch.setenv("LLA_ARTIFACTS", str(tmp_path))
    d = tiny_study_params([0, 1])
    d["shift"] = {"corruptions": ["contrast"], "severities": [5], "max_images": 24, "seed": 3,
                  "far_ood_sets": ["synthetic"], "far_ood_images": 12}
    d["baselines"] = {**BASELINES, "ensemble": {"sizes": [2]}}
    cfg = Config.from_dict(d)
    studies = Study(cfg, torch.device("cpu")).seeds
    cpu = torch.device("cpu")
    res = evaluate_shift(cfg, studies, cpu, posteriors=["all"])
    name = "LoRA ensemble, M = 2"
    (cs,) = list(corrupted_test_sets(cfg, studies[0].run.splits.test))
    dets = [shift_predictions(cfg, s, cs.split.x, cs.split.y, {"corrupt": cs.stage.key}, cpu, upstream=[cs.stage]).det
            for s in studies]
    m = res.metrics[(res.metrics.method == name) & (res.metrics.severity == 5)]
    assert len(m) == 2 and set(m.seed) == {0, 1}
    ref = float(ece(torch.stack(dets).mean(0), cs.split.y, cfg.stats.n_bins))
    assert all(abs(v - ref) < 1e-9 for v in m.ece)
    g = res.gains
    assert {(name, "MAP"), (name, "temperature scaling")} <= set(zip(g.method, g.reference))
    assert set(res.ood[res.ood.method == name].ood_set) == {"synthetic"}
    d["baselines"]["ensemble"] = {"sizes": [3]}
    with pytest.raises(ValueError, match="need as many studied seeds"):
        evaluate_shift(Config.from_dict({**d, "seeds": [0, 1, 2]}), studies, cpu, posteriors=["all"])
