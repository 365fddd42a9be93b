"""lib.attribution: the one-seed helpers and plot preparations, on a tiny hand-made study.

The study is a stand-in with the methods the helpers call (``named``, ``test_bank``): a bank of
L = 2 blocks, N = 12 test images, K = 3 posterior samples and C = 3 classes, float64 throughout.
References are computed here by plain loops (binned ECE, softmax mixtures, the BCa formula).
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
import torch
from scipy.stats import norm

from lib.attribution import (SET_SHARE, Attribution, choose_set, choose_single, control_grid, interval_comparison,
                             prepare_ranked, prepare_reliability_panels, prepare_scatter_panels, scale_selection,
                             shapley, temperature_grid, tuned_seed, validation_table)
from lib.config import PredictiveConfig, StatsConfig
from lib.laplace.predictive import Bank
from lib.resample import bootstrap_counts
from lib.shapley import antithetic_permutations, antithetic_standard_error, coalitions, permutation_contributions, widen
from lib.stats import basic_interval

L, N, K, C = 2, 12, 3, 3
N_VAL = 10
N_VAL_ALL = 14  # the validation split; the banks cover its first N_VAL images (predictive.scale_images)
NAMES = ["none", "all", "single 1", "single 0"]  # single blocks deliberately out of block order
MASKS = {"none": [False, False], "all": [True, True], "single 1": [False, True], "single 0": [True, False]}
SCALES = {"none": 1.0, "all": 0.5, "single 1": 2.0, "single 0": 0.25}


class FakeStudy:
    """What :class:`lib.study.SeedStudy` offers the helpers: the cached named predictions and the bank."""

    def __init__(self, named: dict, bank: Bank, seed: int = 0, val_bank: Bank | None = None,
                 control: tuple[Bank, Bank] | None = None, val_logits: tuple | None = None):
        self.seed, self._named, self._bank, self._val_bank = seed, named, bank, val_bank
        self._control, self._val_logits = control, val_logits

    def named(self) -> dict:
        return self._named

    def test_bank(self) -> Bank:
        return self._bank

    def validation_bank(self) -> Bank:
        return self._val_bank

    def control_bank(self) -> Bank:
        return self._control[0]

    def control_validation_bank(self) -> Bank:
        return self._control[1]

    def validation_logits(self) -> tuple:
        return self._val_logits


def _softmax(v: list[float]) -> list[float]:
    e = [math.exp(x - max(v)) for x in v]
    return [x / sum(e) for x in e]


def _mixture(bank: Bank, name: str, weights: list[float], method: str, scale: float | None = None) -> torch.Tensor:
    """The predictive (N, C) of posterior ``name`` at its scale (or ``scale``) under sample weights, by loops."""
    f, d = bank.map_logits.tolist(), bank.delta.tolist()
    root = math.sqrt(SCALES[name] if scale is None else scale)
    out = []
    for n in range(len(f)):
        g = [[root * sum(d[i][n][k][c] for i in range(L) if MASKS[name][i]) for c in range(C)] for k in range(K)]
        if method == "mc":
            terms = [_softmax([f[n][c] + g[k][c] for c in range(C)]) for k in range(K)]
            out.append([sum(weights[k] * terms[k][c] for k in range(K)) for c in range(C)])
        else:
            var = [sum(weights[k] * g[k][c] ** 2 for k in range(K)) for c in range(C)]
            out.append(_softmax([f[n][c] / math.sqrt(1 + math.pi / 8 * var[c]) for c in range(C)]))
    return torch.tensor(out, dtype=torch.float64)


@pytest.fixture
def study() -> FakeStudy:
    gen = torch.Generator().manual_seed(7)
    bank = Bank(map_logits=2 * torch.randn(N, C, generator=gen, dtype=torch.float64),
                labels=torch.randint(0, C, (N,), generator=gen),
                delta=torch.randn(L, N, K, C, generator=gen, dtype=torch.float64), blocks=(0, 1))
    uniform = [1 / K] * K
    det = torch.softmax(bank.map_logits, -1)
    det[0] = torch.nn.functional.one_hot(bank.labels[0], C).double()  # one example in the point mass at 1
    named = {"names": NAMES, "masks": torch.tensor([MASKS[n] for n in NAMES]),
             "scales": torch.tensor([SCALES[n] for n in NAMES], dtype=torch.float64),
             "probs": torch.stack([_mixture(bank, n, uniform, "mc") for n in NAMES]), "labels": bank.labels,
             "det": det, "ts": torch.softmax(bank.map_logits / 1.7, -1), "temperature": 1.7}
    val_logits = 2 * torch.randn(N_VAL_ALL, C, generator=gen, dtype=torch.float64)
    val_labels = torch.randint(0, C, (N_VAL_ALL,), generator=gen)
    val = Bank(map_logits=val_logits[:N_VAL], labels=val_labels[:N_VAL],
               delta=torch.randn(L, N_VAL, K, C, generator=gen, dtype=torch.float64), blocks=(0, 1))
    control = (Bank(bank.map_logits, bank.labels, 0.1 * torch.randn(L, N, K, C, generator=gen, dtype=torch.float64),
                    (0, 1)),
               Bank(val.map_logits, val.labels, 0.1 * torch.randn(L, N_VAL, K, C, generator=gen, dtype=torch.float64),
                    (0, 1)))
    return FakeStudy(named, bank, val_bank=val, control=control, val_logits=(val_logits, val_labels))


def _slot(conf: float, n_bins: int) -> int:
    """Equal-width slot: [m/M, (m+1)/M) for m < M, slot M the point mass {1}."""
    return sum(conf >= e for e in np.linspace(0, 1, n_bins + 1)[1:])


def _ece(probs: torch.Tensor, labels: torch.Tensor, n_bins: int, weights=None) -> float:
    """Binned ECE Σ_m |Σ_{i∈B_m} w_i (correct_i − conf_i)| / Σ_i w_i, by a loop over examples."""
    weights = [1.0] * len(labels) if weights is None else list(weights)
    sums = [0.0] * (n_bins + 1)
    for p, y, w in zip(probs.tolist(), labels.tolist(), weights):
        conf = max(p)
        sums[_slot(conf, n_bins)] += w * (float(p.index(conf) == y) - conf)
    return sum(abs(s) for s in sums) / sum(weights)


def _nll(probs: torch.Tensor, labels: torch.Tensor) -> list[float]:
    return [-math.log(max(p[y], 1e-12)) for p, y in zip(probs.tolist(), labels.tolist())]


@pytest.mark.parametrize("method", ["mc", "probit"])
def test_tuned_seed_columns_choose_the_grid_argmin_of_validation_nll_by_hand(study, method):
    """Columns: the named posteriors over the κ grid, the isotropic control of each block over the
    σ² grid, temperature scaling over its T grid. Each column's validation loss is the per-example
    NLL of its predictive at every grid value on the validation bank (zeros beyond the bank's
    N_VAL images), so the unweighted choice is the grid argmin of the mean NLL, found here by a loop;
    its test probabilities are the sample mixture at that value; the temperature grid holds the
    study's T, which the whole validation set chooses again when it is the NLL optimum."""
    pc = PredictiveConfig(method=method, scale="val_nll", scale_range=[0.05, 20.0], scale_points=7,
                          control_range=[1e-3, 1e3], control_points=13)
    names = ["single 1", "all", "single 0"]
    ts = tuned_seed(study, names, pc, torch.device("cpu"))
    assert len(ts.columns) == len(names) + L + 1 and ts.n_samples == K
    val, (ctrl, ctrl_val) = study.validation_bank(), (study.control_bank(), study.control_validation_bank())
    w = torch.tensor([[0.2, 0.5, 0.3], [1.0, 0.0, 0.0]], dtype=torch.float64)

    def check(col, bank_val, bank_test, name, grid, scale_of):
        nll = [_nll(_mixture(bank_val, name, [1 / K] * K, method, scale=scale_of(k)), bank_val.labels) for k in grid]
        assert torch.allclose(col.val_loss[:, :N_VAL].double(), torch.tensor(nll, dtype=torch.float64), atol=1e-5)
        assert (col.val_loss[:, N_VAL:] == 0).all() and col.val_loss.shape[1] == N_VAL_ALL
        best = int(np.argmin([np.mean(r) for r in nll]))
        assert int(col.chosen()) == best
        out = col.probs(best, w)
        for r in range(2):
            ref = _mixture(bank_test, name, w[r].tolist(), method, scale=scale_of(grid[best]))
            assert torch.allclose(out[r].double(), ref, atol=1e-6)
        return best

    grid = np.geomspace(0.05, 20.0, 7)
    for col, name in zip(ts.columns, names):
        check(col, val, study.test_bank(), name, grid, lambda k: k)
    cgrid = np.geomspace(1e-3, 1e3, 13)
    assert torch.allclose(control_grid(pc), torch.tensor(cgrid), rtol=1e-9)
    for b in range(L):
        check(ts.columns[len(names) + b], ctrl_val, ctrl, f"single {b}", cgrid, lambda k: k)
    temps = temperature_grid(1.7)
    assert bool((temps == 1.7).any()) and bool((temps.diff() > 0).all())
    assert temps[0] == pytest.approx(1.7 / 8) and temps[-1] == pytest.approx(1.7 * 8)
    logits, labels = study.validation_logits()
    tcol = ts.columns[-1]
    nll = [_nll(torch.softmax(logits / t, -1), labels) for t in temps.tolist()]
    assert torch.allclose(tcol.val_loss.double(), torch.tensor(nll, dtype=torch.float64), atol=1e-10)
    best = int(np.argmin([np.mean(r) for r in nll]))
    assert int(tcol.chosen()) == best
    assert torch.allclose(tcol.probs(best, w)[1], torch.softmax(study.test_bank().map_logits / temps[best], -1),
                          atol=1e-12)


