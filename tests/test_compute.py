"""lib.compute: the study's stages on several processes (torchrun, gloo on the CPU) equal the
single-process study's, the baselines and shift stages included; bank parts are dealt over ranks
and joined; a failed rank is named."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch

from conftest import tiny_study_params
from test_baselines_run import BASELINES

from lib.baselines.study import baseline_study, chosen_posteriors, importance_study, priced_latency
from lib.config import Config, load_params
from lib.compute import ComputeError, Ranks, _baseline_tasks, _part_tasks
from lib.data import batches
from lib.laplace.predictive import perturbation_bank
from lib.paths import PARAMS, ROOT
from lib.shift_study import study_shift
from lib.study import Study

CPU = torch.device("cpu")
ATOL = 1e-6
"""The chunk-size tests' tolerance (tests/test_study.py: a resumed subsets stage vs one pass)."""
SHIFT = {"corruptions": ["contrast"], "severities": [5], "max_images": 24, "seed": 3, "far_ood_sets": ["synthetic"],
         "far_ood_images": 12}
"""The smallest shift section of tests/test_shift_study.py: one corrupted set and one far-OOD set."""


@pytest.fixture
def tiny_cfg(tmp_path, monkeypatch, one_thread) -> Config:
    monkeypatch.setenv("LLA_ARTIFACTS", str(tmp_path / "single"))
    return Config.from_dict(tiny_study_params([0, 1]))


@pytest.fixture
def tiny_full_cfg(tiny_cfg) -> Config:
    """The tiny study with the baselines of tests/test_baselines_run.py (ensembles of 2) and :data:`SHIFT`."""
    d = tiny_cfg.to_dict()
    d["baselines"], d["shift"] = {**BASELINES, "ensemble": {"sizes": [2]}}, SHIFT
    return Config.from_dict(d)


def test_ranks_deal_items_in_turn_and_a_failure_names_the_rank_and_stage():
    ranks = [Ranks(r, 3, CPU, group=False) for r in range(3)]
    assert [rk.mine(list(range(7))) for rk in ranks] == [[0, 3, 6], [1, 4], [2, 5]]
    one = Ranks(0, 1, CPU, group=False)
    one.sync("map+laplace", None)  # nobody failed: nothing raised
    err = KeyError("x")
    with pytest.raises(ComputeError, match=r"rank 0 failed in stage 'map seed 3' \(KeyError: 'x'\) \[phase map\+laplace\]") as info:
        one.sync("map+laplace", ("map seed 3", err))
    assert info.value.__cause__ is err


def test_baselines_are_dealt_by_seed():
    """Seed i's baseline stages (every method and the importance scores) are rank i mod W's."""
    d = tiny_study_params([0, 1, 2])
    d["baselines"] = {**BASELINES, "ensemble": {"sizes": [2]}}
    study = Study(Config.from_dict(d), CPU)
    shares = [[t.label for t in _baseline_tasks(study, Ranks(r, 2, CPU, group=False))] for r in (0, 1)]
    per_seed = ["last-layer Laplace", "LoRA ensemble", "MC dropout", "variational LoRA", "continued MAP",
                "importance scores"]
    assert shares == [[f"{m} seed {s}" for s in (0, 2) for m in per_seed], [f"{m} seed 1" for m in per_seed]]


