"""lib.baselines.study: which Laplace posteriors the baselines, shift and deployment chapters report
(validation choices over the priced block choices), on hand-made tables."""

from __future__ import annotations

from types import SimpleNamespace

import pandas as pd
import pytest

from lib.baselines.study import chosen_posteriors


def _study(val_delta: dict[str, float]) -> SimpleNamespace:
    names = list(val_delta)
    kinds = ["all" if n == "all" else n.split()[0] for n in names]
    blocks = [int(n.split()[1]) if n.startswith("single") else -1 for n in names]
    validation = pd.DataFrame({"posterior": names, "kind": kinds, "block": blocks, "val_delta": list(val_delta.values())})
    return SimpleNamespace(attribution=SimpleNamespace(table=pd.DataFrame({"posterior": names})), validation=validation)


def _latency(costs: dict[str, float]) -> pd.DataFrame:
    return pd.DataFrame({"posterior": ["deterministic", *costs], "extra_ms": [0.0, *costs.values()]})


def test_all_blocks_the_chosen_set_and_the_chosen_block():
    study = _study({"all": 0.010, "single 0": 0.002, "single 1": 0.009, "last 2": 0.0085})
    lat = _latency({"single 0": 1.0, "single 1": 2.0, "last 2": 1.5, "all": 4.0})
    # the cheapest with ≥ 80% of the all-block validation gain is last 2 (1.5 ms), the best block is 1
    assert chosen_posteriors(study, lat) == {"all blocks": "all",
                                             "validation-chosen set (last 2 blocks)": "last 2",
                                             "validation-chosen block (block 1 only)": "single 1"}


def test_one_row_when_the_chosen_set_is_the_chosen_block_and_none_without_a_gain():
    study = _study({"all": 0.010, "single 0": 0.002, "single 1": 0.009, "last 2": 0.0085})
    lat = _latency({"single 0": 1.0, "single 1": 1.2, "last 2": 1.5, "all": 4.0})
    assert chosen_posteriors(study, lat) == {"all blocks": "all",
                                             "validation-chosen set and block (block 1 only)": "single 1"}
    gainless = _study({"all": -0.001, "single 0": 0.002, "single 1": -0.009, "last 2": 0.0})
    assert chosen_posteriors(gainless, lat) == {"all blocks": "all", "validation-chosen block (block 0 only)": "single 0"}


def test_baseline_study_of_the_tiny_study(tmp_path, monkeypatch, one_thread):
    """On the tiny two-seed study: the Laplace rows are the study's named posteriors (test ECE the
    seeds' mean of their own ECE, validation probabilities from the validation bank at κ_S, priced by
    the latency stage), every baseline row has its '+ TS' row, and the importance τ-b is that of the
    seed-mean scores against the attribution's single-block ΔECE."""
    import torch

    from conftest import tiny_study_params
    from test_baselines_run import BASELINES

    from lib.baselines.importance import kendall_tau_interval
    from lib.baselines.study import LAPLACE, MAP, TS, UNPRUNED, baseline_study, importance_study, priced_latency
    from lib.calibration import ece
    from lib.config import Config
    from lib.laplace.predictive import subset_probs
    from lib.study import Study

    monkeypatch.setenv("LLA_ARTIFACTS", str(tmp_path))
    d = tiny_study_params([0, 1])
    d["baselines"] = {**BASELINES, "ensemble": {"sizes": [2]}}
    study = Study(Config.from_dict(d), "cpu")
    latency = priced_latency(study)
    assert priced_latency(study).equals(latency)  # one measurement, read back
    res = baseline_study(study, {"all blocks": "all", "block 1": "single 1"}, latency)
    t = res.table.set_index("method")
    n_bins = study.cfg.stats.n_bins
    for label, name in (("all blocks", "all"), ("block 1", "single 1")):
        row = t.loc[LAPLACE + label]
        eces = []
        for s in study.seeds:
            named = s.named()
            eces.append(float(ece(named["probs"][list(named["names"]).index(name)].double(), named["labels"], n_bins)))
        assert row.ece == pytest.approx(sum(eces) / 2, abs=1e-9)
        assert row.ms_per_image == pytest.approx(float(latency.set_index("posterior").loc[name, "ms_per_image"]))
    val_eces = []
    for seed in study.seeds:
        named = seed.named()
        k = list(named["names"]).index("all")
        val = subset_probs(seed.validation_bank(), named["masks"][k], method=study.cfg.predictive.method,
                           scale=float(named["scales"][k]))
        val_eces.append(float(ece(val.double(), seed.run.splits.val.y, n_bins)))
    assert t.loc[LAPLACE + "all blocks", "val_ece"] == pytest.approx(sum(val_eces) / 2, abs=1e-6)
    assert {MAP, TS} <= set(t.index) and t.loc[TS, "tuning"] == "temperature"
    trained = [m for m in t.index if m not in (MAP, TS) and not m.startswith(LAPLACE) and not m.endswith(" + TS")]
    assert trained and all(f"{m} + TS" in t.index for m in trained)
    pruned = bool((res.ranks.ranks_before > res.ranks.ranks_after).any())
    assert ("variational LoRA" in t.index) == pruned and (UNPRUNED in t.index) == (not pruned)
    assert list(res.ensemble.member_seeds) == ["0 1", "1 0"]

    imp = importance_study(study)
    att = study.attribution
    score = torch.tensor(imp.blocks["Fisher trace"].to_numpy())
    tau = kendall_tau_interval(score, torch.tensor(att.singles().delta.to_numpy()), att.single_samples(),
                               study.cfg.stats.alpha)
    row = imp.tau.set_index("score").loc["Fisher trace"]
    assert (row.kendall_tau, row.lower, row.upper) == pytest.approx(tau)