def test_validation_table_and_choices_by_hand(study):
    """val_delta: ECE_det − ECE_S on the validation bank, S at its κ_S, by loops; the best single
    block is the validation argmax; the set is the cheapest priced choice with at least SET_SHARE
    of the all-block validation gain, None when the all-block validation gain is not positive."""
    pc = PredictiveConfig(method="mc", scale="val_nll")
    out = validation_table([study], pc, 4, torch.device("cpu"))
    val = study.validation_bank()
    det = torch.softmax(val.map_logits, -1)
    assert list(out.posterior) == ["all", "single 1", "single 0"]
    for row in out.itertuples():
        ref = _ece(det, val.labels, 4) - _ece(_mixture(val, row.posterior, [1 / K] * K, "mc"), val.labels, 4)
        assert row.val_delta == pytest.approx(ref, abs=1e-6)
    hand = pd.DataFrame({"posterior": ["all", "single 2", "single 0", "single 1", "last 2"],
                         "kind": ["all", "single", "single", "single", "last-k"], "block": [-1, 2, 0, 1, 2],
                         "val_delta": [0.05, 0.03, 0.045, 0.045, 0.041]})
    assert choose_single(hand) == 0  # a tie with block 1: the lower block
    cost = pd.DataFrame({"name": ["single 0", "single 1", "single 2", "last 2", "all"],
                         "cost": [3.0, 2.0, 1.0, 2.0, 5.0]})
    assert SET_SHARE == 0.8
    assert choose_set(hand, cost) == "single 1"  # 0.045 ≥ 0.04 at cost 2, and the larger gain of the two at cost 2
    assert choose_set(hand.assign(val_delta=[0.05, 0.03, 0.01, 0.01, 0.02]), cost) == "all"
    assert choose_set(hand.assign(val_delta=[-0.01, 0.03, 0.01, 0.01, 0.02]), cost) is None


