"""lib.study + lib.stages + lib.attribution + lib.report on a tiny synthetic profile, end to end."""

from __future__ import annotations

import dataclasses
import json
import shutil

import pandas as pd
import pytest
import torch

from conftest import tiny_study_params
from lib.attribution import (ESTIMATORS, SCALES, attribution, block_subsets, choose_single, control_grid, cumulative,
                             estimator_agreement, estimator_robustness, estimators_coincide, leave_one_out, mc_error,
                             rank_analysis, ranking_agreement, scale_sensitivity, shapley, tuned_seed,
                             validation_table)
from lib.calibration import ece, smooth_ece
from lib.artifacts import stage_code
from lib.config import Config, ParamsError
from lib.answer import answer
from lib.attribution import choose_set
from lib.attribution_findings import attribution_findings, control_findings
from lib.report import display_scale_table, scale_table, setup_table
from lib.scale_findings import scale_findings
from lib.statistics_findings import decisions, mc_findings
from lib.resample import bootstrap_counts
from lib.shapley import shapley_values
from lib.stats import basic_interval, delta_ece, pareto_front
from lib.data import batches
from lib.laplace.predictive import Bank, perturbation_bank, standard_subsets, subset_probs
from lib.laplace.scale import scale_grid, tune_scales
from lib.pipeline import map_run
from lib.stages.attribution import attribution_stage
from lib.stages.laplace import fit_laplace
from lib.stages.quality import curvature_quality
from lib.shapley import antithetic_permutations, coalitions
from lib.stages.subsets import TEST_SEED, VALIDATION_SEED, evaluated_subsets
from lib.study import Study


@pytest.fixture
def tiny_cfg(tmp_path, monkeypatch, one_thread) -> Config:
    monkeypatch.setenv("LLA_ARTIFACTS", str(tmp_path))
    d = tiny_study_params([0, 1])
    return Config.from_dict(d)