def test_bank_parts_dealt_over_two_ranks_join_into_the_single_pass_bank(tiny_cfg, monkeypatch):
    """Each rank's share of the bank parts is disjoint from the other's and together they cover
    every part (the last rank also has the curvature quality); after rank 0's share alone the bank is not done, and joining computes only the
    missing parts into exactly the bank of one pass over the test set."""
    import lib.stages.banks as banks

    d = tiny_cfg.to_dict()
    d["seeds"], d["predictive"]["batch_size"] = [0], 8
    cfg = Config.from_dict(d)
    monkeypatch.setattr(banks, "BANK_PART_IMAGES", 20)  # parts of 24 images: test 64 -> 3 parts, val 48 -> 2
    study = Study(cfg, CPU)
    shares = [_part_tasks(study, Ranks(r, 2, CPU, group=False)) for r in (0, 1)]
    labels = [{t.label for t in share} for share in shares]
    assert not labels[0] & labels[1] and len(labels[0] | labels[1]) == (3 + 2) + 1
    assert [t.label for t in shares[1]][0] == "curvature_quality seed 0"  # the last rank's, first
    assert "bank+bank_iso seed 0 images 0-24" in labels[0] and "bank+bank_iso seed 0 images 24-48" in labels[1]
    for task in shares[0]:
        task.run()
    run, (lap, post) = study.run(0), study.fit(0)
    plan = banks.open_bank(cfg, run, post, lap, CPU)
    control = banks.open_bank(cfg, run, post, lap, CPU, control=True)
    for p in (plan, control):  # one pass saved both banks' parts 0-24 and 48-64
        assert not p.stage.done and len(list((p.stage.path / "parts").glob("*.pt"))) == 2
    calls = []
    real = banks.perturbation_banks
    monkeypatch.setattr(banks, "perturbation_banks", lambda *a, **k: calls.append(len(a[1])) or real(*a, **k))
    st, bank = banks.build_bank(cfg, run, post, lap, CPU)
    assert calls == [2] and st.path == plan.stage.path and st.done  # part 24-48 of both banks in one pass
    assert json.loads(st.file("info.json").read_text())["parts_resumed"] == 2
    iso_st, _ = banks.build_bank(cfg, run, post, lap, CPU, control=True)
    assert calls == [2] and json.loads(iso_st.file("info.json").read_text())["parts_resumed"] == 3
    one_pass = perturbation_bank(run.model, post, batches(run.splits.test, 8, preprocess=run.preprocess, device=CPU),
                                 n_samples=cfg.predictive.n_samples, seed=0, device=CPU)
    assert torch.allclose(bank.delta, one_pass.delta, atol=1e-6, rtol=1e-5) and torch.equal(bank.labels, one_pass.labels)


def _same(a, b, where: str) -> None:
    """Saved values equal: floating tensors within :data:`ATOL`, everything else exactly."""
    if torch.is_tensor(a):
        assert a.dtype == b.dtype and a.shape == b.shape, where
        if a.is_floating_point():
            assert torch.allclose(a, b, atol=ATOL, rtol=0, equal_nan=True), where
        else:
            assert torch.equal(a, b), where
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for k in a:
            _same(a[k], b[k], f"{where}[{k!r}]")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            _same(x, y, f"{where}[{i}]")
    elif isinstance(a, float) and isinstance(b, float):
        assert math.isclose(a, b, rel_tol=0, abs_tol=ATOL) or (a != a and b != b), where
    else:
        assert a == b or (a != a and b != b), where


def _timed(key) -> bool:
    """Entries that record wall time, which differ from run to run: the training times and
    throughputs, and the measured latencies (of the ``latency`` stage and the baselines' costs)."""
    return isinstance(key, str) and (key in ("seconds", "images_per_s", "extra_ms", "peak_mib")
                                     or key.endswith(("_seconds", "ms_per_image")) or key.startswith("ms_"))


def _strip_times(x):
    if isinstance(x, dict):
        return {k: _strip_times(v) for k, v in x.items() if not _timed(k)}
    if isinstance(x, list):
        return [_strip_times(v) for v in x]
    return x


def _assert_same_stages(single: Path, ranked: Path) -> None:
    """The two caches hold the same stages (names and keys) with the same files and values."""
    names = sorted(p.name for p in single.iterdir())
    assert names == sorted(p.name for p in ranked.iterdir())
    assert {n.split("-")[0] for n in names} == {
        "map", "laplace", "curvature_quality", "bank", "bank_val", "bank_iso", "bank_iso_val", "subsets", "attribution",
        "latency", "baseline_last_layer", "baseline_ensemble", "baseline_mc_dropout", "baseline_variational",
        "baseline_continued_map", "baseline_importance", "corrupt", "ood_images", "shift_probs"}
    for name in names:
        a, b = single / name, ranked / name
        files = sorted(p.relative_to(a) for p in a.rglob("*") if p.is_file())
        assert files == sorted(p.relative_to(b) for p in b.rglob("*") if p.is_file()), name
        assert (a / "DONE").is_file()
        for f in files:
            if f.suffix == ".pt":
                _same(_strip_times(torch.load(a / f, weights_only=True)),
                      _strip_times(torch.load(b / f, weights_only=True)), f"{name}/{f}")
            elif f.suffix == ".csv":
                x, y = pd.read_csv(a / f), pd.read_csv(b / f)
                assert list(x.columns) == list(y.columns), f"{name}/{f}"
                for col in x.columns:
                    if _timed(col):
                        continue
                    if x[col].dtype.kind in "biuf":
                        assert torch.allclose(torch.tensor(x[col].to_numpy(dtype=float)),
                                              torch.tensor(y[col].to_numpy(dtype=float)), atol=ATOL, rtol=0,
                                              equal_nan=True), f"{name}/{f}:{col}"
                    else:
                        assert x[col].equals(y[col]), f"{name}/{f}:{col}"
            elif f.suffix == ".json" and f.name != "info.json":  # a bank's info.json counts the parts it resumed
                _same(_strip_times(json.loads((a / f).read_text())), _strip_times(json.loads((b / f).read_text())),
                      f"{name}/{f}")