def test_interval_comparison_percentile_and_bca_by_hand(study):
    """Δ = ECE_det − ECE_S of the single blocks (in the study's order), the percentile interval of the
    paired bootstrap replicates (image multiplicities of the generator seeded 1), and the BCa
    interval from z0, the jackknife acceleration and the adjusted quantile levels."""
    stats = StatsConfig(n_bins=4, n_boot=200, alpha=0.1)
    out = interval_comparison(study, stats, torch.device("cpu"))
    assert list(out.columns) == ["block", "delta", "percentile_lower", "percentile_upper", "bca_lower", "bca_upper"]
    assert list(out.block) == [1, 0]
    d = study.named()
    det, labels, M, R, a2 = d["det"], d["labels"], stats.n_bins, stats.n_boot, stats.alpha / 2
    counts = bootstrap_counts(N, R, torch.Generator().manual_seed(1), torch.float64, "cpu").tolist()
    for row, name in zip(out.itertuples(), ["single 1", "single 0"]):
        probs = d["probs"][NAMES.index(name)]
        est = _ece(det, labels, M) - _ece(probs, labels, M)
        assert row.delta == pytest.approx(est, abs=1e-12)
        reps = np.array([_ece(det, labels, M, w) - _ece(probs, labels, M, w) for w in counts])
        lo, hi = np.quantile(reps, [a2, 1 - a2])
        assert (row.percentile_lower, row.percentile_upper) == pytest.approx((lo, hi), abs=1e-12)
        keep = [[i for i in range(N) if i != j] for j in range(N)]
        jack = np.array([_ece(det[k], labels[k], M) - _ece(probs[k], labels[k], M) for k in keep])
        z0 = norm.ppf(np.clip(((reps < est).sum() + 0.5 * (reps == est).sum()) / R, 0.5 / R, 1 - 0.5 / R))
        dev = jack.mean() - jack
        acc = (dev ** 3).sum() / (6 * ((dev ** 2).sum()) ** 1.5)
        levels = [norm.cdf(z0 + (z0 + z) / (1 - acc * (z0 + z))) for z in norm.ppf([a2, 1 - a2])]
        assert (row.bca_lower, row.bca_upper) == pytest.approx(tuple(np.quantile(reps, levels)), abs=1e-12)
        assert abs(acc) > 1e-6 and abs(levels[0] - a2) > 1e-4  # the BCa correction is not a no-op here