def test_stages_cached_and_tables_consistent(tiny_cfg, monkeypatch):
    cpu = torch.device("cpu")
    study = Study(tiny_cfg, cpu)
    studies = study.seeds
    assert study.seed(0) is studies[0] and study.run(1) is studies[1].run  # opened once per Study
    again = Study(tiny_cfg, cpu).seed(0)
    assert again.subsets.path == studies[0].subsets.path and again.bank.path == studies[0].bank.path
    # every stage is keyed by the import closure of the module that computes it
    s0 = studies[0]
    for st, code in ((s0.run.stage, "lib.pipeline"), (s0.laplace, "lib.stages.laplace"), (s0.bank, "lib.stages.banks"),
                     (s0.val_bank, "lib.stages.banks"), (s0.control, "lib.stages.banks"),
                     (s0.control_val, "lib.stages.banks"), (s0.subsets, "lib.stages.subsets")):
        keyed = json.loads((st.path / "inputs.json").read_text())["inputs"]["code"]
        assert keyed == stage_code([code]), st.path
    d = studies[0].named()
    # the 'none' posterior is the deterministic model; subset ECE row 0 column 0 is its ECE
    assert torch.allclose(d["probs"][d["names"].index("none")], d["det"], atol=1e-6)
    e = studies[0].subset_ece()
    assert e.shape == (tiny_cfg.stats.n_boot_shapley + 1, 2**3)
    assert abs(float(e[0, 0]) - float(ece(d["det"], d["labels"], tiny_cfg.stats.n_bins))) < 1e-5
    full = d["probs"][d["names"].index("all")]
    assert abs(float(e[0, -1]) - float(ece(full, d["labels"], tiny_cfg.stats.n_bins))) < 1e-5

    att = attribution(studies, tiny_cfg.stats, tiny_cfg.predictive, cpu)
    t = att.table.set_index("posterior")
    assert len(att.singles()) == 3 and att.samples.shape == (tiny_cfg.stats.n_boot, len(t))
    assert (t.lower <= t.upper).all() and (t.ts_lower <= t.ts_upper).all()
    assert t.interval.iloc[0].startswith("basic; test images × validation images shared by the seeds")
    assert (t.seed_lower <= t.delta).all() and (t.delta <= t.seed_upper).all()  # the t interval is centred on the seed mean
    mean_delta = sum(float(ece(s.named()["det"], s.named()["labels"], 10) - ece(
        s.named()["probs"][s.named()["names"].index("single 1")], s.named()["labels"], 10)) for s in studies) / 2
    assert abs(t.loc["single 1", "delta"] - mean_delta) < 1e-6  # the whole validation set chooses κ_S again
    ts_gain = sum(float(ece(s.named()["det"], s.named()["labels"], 10) - ece(s.named()["ts"], s.named()["labels"], 10))
                  for s in studies) / 2
    assert torch.allclose(torch.tensor(t.ts_delta.to_numpy()), torch.tensor((t.delta - ts_gain).to_numpy()), atol=1e-4)
    ctrl = att.control
    assert list(ctrl.block) == [0, 1, 2]
    singles = att.singles()
    for col in ("delta", "lower", "upper"):
        assert torch.allclose(torch.tensor(ctrl[col].to_numpy()), torch.tensor(singles[col].to_numpy()), atol=1e-12)
    assert torch.allclose(torch.tensor(ctrl["diff"].to_numpy()), torch.tensor((ctrl.delta - ctrl.delta_iso).to_numpy()),
                          atol=1e-12)
    assert (ctrl.iso_lower <= ctrl.iso_upper).all() and (ctrl.diff_lower <= ctrl.diff_upper).all()
    cgrid = control_grid(tiny_cfg.predictive)
    own = torch.empty(2, 3, dtype=torch.float64)
    for i, s in enumerate(studies):  # σ²_ℓ: the grid argmin of the control's validation NLL, by a loop over the grid
        val = s.control_validation_bank()
        for b in range(3):
            nll = [float(torch.nn.functional.nll_loss(subset_probs(val, 1 << b, scale=float(k)).clamp_min(1e-12).log(),
                                                      val.labels)) for k in cgrid]
            own[i, b] = cgrid[int(torch.tensor(nll).argmin())]
            chosen = tuned_seed(s, ["all"], tiny_cfg.predictive, cpu).columns[1 + b].chosen()
            assert cgrid[chosen] == own[i, b]
    assert torch.allclose(torch.tensor(ctrl.sigma2.to_numpy()), own.quantile(0.5, dim=0), rtol=1e-9)
    edge = ["lower" if (own[:, b] == cgrid[0]).any() else "upper" if (own[:, b] == cgrid[-1]).any() else ""
            for b in range(3)]
    assert list(ctrl.sigma2_edge) == edge
    found = control_findings(ctrl, 0.05, tiny_cfg.stats.equivalence_margin)
    assert (ctrl.tost_lower >= ctrl.diff_lower - 1e-12).all() and (ctrl.tost_upper <= ctrl.diff_upper + 1e-12).all()
    assert set(found.shape) == {0, 1, 2} and tuple(b for b in range(3) if edge[b] == "lower") == found.lower_edge

    mc = mc_error(studies[0], tiny_cfg.stats, "mc", cpu).set_index("posterior")
    assert list(mc.index) == ["single 0", "single 1", "single 2", "all"]
    d0 = studies[0].named()
    for name in mc.index:  # Δ of the K-sample predictive at κ_S is the study's Δ of that posterior
        p = d0["probs"][d0["names"].index(name)]
        ref = float(delta_ece(d0["det"], p[None], d0["labels"], tiny_cfg.stats.n_bins)[0])
        assert abs(mc.loc[name, "delta"] - ref) < 1e-6
    assert (mc.mc_se > 0).all() and (mc.test_se > 0).all()
    assert torch.allclose(torch.tensor(mc.mc_share.to_numpy()), torch.tensor((mc.mc_se / mc.test_se).to_numpy()))
    noise = mc_findings(mc.reset_index(), 0.05)
    assert noise.max_se == mc.mc_se.max() and noise.checked == 4

    rob = estimator_robustness(studies, tiny_cfg.stats.n_bins).set_index("posterior")
    assert list(rob.index) == ["all", "single 0", "single 1", "single 2"]
    assert torch.allclose(torch.tensor(rob["equal-width ECE"].to_numpy(), dtype=torch.float64),
                          torch.tensor(t.loc[rob.index, "delta"].to_numpy(), dtype=torch.float64), atol=1e-6)
    smooth = sum(float(smooth_ece(s.named()["det"], s.named()["labels"]) - smooth_ece(
        s.named()["probs"][s.named()["names"].index("single 1")], s.named()["labels"])) for s in studies) / 2
    assert abs(rob.loc["single 1", "smooth ECE"] - smooth) < 1e-9
    assert list(estimator_agreement(rob.reset_index()).estimator) == list(ESTIMATORS[1:])

    sens = scale_sensitivity(studies, tiny_cfg.stats.n_bins, "mc", cpu).set_index("posterior")
    assert torch.allclose(torch.tensor(sens[SCALES[0]].to_numpy(), dtype=torch.float64),
                          torch.tensor(t.loc[sens.index, "delta"].to_numpy(), dtype=torch.float64), atol=1e-6)
    assert abs(sens.loc["all", SCALES[1]] - sens.loc["all", SCALES[0]]) < 1e-6  # κ_all is the all-block κ_S
    by_hand = 0.0
    for s in studies:
        d, bank = s.named(), s.test_bank()
        p = subset_probs(bank, d["masks"][d["names"].index("single 1")], scale=float(d["scales"][d["names"].index("all")]))
        by_hand += float(delta_ece(d["det"], p[None], d["labels"], tiny_cfg.stats.n_bins)[0]) / 2
    assert abs(sens.loc["single 1", SCALES[1]] - by_hand) < 1e-6
    assert list(ranking_agreement(sens.reset_index(), SCALES).estimator) == list(SCALES[1:])
    own = pd.concat([s.scales().set_index("posterior").scale for s in studies], axis=1).median(axis=1)
    assert torch.allclose(torch.tensor(sens.kappa_own.to_numpy()), torch.tensor(own.loc[sens.index].to_numpy()), rtol=1e-6)

    values = shapley(studies, tiny_cfg.stats)
    assert abs(values.phi.sum() - t.loc["all", "delta"]) < 1e-6  # efficiency: Shapley sums to Δ(all)
    assert (values.lower < values.upper).all() and (values.mc_se == 0).all()
    # the seeds share their resamples: the interval is the basic one of the seed-averaged replicates
    phi = torch.stack([shapley_values(e[:, :1] - e) for e in (s.subset_ece().double() for s in studies)])
    lo, hi = basic_interval(phi[:, 1:].mean(0), phi[:, 0].mean(0), tiny_cfg.stats.alpha)
    assert torch.allclose(torch.tensor(values.lower.to_numpy()), lo) and torch.allclose(torch.tensor(values.upper.to_numpy()), hi)
    assert ((values.seed_lower <= values.phi) & (values.phi <= values.seed_upper)).all()
    heat, ranks = rank_analysis(att, tiny_cfg.stats)
    assert heat.shape == (3, 3) and torch.allclose(torch.tensor(heat.sum(axis=1).to_numpy(), dtype=torch.float64), torch.ones(3, dtype=torch.float64))
    assert list(cumulative(att).k) == [1, 2, 3] and len(leave_one_out(att)) == 3

    validation = validation_table(studies, tiny_cfg.predictive, tiny_cfg.stats.n_bins, cpu)
    best = choose_single(validation)

    # The study's attribution stage holds exactly these tables, computed once: a new Study loads them.
    for tables in (study.attribution_tables, None):
        if tables is None:
            monkeypatch.setattr("lib.stages.attribution.attribution", lambda *a, **k: pytest.fail("recomputed"))
            tables = Study(tiny_cfg, cpu).attribution_tables
        pd.testing.assert_frame_equal(tables.attribution.table, att.table)
        pd.testing.assert_frame_equal(tables.attribution.control, att.control)
        assert torch.equal(tables.attribution.samples, att.samples)
        for got, ref in ((tables.heat, heat), (tables.ranks, ranks), (tables.shapley, values),
                         (tables.validation, validation)):
            pd.testing.assert_frame_equal(got, ref)
    keyed = json.loads((attribution_stage(tiny_cfg, studies, cpu).path / "inputs.json").read_text())["inputs"]["code"]
    assert keyed["modules"] == stage_code(["lib.stages.attribution"])["modules"]
    found = attribution_findings(att.table, ranks, values, best, 0.05, 2)
    assert found.best_block == best and found.best.estimate == t.loc[f"single {best}", "delta"]
    assert found.shapley_total == pytest.approx(t.loc["all", "delta"], abs=1e-6)
    assert decisions(att.table, ranks, 2).blocks == 3
    names = list(block_subsets(3))
    cost = torch.arange(len(names), dtype=torch.float64)
    delta = torch.tensor([t.loc[n, "delta"] for n in names], dtype=torch.float64)
    pareto = pd.DataFrame({"name": names, "cost": cost.numpy(), "delta": delta.numpy(), "front": pareto_front(cost, delta).numpy()})
    ctrl = att.control

    def ans(table=att.table, ranks=ranks, val=validation, **kw):
        return answer(table, ranks, val, ctrl, tiny_cfg, **kw)

    found = ans()
    assert found.best_block == best and found.all_blocks.estimate == t.loc["all", "delta"]
    assert found.shape.estimate == ctrl.set_index("block").loc[best, "diff"]
    noisy = mc.reset_index().assign(mc_share=[0.2, 0.9, 0.1, 0.7])
    assert (ans(mc=noisy).mc_noisy, ans(mc=noisy).mc_checked) == (2, 4)
    assert ans(mc=noisy.assign(mc_share=0.3)).mc_noisy == 0
    agree = estimator_agreement(estimator_robustness(studies, tiny_cfg.stats.n_bins))
    lead = int(agree.top_block_study.iloc[0])
    assert ans(agreement=agree.assign(top_block=lead)).leader == "same"
    certified = bool((ranks.set_index("block").loc[lead, "rank_upper"] == 1))
    differ = ans(agreement=agree.assign(top_block=[lead, lead + 1, lead]))
    assert differ.leader == ("depends" if certified else "uncertified") and differ.differing == (agree.estimator[1],)
    sure = ranks.assign(rank_upper=[1 if b == lead else 3 for b in ranks.block])
    assert ans(ranks=sure, agreement=agree.assign(top_block=[lead, lead + 1, lead])).leader == "depends"
    # The choices come from the validation table, whatever the test set says: with a hand-made
    # validation gain that makes block 2 the best single block and single 1 the cheapest set with
    # 80% of the all-block gain, the answer reports block 2 on the test set and choose_set picks single 1.
    assert names == ["single 0", "single 1", "single 2", "first 2", "last 2", "all"]
    hand = validation.set_index("posterior")
    hand["val_delta"] = 0.0
    hand.loc[["single 0", "single 1", "single 2", "all"], "val_delta"] = [0.001, 0.017, 0.019, 0.02]
    hand = hand.reset_index()
    gain = att.table.copy()
    gain.loc[gain.posterior == "single 1", ["delta", "lower", "upper", "ts_delta", "ts_lower", "ts_upper"]] = [
        0.018, 0.01, 0.026, 0.004, -0.001, 0.009]
    r2 = gain.set_index("posterior").loc["single 2"]
    chosen = ans(table=gain, val=hand)
    assert chosen.best_block == 2 and (chosen.best.estimate, chosen.best.lower, chosen.best.upper) == (
        r2.delta, r2.lower, r2.upper)
    assert choose_set(hand, pareto) == "single 1"  # lib.baselines.study prices and reports this choice
    assert choose_set(hand.assign(val_delta=-0.01), pareto) is None