def _overrides(params: dict, base: dict, prefix: str = "") -> list[str]:
    """``KEY=VALUE`` for every value of ``params`` that differs from ``base`` (dotted keys, JSON values)."""
    out = []
    for key, value in params.items():
        if isinstance(value, dict) and isinstance(base.get(key), dict):
            out += _overrides(value, base[key], f"{prefix}{key}.")
        elif value != base.get(key):
            out.append(f"{prefix}{key}={json.dumps(value)}")
    return out


def _torchrun(root: Path, params: dict) -> subprocess.CompletedProcess:
    """``torchrun --standalone --nproc-per-node=2 -m lib.compute compute`` on the smoke profile with
    the values of ``params`` that differ from it set by ``--set`` (a free port: ``--standalone``)."""
    sets = [f"--set={kv}" for kv in _overrides(params, load_params(PARAMS / "smoke.yml"))]
    env = {**os.environ, "LLA_ARTIFACTS": str(root), "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
           "-m", "lib.compute", "compute", "--profile", "smoke", *sets]
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)


def _seed_stage(root: Path, name: str, seed: int) -> Path:
    """The stage directory ``name`` of training seed ``seed`` (its inputs name the seed)."""
    found = [p for p in root.glob(f"{name}-*") if json.loads((p / "inputs.json").read_text())["inputs"]["seed"] == seed]
    assert len(found) == 1, found
    return found[0]


def test_two_rank_compute_fails_naming_the_rank_then_resumes_to_the_single_process_stages(tiny_full_cfg, tmp_path):
    """2 gloo processes under torchrun. A stage that cannot be written on rank 1 (seed 1's MAP
    stage directory is taken by a file) makes the command fail with an error naming rank 1 and the
    stage, with nothing of seed 1 marked done; once the file is gone, a rerun resumes and fills
    the cache with exactly the stages (names, keys, files, values within the chunk-size tolerance,
    measured times left out) of the single-process study as the chapters open it: the study's
    stages, the latency, the baselines and importance scores, and the shift stages."""
    ranked = tmp_path / "ranked"
    ranked.mkdir()
    study = Study(tiny_full_cfg, CPU)
    study.seeds, study.attribution_tables, study.curvature_quality
    latency = priced_latency(study)
    baseline_study(study, chosen_posteriors(study, latency), latency), importance_study(study)
    study_shift(study, ["all"])
    single = tmp_path / "single"
    taken = ranked / _seed_stage(single, "map", 1).name
    taken.write_text("not a stage\n")
    failed = _torchrun(ranked, tiny_full_cfg.to_dict())
    assert failed.returncode != 0
    assert "rank 1 failed in stage 'map seed 1' (FileExistsError" in failed.stderr, failed.stderr[-3000:]
    assert sorted(p.name.split("-")[0] for p in ranked.iterdir() if (p / "DONE").is_file()) == \
        ["laplace", "map"]  # seed 0's: rank 0 finished its phase
    taken.unlink()
    done = _torchrun(ranked, tiny_full_cfg.to_dict())
    assert done.returncode == 0, done.stderr[-3000:]
    assert "computed profile smoke on 2 rank(s) (cpu)" in done.stderr
    _assert_same_stages(single, ranked)