def test_prepare_ranked_keeps_single_and_all_rows_in_table_order():
    table = pd.DataFrame({"posterior": ["all", "single 2", "all but 0", "single 0", "first 2"],
                          "kind": ["all", "single", "leave-one-out", "single", "first-k"], "block": [-1, 2, 0, 0, 2],
                          "delta": [0.03, -0.01, 0.02, 0.005, 0.04], "lower": [0.01, -0.02, 0.0, -0.001, 0.02],
                          "upper": [0.05, 0.0, 0.04, 0.011, 0.06]})
    out = prepare_ranked(table)
    assert list(out.columns) == ["layer", "delta", "lower", "upper"]
    assert list(out.layer) == ["all blocks", "block 2", "block 0"]
    for col in ("delta", "lower", "upper"):
        assert np.allclose(out[col], table.loc[[0, 1, 3], col], rtol=0, atol=1e-15), col


def test_prepare_scatter_panels_pairs_each_block_with_its_quantities():
    """Single blocks ordered by block; x: block index, 100 × Δacc (pp), ΔNLL, and the curvature
    trace looked up by block (the blocks frame is in another order); only the last three are labelled."""
    table = pd.DataFrame({"posterior": ["single 2", "all", "single 0", "single 1"],
                          "kind": ["single", "all", "single", "single"], "block": [2, -1, 0, 1],
                          "delta": [0.02, 0.05, -0.01, 0.004], "lower": [0.01, 0.03, -0.02, -0.001],
                          "upper": [0.03, 0.07, 0.0, 0.009], "d_acc": [-0.003, 0.001, 0.002, 0.0],
                          "d_nll": [0.011, 0.02, -0.004, 0.001]})
    att = Attribution(table=table, samples=torch.zeros(5, 4))
    blocks = pd.DataFrame({"block": [1, 0, 2], "curvature_trace": [300.0, 10.0, 4000.0]})
    panels = prepare_scatter_panels(att, blocks)
    assert list(panels) == ["Block depth (index)", "Δ accuracy (pp, Bayes − det.)", "Δ NLL (nats, det. − Bayes)",
                            "Curvature trace tr GGN$_\\ell$ (block's K-FAC)"]
    expected_x = [[0, 1, 2], [0.2, 0.0, -0.3], [-0.004, 0.001, 0.011], [10.0, 300.0, 4000.0]]
    for (key, df), x in zip(panels.items(), expected_x):
        assert np.allclose(df.x, x, rtol=0, atol=1e-12), key
        assert np.allclose(df.delta, [-0.01, 0.004, 0.02], rtol=0, atol=1e-15)
        assert np.allclose(df.lower, [-0.02, -0.001, 0.01], rtol=0, atol=1e-15)
        assert np.allclose(df.upper, [0.0, 0.009, 0.03], rtol=0, atol=1e-15)
    assert "label" not in panels["Block depth (index)"]
    assert all(list(df.label) == [0, 1, 2] for df in list(panels.values())[1:])