def test_subset_bootstrap_rows_resample_test_and_validation_images_shared_by_the_seeds(tiny_cfg):
    """Row r of subset_ece.pt, rebuilt from the stage's generator streams: κ_S re-tuned on the
    validation images repeated by their counts (the grid argmin of their mean NLL), the predictive
    at that κ with the K posterior samples as they are, then the test images repeated by their
    counts (from TEST_SEED: the same for every training seed), ECE by lib.calibration.ece."""
    cpu = torch.device("cpu")
    study = Study(tiny_cfg, cpu)
    st = study.seed(0)
    bank, val = st.test_bank(), st.validation_bank()
    kappa = torch.load(st.subsets.file("subset_scales.pt"), weights_only=True)
    boot = torch.load(st.subsets.file("subset_scales_boot.pt"), weights_only=True)
    e = st.subset_ece()
    R, (n, K) = tiny_cfg.stats.n_boot_shapley, bank.delta.shape[1:3]
    assert boot.shape == (R + 1, 8) and torch.equal(boot[0], kappa)
    images = bootstrap_counts(n, R, torch.Generator().manual_seed(TEST_SEED), torch.float32, cpu)
    counts = bootstrap_counts(len(val.labels), R, torch.Generator().manual_seed(VALIDATION_SEED), torch.float64, cpu)
    pc = tiny_cfg.predictive
    grid = scale_grid(pc.scale_range[0], pc.scale_range[1], pc.scale_points)
    moved = 0
    for s in (0, 3, 5, 7):
        for r in (0, 7, R - 1):
            vidx = torch.repeat_interleave(torch.arange(len(val.labels)), counts[r].long())
            nll = [float(torch.nn.functional.nll_loss(subset_probs(val, s, scale=float(k))[vidx].clamp_min(1e-12).log(),
                                                      val.labels[vidx])) for k in grid]
            k_r = grid[int(torch.tensor(nll).argmin())]
            assert abs(float(boot[r + 1, s]) - float(k_r)) < 1e-12 * float(k_r)
            moved += int(k_r != kappa[s])
            probs = subset_probs(bank, s, scale=float(k_r))
            idx = torch.repeat_interleave(torch.arange(n), images[r].long())
            ref = ece(probs[idx], bank.labels[idx], tiny_cfg.stats.n_bins)
            assert abs(float(e[r + 1, s]) - float(ref)) < 1e-5
    assert e[1:, 7].std() > 0 and not torch.allclose(e[1:, 0], e[1:, 7])
    assert (boot[1:] != kappa).any()  # the validation resamples do move κ_S for some subset
    # seed 1 is scored on the same test images, resampled alike: with κ_S fixed at row 0's, its rows
    # are the ECEs of its own predictive on the same repeated images
    other = study.seed(1)
    e1, boot1 = other.subset_ece(), torch.load(other.subsets.file("subset_scales_boot.pt"), weights_only=True)
    for r in (0, 7, R - 1):
        idx = torch.repeat_interleave(torch.arange(n), images[r].long())
        probs = subset_probs(other.test_bank(), 7, scale=float(boot1[r + 1, 7]))
        assert abs(float(e1[r + 1, 7]) - float(ece(probs[idx], bank.labels[idx], tiny_cfg.stats.n_bins))) < 1e-5