def test_prepare_reliability_panels_by_hand(study):
    """Per slot (M equal-width bins + the point mass at 1): count, mean confidence and accuracy
    (NaN where empty) of the deterministic, temperature-scaled, single-block and all-block predictives."""
    M = 4
    panels = prepare_reliability_panels(study, 1, M)
    d = study.named()
    sources = {"Deterministic": d["det"], "Temperature scaled": d["ts"],
               "Bayes (block 1)": d["probs"][NAMES.index("single 1")], "Bayes (all blocks)": d["probs"][NAMES.index("all")]}
    assert list(panels) == list(sources)
    for name, probs in sources.items():
        slots = [[] for _ in range(M + 1)]
        for p, y in zip(probs.tolist(), d["labels"].tolist()):
            slots[_slot(max(p), M)].append((max(p), float(p.index(max(p)) == y)))
        rd = panels[name]
        assert rd.count.tolist() == [len(s) for s in slots], name
        conf = torch.tensor([np.mean([c for c, _ in s]) if s else float("nan") for s in slots], dtype=torch.float64)
        acc = torch.tensor([np.mean([a for _, a in s]) if s else float("nan") for s in slots], dtype=torch.float64)
        assert torch.allclose(rd.confidence, conf, atol=1e-12, equal_nan=True), name
        assert torch.allclose(rd.accuracy, acc, atol=1e-12, equal_nan=True), name
    assert panels["Deterministic"].count[M] == 1  # the one-hot row


def test_scale_selection_retunes_kappa_on_resampled_validation_images_by_hand(study):
    """Per validation resample r (multinomial counts from the generator seeded 5): κ_S^(r) = the grid
    point with the least count-weighted validation NLL, Δ at κ_S^(r) on the test set; the table's
    quantiles, SDs and the share of resamples that keep the full-validation κ_S, by loops."""
    stats = StatsConfig(n_bins=4, n_boot=40, alpha=0.2)
    pc = PredictiveConfig(method="mc", scale="val_nll", scale_range=[0.05, 20.0], scale_points=7)
    grid = np.geomspace(0.05, 20.0, 7)
    names = ["single 0", "single 1", "all"]
    samples = torch.randn(50, 3, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    table = pd.DataFrame({"posterior": ["all", "single 1", "single 0"], "delta": [0.01, -0.02, 0.03],
                          "lower": [0.0, -0.05, 0.01], "upper": [0.02, 0.01, 0.04]})
    att = Attribution(table=table, samples=samples)
    out = scale_selection([study], att, stats, pc, torch.device("cpu"), seed=5)
    assert list(out.posterior) == names and (out.n_val == N_VAL).all()
    d, val, uniform = study.named(), study.validation_bank(), [1 / K] * K
    counts = bootstrap_counts(N_VAL, stats.n_boot, torch.Generator().manual_seed(5), torch.float32, "cpu").double()
    for row, name in zip(out.itertuples(), names):
        nll = np.array([[-math.log(max(p[y], 1e-12)) for p, y in zip(
            _mixture(val, name, uniform, "mc", scale=k).tolist(), val.labels.tolist())] for k in grid])  # (G, N_val)
        own = int(nll.mean(1).argmin())
        test = [_ece(d["det"], d["labels"], 4) - _ece(_mixture(study.test_bank(), name, uniform, "mc", scale=k),
                                                       d["labels"], 4) for k in grid]
        chosen = (counts.numpy() @ nll.T).argmin(1)  # (R,)
        reps = np.array([test[g] for g in chosen])
        assert row.kappa == pytest.approx(grid[own], rel=1e-6)
        assert row.stable == pytest.approx((chosen == own).mean(), abs=1e-12)
        lo, hi = np.quantile(reps, [0.1, 0.9])
        # abs 1e-7: the library applies the grid's κ in float32
        assert (row.sel_lower, row.sel_upper) == pytest.approx((lo, hi), abs=1e-7)
        assert row.sel_se == pytest.approx(reps.std(ddof=1), abs=1e-7)
        col = table.posterior.tolist().index(name)
        assert (row.delta, row.lower, row.upper) == (table.delta[col], table.lower[col], table.upper[col])
        assert row.boot_se == pytest.approx(float(samples[:, col].std()), abs=1e-12)
        assert row.sel_share == pytest.approx(row.sel_se / row.boot_se, rel=1e-9)
    assert out.stable.min() < 1 and (out.sel_se > 0).any()  # the resampling changes κ_S for some posterior here


def test_scale_selection_is_empty_without_tuning(study):
    att = Attribution(table=pd.DataFrame({"posterior": ["all"], "delta": [0.0], "lower": [0.0], "upper": [0.0]}),
                      samples=torch.zeros(5, 1))
    out = scale_selection([study], att, StatsConfig(), PredictiveConfig(scale="none"), torch.device("cpu"), seed=0)
    assert out.empty and "sel_share" in out.columns


class _SubsetStudy:
    """A seed whose subsets stage saved the ECE table ``e`` (R+1, 2^L)."""

    def __init__(self, e: torch.Tensor):
        self._e = e

    def subset_ece(self) -> torch.Tensor:
        return self._e


def test_shapley_from_sampled_orderings_by_hand():
    """With stats.shapley_permutations the values are the seed-averaged mean contributions over the
    antithetic orderings, read only where the orderings visit (NaN elsewhere), the basic interval is
    widened by their Monte Carlo error, and the values still sum to the all-block gain."""
    n_blocks, n_perms, R = 6, 8, 30
    gen = torch.Generator().manual_seed(5)
    perms = antithetic_permutations(n_blocks, n_perms)
    visited = coalitions(perms)
    seeds = []
    for _ in range(3):
        e = 0.05 + 0.01 * torch.rand(R + 1, 2**n_blocks, generator=gen, dtype=torch.float64)
        hole = torch.ones(2**n_blocks, dtype=torch.bool)
        hole[visited] = False
        e[:, hole] = float("nan")
        seeds.append(_SubsetStudy(e))
    stats = StatsConfig(shapley_permutations=n_perms, alpha=0.1)
    got = shapley(seeds, stats)
    c = torch.stack([permutation_contributions(s.subset_ece()[:, :1] - s.subset_ece(), perms) for s in seeds])
    phi = c.mean(-2)  # (S, R + 1, L)
    est = phi[:, 0].mean(0)
    assert torch.allclose(torch.tensor(got.phi.to_numpy()), est)
    mean_e = torch.stack([s.subset_ece()[0] for s in seeds]).mean(0)
    assert got.phi.sum() == pytest.approx(float(mean_e[0] - mean_e[-1]))  # efficiency, ordering by ordering
    se = antithetic_standard_error(c[:, 0].mean(0))
    assert torch.allclose(torch.tensor(got.mc_se.to_numpy()), se) and (se > 0).all()
    lo, hi = widen(est, *basic_interval(phi[:, 1:].mean(0), est, 0.1), se, 0.1, n_perms // 2 - 1)
    assert torch.allclose(torch.tensor(got.lower.to_numpy()), lo) and torch.allclose(torch.tensor(got.upper.to_numpy()), hi)
    blo, bhi = basic_interval(phi[:, 1:].mean(0), est, 0.1)
    assert (lo < blo).all() and (hi > bhi).all()
    seeds[1].subset_ece()[:, visited[3]] = float("nan")  # a visited subset left unevaluated
    with pytest.raises(ValueError, match="coalitions"):
        shapley(seeds, stats)


def test_shapley_draws_the_orderings_once_for_all_seeds(monkeypatch):
    """One draw of the antithetic orderings serves every seed (the values are those of the shared
    orderings), and seeds whose ECE tables differ in shape are refused."""
    n_blocks, n_perms, R = 4, 6, 5
    gen = torch.Generator().manual_seed(7)
    seeds = [_SubsetStudy(torch.rand(R + 1, 2**n_blocks, generator=gen, dtype=torch.float64)) for _ in range(3)]
    calls = []

    def counted(n_players: int, n: int) -> torch.Tensor:
        calls.append((n_players, n))
        return antithetic_permutations(n_players, n)

    monkeypatch.setattr("lib.attribution.antithetic_permutations", counted)
    got = shapley(seeds, StatsConfig(shapley_permutations=n_perms))
    assert calls == [(n_blocks, n_perms)]
    perms = antithetic_permutations(n_blocks, n_perms)
    c = torch.stack([permutation_contributions(s.subset_ece()[:, :1] - s.subset_ece(), perms) for s in seeds])
    assert torch.allclose(torch.tensor(got.phi.to_numpy()), c[:, 0].mean(-2).mean(0))
    with pytest.raises(ValueError, match="same bootstrap replicates"):
        shapley([*seeds, _SubsetStudy(torch.zeros(R + 1, 2 ** (n_blocks + 1), dtype=torch.float64))],
                StatsConfig(shapley_permutations=n_perms))