def _counted(monkeypatch, module, name: str, fail_at: int | None = None, source=None) -> list:
    """Replace ``module.name`` (a function of ``source``, default :mod:`lib.laplace.predictive`) by a
    wrapper that records each call in the returned list and raises KeyboardInterrupt at call number
    ``fail_at`` (an interrupted stage)."""
    from lib.laplace import predictive

    real = getattr(predictive if source is None else source, name)
    calls: list = []

    def wrapper(*args, **kwargs):
        calls.append(1)
        if len(calls) == fail_at:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(module, name, wrapper)
    return calls


@pytest.mark.parametrize(("resume_part_images", "parts", "resumed"), [(20, 3, 1), (32, 2, 0)])
def test_bank_resumes_from_its_saved_parts_and_equals_one_pass(tiny_cfg, monkeypatch, resume_part_images, parts, resumed):
    """An interrupted bank keeps its finished parts; the resumed stage computes only the missing
    ones and joins them into exactly the bank of a single pass over the test set. Parts are named
    by their image range, so after a change of part size no part of the old size is joined."""
    import lib.stages.banks as banks

    cpu = torch.device("cpu")
    d = tiny_cfg.to_dict()
    d["predictive"]["batch_size"] = 8
    cfg = Config.from_dict(d)
    run = map_run(cfg, 0, cpu)
    lap, post = fit_laplace(cfg, run, cpu)
    one_pass = perturbation_bank(run.model, post, batches(run.splits.test, 8, preprocess=run.preprocess, device=cpu),
                                 n_samples=cfg.predictive.n_samples, seed=0, device=cpu)
    monkeypatch.setattr(banks, "BANK_PART_IMAGES", 20)  # parts of 24 images: 64 test images -> 3 parts
    _counted(monkeypatch, banks, "perturbation_banks", fail_at=2)
    with pytest.raises(KeyboardInterrupt):
        banks.build_bank(cfg, run, post, lap, cpu)
    monkeypatch.setattr(banks, "BANK_PART_IMAGES", resume_part_images)  # 32: parts 0-32, 32-64, none is 0-24
    calls = _counted(monkeypatch, banks, "perturbation_banks")
    st, bank = banks.build_bank(cfg, run, post, lap, cpu)
    assert len(calls) == parts - resumed == 2
    assert torch.allclose(bank.delta, one_pass.delta, atol=1e-6, rtol=1e-5)
    # f_MAP is the MAP stage's logits (ECE_det is one number everywhere); the bank's own forward pass
    # (no fused attention, other batches) agrees with it up to rounding
    assert torch.equal(bank.map_logits, torch.load(run.stage.file("test_logits.pt"), weights_only=True))
    assert torch.allclose(bank.map_logits, one_pass.map_logits, atol=1e-5)
    assert torch.equal(bank.labels, one_pass.labels) and bank.blocks == one_pass.blocks
    info = json.loads(st.file("info.json").read_text())
    assert (info["parts"], info["parts_resumed"]) == (parts, resumed) and not (st.path / "parts").exists() and st.done
    setup = setup_table(cfg, run).set_index("Setting").Value
    assert setup["Statistics"] == ("ECE with M = 10 equal-width bins; 60 bootstrap replicates (20 per seed for Shapley "
                                  "values); α = 0.05; equivalence margin ±0.5 pp (two one-sided tests)")
    assert setup["Predictive"].startswith("linearised, Monte Carlo (softmax averaged), K = 4 posterior samples")
    assert "K-FAC-" in setup["Laplace"]


def test_deterministic_table_and_the_studys_reference_are_one_ece_det(tiny_cfg):
    """Table 2.2 (:func:`lib.report.deterministic_table`) and the deterministic row behind every ΔECE
    (the study's ``none`` posterior) are computed from the same MAP logits: equal to the last digit."""
    from lib.report import deterministic_table

    cpu = torch.device("cpu")
    study = Study(tiny_cfg, cpu).seed(0)
    det = deterministic_table([study.run], tiny_cfg.stats.n_bins).iloc[0]
    ref = study.metrics().set_index("posterior").loc["none"]
    for key in ("accuracy", "ece", "signed_ece", "nll", "brier"):
        assert det[key] == pytest.approx(ref[key], rel=1e-12, abs=1e-12), key


def test_subsets_stage_keyed_by_the_stats_it_uses(tiny_cfg):
    """Interval levels and bootstrap sizes applied by the chapters reuse the cached subset predictions;
    the number of ECE bins, which the stage uses, does not."""
    cpu = torch.device("cpu")
    base = Study(tiny_cfg, cpu).seed(0)
    d = tiny_cfg.to_dict()
    d["stats"].update(alpha=0.1, n_boot=30, n_boot_mc=50, top_k=2)
    assert Study(Config.from_dict(d), cpu).seed(0).subsets.path == base.subsets.path
    d["stats"]["n_bins"] = 7
    assert Study(Config.from_dict(d), cpu).seed(0).subsets.path != base.subsets.path


def test_control_banks_are_stages_keyed_like_the_laplace_banks(tiny_cfg):
    """The isotropic control's test and validation banks are their own stages, downstream of the
    Laplace fit: unit-variance N(0, I) samples of every block in the Laplace samples' shapes, and
    recomputed whenever the Laplace stage or the bank settings change."""
    cpu = torch.device("cpu")
    d = tiny_cfg.to_dict()
    d["seeds"] = [0]
    d["predictive"]["scale_images"] = 40
    base = Study(Config.from_dict(d), cpu).seed(0)
    paths = {base.bank.path, base.val_bank.path, base.control.path, base.control_val.path}
    assert len(paths) == 4
    ctrl, val = base.control_bank(), base.control_validation_bank()
    assert ctrl.delta.shape == base.test_bank().delta.shape and val.delta.shape[1] == 40
    assert torch.equal(ctrl.map_logits, base.test_bank().map_logits) and torch.equal(val.labels, base.run.splits.val.y[:40])
    assert json.loads((base.control.path / "inputs.json").read_text())["inputs"]["posterior"] == "isotropic N(0, I)"
    d["laplace"]["prior_init"] = 7.0
    other = Study(Config.from_dict(d), cpu).seed(0)
    assert other.control.path != base.control.path and other.control_val.path != base.control_val.path


def test_covariance_scale_tuned_on_validation_bank(tiny_cfg):
    """predictive.scale='val_nll': every named and every one of the 2^L subsets predicts at the κ_S
    that minimises the NLL of its validation-bank predictive; the test set is never used."""
    d = tiny_cfg.to_dict()
    d["seeds"] = [0]
    d["predictive"].update(scale="val_nll", scale_range=[1e-3, 10.0], scale_points=9, scale_images=40)
    cfg = Config.from_dict(d)
    st = Study(cfg, torch.device("cpu")).seed(0)
    val = Bank(**torch.load(st.val_bank.file("bank.pt"), weights_only=True))
    assert val.delta.shape[1] == 40 and torch.equal(val.labels, st.run.splits.val.y[:40])
    grid = scale_grid(1e-3, 10.0, 9)
    named = st.named()
    kappa, _ = tune_scales(val, named["masks"], grid)
    assert torch.equal(named["scales"], kappa)
    bank = Bank(**torch.load(st.bank.file("bank.pt"), weights_only=True))
    i = named["names"].index("all")
    assert torch.allclose(named["probs"][i], subset_probs(bank, named["masks"][i], scale=float(kappa[i])), atol=1e-6)
    metrics = st.metrics().set_index("posterior")
    assert abs(metrics.loc["all", "scale"] - float(kappa[i])) < 1e-12
    bits = ((torch.arange(8)[:, None] >> torch.arange(3)) & 1).bool()
    all_k, _ = tune_scales(val, bits, grid)
    e = st.subset_ece()
    full = subset_probs(bank, 7, scale=float(all_k[7]))
    assert abs(float(e[0, 7]) - float(ece(full, bank.labels, cfg.stats.n_bins))) < 1e-5
    scales = pd.read_csv(st.subsets.file("scales.csv")).set_index("posterior")
    assert scales.loc["all", "val_nll"] <= scales.loc["all", "val_nll_unscaled"] + 1e-9
    unscaled = subset_probs(bank, named["masks"][i])
    assert abs(scales.loc["all", "ece_unscaled"] - float(ece(unscaled, bank.labels, cfg.stats.n_bins))) < 1e-5
    table = scale_table([st.metrics()], [st.scales()]).set_index("posterior")
    assert list(table.index) == ["deterministic (MAP)", "all", "single 0", "single 1", "single 2"]
    assert abs(table.loc["all", "κ median"] - float(kappa[i])) < 1e-12
    assert abs(table.loc["all", "ECE % κ_S"] - 100 * metrics.loc["all", "ece"]) < 1e-9
    assert abs(table.loc["all", "ECE % κ=1"] - 100 * scales.loc["all", "ece_unscaled"]) < 1e-9
    found = scale_findings(table.reset_index(), cfg.predictive.scale_range)
    assert found.kappa_all == float(kappa[i]) and found.posteriors == 4
    shown = display_scale_table(table.reset_index())
    assert shown.iloc[0]["tuned κ [range]"] == "–" and len(shown) == 5


def test_retune_with_shared_prior_is_refused(tiny_cfg):
    d = tiny_cfg.to_dict()
    d["laplace"].update(restricted_prior="retune", prior_per_block=False)
    with pytest.raises(ValueError, match="restricted_prior"):
        Study(Config.from_dict(d), torch.device("cpu")).seed(0)


def test_block_subsets_cover_the_priced_choices():
    s = block_subsets(4)
    assert s["all"] == [0, 1, 2, 3] and s["last 2"] == [2, 3] and s["first 3"] == [0, 1, 2]
    assert len(s) == 4 + 2 + 2 + 1


def test_bad_params_one_line():
    with pytest.raises(ParamsError) as err:
        Config.from_dict({"laplace": {"kfacc": "reduce"}}, source="params/x.yml")
    assert "\n" not in str(err.value) and "laplace.kfac" in str(err.value)


def test_estimator_agreement_hand_worked():
    """Kendall τ-b, leading block and sign agreement of each alternative estimator against the first."""
    table = pd.DataFrame({"posterior": ["all", "single 0", "single 1", "single 2"], "kind": ["all", "single", "single", "single"],
                          "block": [-1, 0, 1, 2],
                          ESTIMATORS[0]: [0.5, 0.1, 0.3, -0.2], ESTIMATORS[1]: [0.5, 0.1, 0.3, -0.1],
                          ESTIMATORS[2]: [0.5, 0.3, 0.1, 0.2], ESTIMATORS[3]: [0.5, -0.3, -0.1, -0.2]})
    a = estimator_agreement(table).set_index("estimator")
    assert a.loc[ESTIMATORS[1], "kendall_tau"] == pytest.approx(1.0)
    assert a.loc[ESTIMATORS[2], "kendall_tau"] == pytest.approx(-1 / 3)  # only the pair (0, 2) is concordant
    assert a.loc[ESTIMATORS[3], "kendall_tau"] == pytest.approx(1 / 3)
    assert list(a.top_block) == [1, 0, 1] and (a.top_block_study == 1).all()
    assert list(a.same_sign) == [3, 2, 1] and (a.blocks == 3).all()
    assert list(a.discordant) == [0, 2, 1] and (a.pairs == 3).all() and a.all_same_sign.all()
    assert not estimators_coincide(table) and estimators_coincide(table.assign(**{ESTIMATORS[1]: table[ESTIMATORS[0]]}))


def test_subsets_stage_resumes_from_its_parts_and_equals_one_pass(tiny_cfg, monkeypatch):
    """An interrupted subsets stage keeps its finished parts (κ_S and bootstrap ECEs of a block of
    subsets); the resumed stage computes only the missing ones and equals a run in one part."""
    import lib.stages.subsets as subsets

    cpu = torch.device("cpu")
    d = tiny_cfg.to_dict()
    d["seeds"] = [0]
    d["predictive"].update(scale="val_nll", scale_range=[1e-3, 10.0], scale_points=5, scale_images=24)
    cfg = Config.from_dict(d)
    whole = Study(cfg, cpu).seed(0)
    ece_whole, scales_whole = whole.subset_ece(), torch.load(whole.subsets.file("subset_scales.pt"), weights_only=True)
    shutil.rmtree(whole.subsets.path)
    monkeypatch.setattr(subsets, "SUBSET_PART", 3)  # 8 subsets -> parts 0-3, 3-6, 6-8
    real = subsets._scales
    calls = _counted(monkeypatch, subsets, "_scales", fail_at=2, source=subsets)
    with pytest.raises(KeyboardInterrupt):
        Study(cfg, cpu).seed(0)
    monkeypatch.setattr(subsets, "_scales", real)
    calls = _counted(monkeypatch, subsets, "_scales", source=subsets)
    resumed = Study(cfg, cpu).seed(0)
    assert len(calls) == 2  # part 0-3 was kept: κ_S and the ECEs of the two other parts only
    assert resumed.subsets.path == whole.subsets.path and resumed.subsets.done
    assert not (resumed.subsets.path / "parts").exists()
    assert torch.equal(torch.load(resumed.subsets.file("subset_scales.pt"), weights_only=True), scales_whole)
    assert torch.allclose(resumed.subset_ece(), ece_whole, atol=1e-6, rtol=0)


def test_stage_keys_depend_on_the_device(tiny_cfg):
    """Results computed under CUDA autocast are never reused on a CPU: the device type and the
    autocast precision are inputs of every stage."""
    from lib.artifacts import stage_key
    from lib.pipeline import numerics

    cpu = numerics(torch.device("cpu"))
    cuda = numerics(torch.device("cuda"))
    assert cpu == {"device": "cpu", "autocast": None} and cuda == {"device": "cuda", "autocast": "bfloat16"}
    assert stage_key("map", {"x": 1, "numerics": cpu}) != stage_key("map", {"x": 1, "numerics": cuda})
    st = Study(tiny_cfg, torch.device("cpu")).seed(0)
    for s in (st.run.stage, st.laplace, st.bank, st.subsets):
        assert json.loads((s.path / "inputs.json").read_text())["inputs"]["numerics"] == cpu, s.path


@pytest.mark.parametrize("n_samples,mode", [(4, "forward"), (8, "reverse")])
def test_gpu_numerics_run_end_to_end_under_cpu_autocast(tiny_cfg, monkeypatch, n_samples, mode):
    """Every stage with the GPU's numerics (bf16 autocast for training, curvature, banks and
    latency), simulated with CPU autocast: the whole study, the attribution and the latency table
    run, record bf16, and give finite, well-formed results; a dtype slip in a CUDA-only branch
    would otherwise surface only on the lent GPU. With ``'auto'`` narrowed to ``C ≤ K``, K = 4 < C = 5
    builds the banks in forward mode, K = 8 in reverse mode."""
    import sys

    import lib.laplace.predictive
    import lib.train
    from lib.deploy import latency_table

    original = lib.train.amp_dtype
    for module in list(sys.modules.values()):
        if getattr(module, "amp_dtype", None) is original:
            monkeypatch.setattr(module, "amp_dtype", lambda device: torch.bfloat16)
    monkeypatch.setattr(lib.laplace.predictive, "REVERSE_CLASSES_PER_SAMPLE", 1)
    cfg = dataclasses.replace(tiny_cfg, predictive=dataclasses.replace(tiny_cfg.predictive, n_samples=n_samples))
    cpu = torch.device("cpu")
    studies = Study(cfg, cpu).seeds
    for stage in (studies[0].run.stage, studies[0].laplace, studies[0].bank, studies[0].subsets):
        record = json.loads((stage.path / "inputs.json").read_text())
        assert record["inputs"]["numerics"] == {"device": "cpu", "autocast": "bfloat16"}, stage.path
    m = studies[0].metrics().set_index("posterior")
    assert m[["ece", "nll", "brier", "accuracy"]].notna().all().all() and m.ece.between(0, 1).all()
    d = studies[0].named()
    assert torch.isfinite(studies[0].test_bank().delta).all()
    assert torch.allclose(d["probs"].sum(-1), torch.ones_like(d["probs"].sum(-1)), atol=1e-5)
    att = attribution(studies, cfg.stats, cfg.predictive, cpu)
    assert att.table[["delta", "lower", "upper"]].notna().all().all()
    s = studies[0]
    x, _ = next(iter(batches(s.run.splits.test, 4, preprocess=s.run.preprocess, device=cpu)))
    lat = latency_table(s.run.model, s.posterior, x, {"all": [0, 1, 2]}, n_samples=n_samples, seed=s.seed,
                        device=cpu, n_warmup=0, n_iters=1)
    assert lat.set_index("posterior").loc["all", "mode"] == mode


def test_dense_block_structure_runs_the_study(tiny_cfg):
    """laplace.structure: dense_block fits the exact block GGNs, tunes a prior per block and feeds
    the bank and subsets stages; its stage key differs from the K-FAC one."""
    d = tiny_cfg.to_dict()
    d["seeds"] = [0]
    d["laplace"]["structure"] = "dense_block"
    cfg = Config.from_dict(d)
    cpu = torch.device("cpu")
    study = Study(cfg, cpu).seed(0)
    kron_stage, _ = fit_laplace(tiny_cfg, map_run(tiny_cfg, 0, cpu), cpu)
    assert study.posterior.kind == "dense_block" and study.laplace.path != kron_stage.path
    p = 16 * 4 * 16  # r · 16 · width per block
    assert all(e["U"].shape == (p, p) for e in study.posterior.eig.values())
    assert len(study.named()["names"]) > 1 and torch.isfinite(study.test_bank().delta).all()


def test_curvature_quality_stage_cached_and_keyed(tiny_cfg):
    """The quality table has a row per block, module and approximation, is reused from its stage,
    and a different laplace.quality_images gives another stage; 0 is refused."""
    cpu = torch.device("cpu")
    run = map_run(tiny_cfg, 0, cpu)
    st, table = curvature_quality(tiny_cfg, run, cpu)
    assert len(table) == 3 * 5 * 3 and set(table.module) == {"qkv", "proj", "fc1", "fc2", "block"}
    assert (table.seed == 0).all() and (table.trace_ratio > 0).all() and (table.kl >= 0).all()
    again, cached = curvature_quality(tiny_cfg, run, cpu)
    assert again.path == st.path
    pd.testing.assert_frame_equal(cached, table)
    d = tiny_cfg.to_dict()
    d["laplace"]["quality_images"] = tiny_cfg.laplace.quality_images // 2
    other, _ = curvature_quality(Config.from_dict(d), run, cpu)
    assert other.path != st.path
    d["laplace"]["quality_images"] = 0
    with pytest.raises(ValueError, match="quality_images"):
        curvature_quality(Config.from_dict(d), run, cpu)


def test_open_study_validates_the_params_and_resolves_the_device():
    """The chapter preamble: the injected params become a validated Config on the resolved device;
    a bad key names the params file; nothing is computed until a stage is asked for."""
    from lib.config import load_params
    from lib.paths import PARAMS
    from lib.study import open_chapter, open_study

    d = load_params(PARAMS / "smoke.yml")
    d["device"] = "cpu"
    study = open_study("smoke", d)
    assert study.cfg == Config.from_dict(d) and study.device == torch.device("cpu")
    opened, cfg, device = open_chapter("smoke", d)
    assert isinstance(opened, Study) and cfg == opened.cfg == study.cfg and device == opened.device == torch.device("cpu")
    assert not opened._runs and not opened._fits and not opened._seeds  # nothing opened yet
    d["stats"]["n_binz"] = 3
    with pytest.raises(ParamsError, match="params/smoke.yml: unknown key 'stats.n_binz'"):
        open_study("smoke", d)
    with pytest.raises(ValueError, match="cfg must be a lib.config.Config"):
        Study(d, "cpu")


def test_evaluated_subsets_are_all_or_the_visited_ones_and_the_named(tiny_cfg):
    """Exact Shapley values evaluate all 2^L subsets; sampled orderings evaluate only the subsets
    they visit and the named posteriors, every one once, by bitmask."""
    assert torch.equal(evaluated_subsets(tiny_cfg, 12), torch.arange(2**12))
    cfg = dataclasses.replace(tiny_cfg, stats=dataclasses.replace(tiny_cfg.stats, shapley_permutations=24))
    got = evaluated_subsets(cfg, 12)
    named = (torch.stack(list(standard_subsets(12).values())).long() << torch.arange(12)).sum(1)
    want = set(coalitions(antithetic_permutations(12, 24)).tolist()) | set(named.tolist())
    assert got.tolist() == sorted(want) and len(got) < 2**12 // 8
