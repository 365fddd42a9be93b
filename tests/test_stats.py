"""Tests for lib.stats: exact references, hand-worked cases and coverage simulations."""

import dataclasses
import math

import numpy as np
import pytest
import torch
from scipy.stats import kendalltau, norm
from scipy.stats import t as student_t

from lib.calibration import ece, ece_from_weights
from lib.resample import bootstrap_counts
from lib.stats import (
    basic_interval,
    basic_replicates,
    bca_interval,
    bootstrap_pvalues,
    delta_ece,
    SeedSamples,
    TunedColumn,
    TunedSeed,
    holm,
    kendall_tau_b,
    jackknife_delta_ece,
    mc_error_delta_ece,
    paired_bootstrap,
    pareto_front,
    percentile_interval,
    rank_confidence_set,
    rank_probabilities,
    rank_samples,
    sample_bootstrap,
    seed_spread_interval,
    tuned_bootstrap,
)

SHIFT = torch.tensor([0.0, 0.02, 0.03], dtype=torch.float64)
FLIP = torch.tensor([0.05, 0.05, 0.1], dtype=torch.float64)
GAP = 0.15


def _studies(k, n, gen, n_classes=3):
    """k independent synthetic studies with a computable population Delta (vectorised).

    Deterministic confidence c ~ U(0.55, 0.95), correct y ~ Bern(c - GAP): over-confident by GAP in
    every bin. Posterior l: confidence c - SHIFT[l] * u (u ~ U(0, 2)), prediction changed with
    probability FLIP[l] (so correctness y' = y xor flip). Accuracy stays below confidence in every
    bin, hence population binned ECE = E[conf - correct] and
    Delta(l) = SHIFT[l] * E[u] + FLIP[l] * (1 - 2 E[y]) = SHIFT[l] - 0.2 * FLIP[l].

    Returns probs_det (k, n, C), probs_bayes (k, P, n, C), labels (k, n).
    """
    p = len(SHIFT)
    c = 0.55 + 0.4 * torch.rand(k, n, generator=gen, dtype=torch.float64)
    y = torch.rand(k, n, generator=gen, dtype=torch.float64) < c - GAP
    labels = torch.where(y, 0, 1)

    def probs(conf, pred):
        out = ((1 - conf) / (n_classes - 1))[..., None].repeat_interleave(n_classes, -1)
        return out.scatter_(-1, pred[..., None], conf[..., None])

    det = probs(c, torch.zeros(k, n, dtype=torch.int64))
    u = 2 * torch.rand(k, p, n, generator=gen, dtype=torch.float64)
    flip = torch.rand(k, p, n, generator=gen, dtype=torch.float64) < FLIP[:, None]
    bayes = probs(c[:, None] - SHIFT[:, None] * u, flip.long())
    return det, bayes, labels


def _study(n, gen):
    det, bayes, labels = _studies(1, n, gen)
    return det[0], bayes[0], labels[0]


TRUE_DELTA = SHIFT - 0.2 * FLIP


def _random_models(n, p, c, gen):
    logits = 2 * torch.randn(n, c, generator=gen, dtype=torch.float64)
    labels = torch.randint(0, c, (n,), generator=gen)
    det = logits.softmax(1)
    temps = 0.5 + 2 * torch.rand(p, 1, 1, generator=gen, dtype=torch.float64)
    return det, (logits[None] / temps).softmax(2), labels


def test_delta_ece_equals_difference_of_ece():
    gen = torch.Generator().manual_seed(0)
    det, bayes, labels = _random_models(500, 4, 5, gen)
    ref = torch.stack([ece(det, labels, 15) - ece(b, labels, 15) for b in bayes])
    assert torch.allclose(delta_ece(det, bayes, labels), ref, atol=1e-12)


# Round-off bound for a float64 Delta from bin sums over N examples with multiplicities summing to N:
# each |S_m| = |sum_i w_i 1[i in B_m] r_i| with |r_i| <= 1 is summed with error <= N eps sum_i w_i |r_i|
# (recursive summation, any order), so each ECE is off by <= N eps and Delta by <= 2 N eps.
EPS64 = torch.finfo(torch.float64).eps


def test_paired_bootstrap_equals_explicit_resampling():
    gen = torch.Generator().manual_seed(1)
    det, bayes, labels = _random_models(300, 3, 5, gen)
    g64 = torch.Generator().manual_seed(9)
    res = paired_bootstrap(det, bayes, labels, 40, g64, n_bins=10, chunk_size=64)
    idx = torch.randint(0, 300, (40, 300), generator=torch.Generator().manual_seed(9))
    ref = torch.stack([delta_ece(det[i], bayes[:, i], labels[i], 10) for i in idx])
    bound = 2 * 300 * EPS64  # 1.3e-13; different draws would differ by ~1e-2
    assert torch.allclose(res.samples, ref, rtol=0, atol=bound)
    assert torch.allclose(res.estimate, delta_ece(det, bayes, labels, 10), rtol=0, atol=bound)
    # chunking over R consumes the same random stream: the same draws (the generator ends in the same
    # state, and the replicates agree with the explicit ones), summed by matmuls of other shapes, whose
    # kernels may order the sums differently (they do on AMD EPYC): equal up to round-off only
    g7 = torch.Generator().manual_seed(9)
    res2 = paired_bootstrap(det, bayes, labels, 40, g7, n_bins=10, chunk_size=7)
    assert torch.equal(g7.get_state(), g64.get_state())
    assert torch.allclose(res2.samples, res.samples, rtol=0, atol=bound)
    assert torch.allclose(res2.samples, ref, rtol=0, atol=bound)


def _identical_pair(seed):
    """The case of issue 14: p = softmax of 400 x 3 float64 logits, labels uniform."""
    gen = torch.Generator().manual_seed(seed)
    p = torch.randn(400, 3, generator=gen, dtype=torch.float64).softmax(1)
    return p, torch.randint(0, 3, (400,), generator=gen)


def _nonzero(x):
    return int((x != 0).sum())


def test_identical_models_give_exactly_zero_delta():
    """A posterior equal to the deterministic model has Delta exactly 0: point estimate, every paired
    bootstrap replicate (any chunking), every jackknife value, hence BCa and percentile intervals
    [0, 0] and a bootstrap p-value of 1. Before the fix (AMD EPYC, torch 2.14.1) 58 of 200 such seeds
    gave Delta != 0 (up to 1.1e-16, from the column sums of the residual design), replicates were
    off by up to 1.1e-16 and 5 of the first 20 seeds had a BCa interval that excluded 0. Other
    posteriors alongside keep their Delta."""
    hits = {"delta": 0, "boot": 0, "jack": 0, "bca": 0, "pct": 0, "pvalue": 0}
    for seed in range(20):
        p, y = _identical_pair(seed)
        other = (2 * p.log()).softmax(1)  # sharper, a different model
        bayes = torch.stack([p, other, p])
        d = delta_ece(p, bayes, y, 10)
        hits["delta"] += _nonzero(d[[0, 2]])
        assert abs(float(d[1]) - float(ece(p, y, 10) - ece(other, y, 10))) <= 2 * 400 * EPS64 and d[1] != 0
        for chunk in (7, 256):
            res = paired_bootstrap(p, bayes, y, 200, torch.Generator().manual_seed(seed), n_bins=10, chunk_size=chunk)
            hits["boot"] += _nonzero(res.estimate[[0, 2]]) + _nonzero(res.samples[:, [0, 2]])
        jk = jackknife_delta_ece(p, bayes, y, 10)
        hits["jack"] += _nonzero(jk[:, [0, 2]])
        lo, hi = bca_interval(res.samples, res.estimate, jk)
        hits["bca"] += _nonzero(lo[[0, 2]]) + _nonzero(hi[[0, 2]])
        lo, hi = percentile_interval(res.samples)
        hits["pct"] += _nonzero(lo[[0, 2]]) + _nonzero(hi[[0, 2]])
        hits["pvalue"] += _nonzero(bootstrap_pvalues(res.samples)[[0, 2]] - 1)
    assert hits == {"delta": 0, "boot": 0, "jack": 0, "bca": 0, "pct": 0, "pvalue": 0}


def test_identical_models_give_exactly_zero_in_the_sample_and_mc_bootstraps():
    """The bootstrap over seeds, examples and posterior samples, and the Monte Carlo error: a
    posterior whose every sample equals the deterministic model gives exactly 0 everywhere; a
    different posterior alongside does not."""
    for seed in range(5):
        p, y = _identical_pair(seed)
        # every one of the K = 4 samples of posterior 0 is p (so is every mixture), of posterior 1 `other`
        pair = torch.stack([p, (2 * p.log()).softmax(1)])
        seeds = [SeedSamples(p, y, lambda w: pair.expand(w.shape[0], -1, -1, -1), 4)] * 2
        res = sample_bootstrap(seeds, 50, torch.Generator().manual_seed(seed), n_bins=10, chunk_size=8)
        assert _nonzero(res.estimate[0]) == 0 and _nonzero(res.samples[:, 0]) == 0
        assert _nonzero(res.samples[:, 1]) == 50
        mc = mc_error_delta_ece(p, y, lambda w: p.expand(w.shape[0], -1, -1), 4, 20,
                                torch.Generator().manual_seed(seed), n_bins=10)
        assert (float(mc.estimate), float(mc.se), float(mc.halving)) == (0.0, 0.0, 0.0)


def test_jackknife_closed_form_equals_leave_one_out():
    gen = torch.Generator().manual_seed(2)
    det, bayes, labels = _random_models(60, 3, 4, gen)
    jk = jackknife_delta_ece(det, bayes, labels, 10)
    keep = ~torch.eye(60, dtype=torch.bool)
    ref = torch.stack([delta_ece(det[k], bayes[:, k], labels[k], 10) for k in keep])
    assert torch.allclose(jk, ref, atol=1e-12)


def _bca_reference(samples, estimate, jack, alpha):
    """Textbook BCa (Efron 1987) in numpy, one column at a time."""
    lo, hi = [], []
    for j in range(samples.shape[1]):
        s = np.sort(samples[:, j])
        frac = (np.sum(s < estimate[j]) + 0.5 * np.sum(s == estimate[j])) / len(s)
        z0 = norm.ppf(np.clip(frac, 0.5 / len(s), 1 - 0.5 / len(s)))
        d = jack[:, j].mean() - jack[:, j]
        a = np.sum(d**3) / (6 * np.sum(d**2) ** 1.5)
        qs = [norm.cdf(z0 + (z0 + z) / (1 - a * (z0 + z))) for z in norm.ppf([alpha / 2, 1 - alpha / 2])]
        lo.append(np.quantile(s, qs[0]))
        hi.append(np.quantile(s, qs[1]))
    return np.array(lo), np.array(hi)


def _mc_problem(gen, n=600, c=5):
    """MAP logits f (N, C), labels drawn from a tempered softmax(f), and the MAP probabilities."""
    f = 2.5 * torch.randn(n, c, generator=gen, dtype=torch.float64)
    labels = torch.multinomial(torch.softmax(f / 1.5, -1), 1, generator=gen)[:, 0]
    return f, labels, torch.softmax(f, -1)


def _mixture(sp):
    """The MC predictive of per-sample probabilities sp (K, N, C) as a function of sample weights."""
    return lambda w: torch.einsum("rk,knc->rnc", w, sp)


def test_mc_error_hand_worked_and_weights():
    """estimate = Delta of the K-sample mean; se = SD of Delta over resampled samples (same draws by
    hand); the halving is the mean Delta of the two halves of each random split; equal samples give
    se = halving = 0."""
    gen = torch.Generator().manual_seed(4)
    f, labels, det = _mc_problem(gen, n=200)
    sp = torch.softmax(f[None] + torch.randn(6, *f.shape, generator=gen, dtype=torch.float64), -1)
    res = mc_error_delta_ece(det, labels, _mixture(sp), 6, 50, torch.Generator().manual_seed(9), n_bins=10,
                             n_halvings=3, chunk_size=7)
    assert torch.allclose(res.estimate, delta_ece(det, sp.mean(0)[None], labels, 10)[0], atol=1e-12)
    g2 = torch.Generator().manual_seed(9)
    boot = torch.randint(0, 6, (50, 6), generator=g2)
    reps = torch.stack([delta_ece(det, sp[b].mean(0)[None], labels, 10)[0] for b in boot])
    assert torch.allclose(res.se, reps.std(), atol=1e-10)
    order = torch.rand(3, 6, generator=g2).argsort(1)
    halves = [delta_ece(det, sp[o[s]].mean(0)[None], labels, 10)[0] for o in order for s in (slice(0, 3), slice(3, 6))]
    assert torch.allclose(res.halving, torch.stack(halves).mean() - res.estimate, atol=1e-10)
    same = mc_error_delta_ece(det, labels, _mixture(sp[:1].expand(4, -1, -1)), 4, 20, torch.Generator().manual_seed(0))
    assert float(same.se) < 1e-12 and abs(float(same.halving)) < 1e-12
    with pytest.raises(ValueError, match="K >= 2"):
        mc_error_delta_ece(det, labels, _mixture(sp[:1]), 1, 20, torch.Generator())


@pytest.mark.parametrize("shared", [False, True])
def test_mc_error_matches_spread_over_independent_sample_sets(shared):
    """Simulation: the bootstrap SE over K = 32 samples matches the SD of Delta over independent sets
    of 32 samples, with noise independent per image, and (shared) with perturbations g = J(x) δθ of
    3 shared parameters plus noise, as in the linearised predictive, where one draw moves every image.
    With independent noise the delete-one jackknife, by contrast, overstates it for binned ECE."""
    gen = torch.Generator().manual_seed(0)
    f, labels, det = _mc_problem(gen)
    k, reps = 32, 100
    jac = torch.randn(*f.shape, 3, generator=gen, dtype=torch.float64)
    est, se, jack = [], [], []
    for _ in range(reps):
        noise = torch.randn(k, *f.shape, generator=gen, dtype=torch.float64)
        if shared:
            theta = torch.randn(k, 3, generator=gen, dtype=torch.float64)
            g = 0.7 * (torch.einsum("ncp,kp->knc", jac, theta) + 0.3 * noise)
        else:
            g = 1.5 * noise
        sp = torch.softmax(f[None] + g, -1)
        res = mc_error_delta_ece(det, labels, _mixture(sp), k, 100, gen)
        est.append(res.estimate)
        se.append(res.se)
        loo = delta_ece(det, (sp.sum(0)[None] - sp) / (k - 1), labels)
        jack.append(((k - 1) / k * (loo - loo.mean()).square().sum()).sqrt())
    sd = torch.stack(est).std()
    ratio = float(torch.stack(se).mean() / sd)
    assert 0.7 < ratio < 1.4, ratio  # 0.82-1.13 over simulation seeds
    if not shared:
        assert float(torch.stack(jack).mean() / sd) > 1.8  # 3.1-4.0 over five seeds


def test_bca_matches_reference_formula():
    gen = torch.Generator().manual_seed(3)
    det, bayes, labels = _random_models(400, 4, 5, gen)
    res = paired_bootstrap(det, bayes, labels, 999, gen, n_bins=10)
    jk = jackknife_delta_ece(det, bayes, labels, 10)
    lo, hi = bca_interval(res.samples, res.estimate, jk, alpha=0.1)
    rlo, rhi = _bca_reference(res.samples.numpy(), res.estimate.numpy(), jk.numpy(), 0.1)
    assert np.allclose(lo.numpy(), rlo, atol=1e-12) and np.allclose(hi.numpy(), rhi, atol=1e-12)
    plo, phi = percentile_interval(res.samples, 0.1)
    assert np.allclose(plo.numpy(), np.quantile(res.samples.numpy(), 0.05, axis=0))
    assert np.allclose(phi.numpy(), np.quantile(res.samples.numpy(), 0.95, axis=0))


def test_bootstrap_intervals_cover_true_delta():
    """1000 simulated studies (N=1000, R=500): 95% intervals cover the population Delta 93-97%.

    For speed, the studies of a batch share the bootstrap multiplicities (each study's bootstrap is
    still an ordinary paired bootstrap, computed with ``ece_from_weights`` exactly as in
    ``paired_bootstrap``, whose draws are checked against explicit resampling above).
    """
    gen = torch.Generator().manual_seed(2024)
    n_studies, batch, n, r, p = 1000, 100, 1000, 500, len(SHIFT)
    cover_pct = torch.zeros(p)
    cover_bca = torch.zeros(p)
    for _ in range(n_studies // batch):
        det, bayes, labels = _studies(batch, n, gen)
        conf_d, pred_d = det.max(-1)
        conf_b, pred_b = bayes.max(-1)
        conf = torch.cat([conf_d[:, None], conf_b], 1).reshape(batch * (p + 1), n)
        correct = torch.cat([(pred_d == labels)[:, None], pred_b == labels[:, None]], 1).reshape(batch * (p + 1), n)
        idx = torch.randint(0, n, (r, n), generator=gen)
        w = torch.zeros(r, n, dtype=torch.float64).scatter_add_(1, idx, torch.ones(r, n, dtype=torch.float64))
        e = ece_from_weights(conf, correct.double(), w, 10).reshape(r, batch, p + 1)
        samples = (e[..., :1] - e[..., 1:]).reshape(r, batch * p)
        estimate = torch.stack([delta_ece(det[i], bayes[i], labels[i], 10) for i in range(batch)]).reshape(-1)
        jack = torch.cat([jackknife_delta_ece(det[i], bayes[i], labels[i], 10) for i in range(batch)], 1)
        truth = TRUE_DELTA.repeat(batch)
        lo, hi = percentile_interval(samples)
        cover_pct += ((lo <= truth) & (truth <= hi)).double().reshape(batch, p).sum(0)
        lo, hi = bca_interval(samples, estimate, jack)
        cover_bca += ((lo <= truth) & (truth <= hi)).double().reshape(batch, p).sum(0)
    cover_pct /= n_studies
    cover_bca /= n_studies
    assert ((cover_pct >= 0.93) & (cover_pct <= 0.97)).all(), cover_pct
    assert ((cover_bca >= 0.93) & (cover_bca <= 0.97)).all(), cover_bca


def _fixed(det, bayes, labels, k=3):
    """A seed whose K posterior samples are all equal (no Monte Carlo error)."""
    tables = bayes[:, None].expand(-1, k, -1, -1)
    return SeedSamples(det, labels, lambda w: torch.einsum("rk,pknc->rpnc", w, tables), k)


def test_seed_level_of_sample_bootstrap_estimate_and_variance():
    """With no Monte Carlo error the bootstrap is two-level (seeds, then examples): its variance is
    (between-seed plug-in variance + mean within-seed bootstrap variance) / S."""
    gen = torch.Generator().manual_seed(4)
    seeds = [_study(800, gen) for _ in range(4)]
    res = sample_bootstrap([_fixed(*s) for s in seeds], 2000, torch.Generator().manual_seed(5), n_bins=10,
                           chunk_size=256)
    per_seed = torch.stack([delta_ece(*s, n_bins=10) for s in seeds])
    assert torch.allclose(res.estimate, per_seed.mean(0), atol=1e-12)
    within = torch.stack([paired_bootstrap(*s, 2000, torch.Generator().manual_seed(6 + i), n_bins=10).samples.var(0)
                          for i, s in enumerate(seeds)]).mean(0)
    between = per_seed.var(0, unbiased=False)
    ratio = res.samples.var(0) / ((between + within) / len(seeds))
    assert ((ratio > 0.85) & (ratio < 1.15)).all(), ratio
    # identical seeds: only within-seed noise remains, Var* = within / S
    same = sample_bootstrap([_fixed(*seeds[0])] * 4, 2000, torch.Generator().manual_seed(7), n_bins=10, chunk_size=256)
    w0 = paired_bootstrap(*seeds[0], 2000, torch.Generator().manual_seed(8), n_bins=10).samples.var(0)
    ratio0 = same.samples.var(0) / (w0 / 4)
    assert ((ratio0 > 0.85) & (ratio0 < 1.15)).all(), ratio0


def _mc_tables(bayes, a):
    """Per-sample tables (P, K, N, C): sample k moves a_kp (1 - conf) onto each posterior's predicted
    class (rows still sum to 1), so the K-sample mean is exact as K grows and ECE moves linearly."""
    conf, pred = bayes.max(-1)
    onehot = torch.zeros_like(bayes).scatter_(-1, pred[..., None], 1.0)
    v = onehot - (1 - onehot) / (bayes.shape[-1] - 1)
    return bayes[:, None] + a.T[:, :, None, None] * ((1 - conf)[:, None, :, None] * v[:, None])


def _seed_samples(det, tables, labels):
    return SeedSamples(det, labels, lambda w: torch.einsum("rk,pknc->rpnc", w, tables), tables.shape[1])


def test_sample_bootstrap_equals_explicit_resampling():
    """Each replicate by hand: draw seeds, then per drawn copy resample examples and posterior
    samples with the same generator stream, average the samples' probabilities, take Delta with
    lib.calibration.ece on the repeated examples, and average over the copies."""
    gen = torch.Generator().manual_seed(21)
    seeds = []
    for n in (30, 25):
        det, bayes, labels = _study(n, gen)
        seeds.append(_seed_samples(det, _mc_tables(bayes, 0.3 * torch.randn(5, 3, generator=gen, dtype=torch.float64)), labels))
    res = sample_bootstrap(seeds, 7, torch.Generator().manual_seed(3), n_bins=6, chunk_size=3)
    g = torch.Generator().manual_seed(3)
    seed_idx = torch.randint(0, 2, (7, 2), generator=g)
    mult = torch.zeros(7, 2, dtype=torch.int64).scatter_add_(1, seed_idx, torch.ones_like(seed_idx))
    total = torch.zeros(7, 3, dtype=torch.float64)
    for s, seed in enumerate(seeds):
        owners = torch.repeat_interleave(torch.arange(7), mult[:, s]).tolist()
        n, k = len(seed.labels), seed.n_samples
        per_sample = torch.stack([seed.mixture(torch.eye(k, dtype=torch.float64)[j:j + 1])[0] for j in range(k)], 1)
        copy = 0
        while copy < len(owners):
            c = min(3, len(owners) - copy)
            ex = torch.randint(0, n, (c, n), generator=g)
            sm = torch.randint(0, k, (c, k), generator=g)
            for j in range(c):
                probs = per_sample[:, sm[j]].mean(1)[:, ex[j]]  # (P, n, C): resampled samples, then examples
                y = seed.labels[ex[j]]
                e_det = ece(seed.probs_det[ex[j]], y, 6)
                total[owners[copy + j]] += torch.stack([e_det - ece(probs[p], y, 6) for p in range(3)])
            copy += c
    assert torch.allclose(res.samples, total / 2, atol=1e-10)
    ests = [delta_ece(sd.probs_det, sd.mixture(torch.full((1, 5), 0.2, dtype=torch.float64))[0], sd.labels, 6)
            for sd in seeds]
    assert torch.allclose(res.estimate, torch.stack(ests).mean(0), atol=1e-12)


def test_sample_bootstrap_covers_when_monte_carlo_error_matters():
    """Simulation with a known population Delta (TRUE_DELTA, K -> infinity): with K = 8 samples whose
    Monte Carlo error is comparable to the test-set error, the percentile interval of the bootstrap
    over examples and samples covers it in ~95% of studies; holding the samples fixed (the paired
    bootstrap over examples alone) undercovers."""
    gen = torch.Generator().manual_seed(5)
    k, studies, hits3, hits2 = 8, 200, 0, 0
    for _ in range(studies):
        det, bayes, labels = _study(300, gen)
        tables = _mc_tables(bayes, 0.5 * torch.randn(k, 3, generator=gen, dtype=torch.float64))
        res = sample_bootstrap([_seed_samples(det, tables, labels)], 300, gen, chunk_size=100)
        lo, hi = percentile_interval(res.samples, 0.05)
        hits3 += int(((lo <= TRUE_DELTA) & (TRUE_DELTA <= hi)).sum())
        fixed = paired_bootstrap(det, tables.mean(1), labels, 300, gen)
        lo, hi = percentile_interval(fixed.samples, 0.05)
        hits2 += int(((lo <= TRUE_DELTA) & (TRUE_DELTA <= hi)).sum())
    cover3, cover2 = hits3 / (3 * studies), hits2 / (3 * studies)
    assert 0.91 <= cover3 <= 0.985, cover3
    assert cover2 < 0.88, cover2


def test_rank_samples_and_probabilities_hand_worked():
    s = torch.tensor([[0.3, 0.1, 0.2], [0.1, 0.3, 0.2], [0.3, 0.2, 0.1], [0.5, 0.4, 0.0]])
    assert torch.equal(rank_samples(s), torch.tensor([[1, 3, 2], [3, 1, 2], [1, 2, 3], [1, 2, 3]]))
    expected = torch.tensor([[0.75, 0.0, 0.25], [0.25, 0.5, 0.25], [0.0, 0.5, 0.5]])
    assert torch.allclose(rank_probabilities(s), expected)


def test_rank_confidence_set_coverage_simulation():
    """Gaussian studies: estimate ~ N(Delta, Sigma), bootstrap ~ N(estimate, Sigma)."""
    gen = torch.Generator().manual_seed(10)
    p, reps, r = 6, 500, 500
    delta = torch.tensor([0.05, 0.045, 0.03, 0.02, 0.01, 0.0], dtype=torch.float64)
    a = torch.randn(p, p, generator=gen, dtype=torch.float64)
    cov = (0.5 * a @ a.T / p + 0.5 * torch.eye(p, dtype=torch.float64)) * 0.01**2
    chol = torch.linalg.cholesky(cov)
    true_rank = torch.arange(1, p + 1)
    hit_top, hit_all, certain_top, size = 0, 0, 0, 0
    for _ in range(reps):
        est = delta + chol @ torch.randn(p, generator=gen, dtype=torch.float64)
        boot = est + torch.randn(r, p, generator=gen, dtype=torch.float64) @ chol.T
        cs = rank_confidence_set(est, boot, k=1, alpha=0.05)
        hit_top += bool(cs.top_k_candidates[0])
        hit_all += bool(((cs.lower <= true_rank) & (true_rank <= cs.upper)).all())
        certain_top += bool(cs.top_k_certain[1:].any())  # a wrong layer declared surely top-1
        size += int(cs.top_k_candidates.sum())
    assert hit_top / reps >= 0.95
    assert hit_all / reps >= 0.93
    assert certain_top / reps <= 0.05
    assert size / reps < 4  # informative: excludes clearly worse layers


def test_rank_confidence_set_separated_layers():
    est = torch.tensor([0.3, 0.2, 0.1, 0.0], dtype=torch.float64)
    boot = est + 0.001 * torch.randn(1000, 4, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    cs = rank_confidence_set(est, boot, k=2)
    assert torch.equal(cs.lower, torch.tensor([1, 2, 3, 4])) and torch.equal(cs.upper, torch.tensor([1, 2, 3, 4]))
    assert cs.top_k_candidates.tolist() == [True, True, False, False]
    assert cs.top_k_certain.tolist() == [True, True, False, False]


def test_bootstrap_pvalues_and_holm_hand_worked():
    samples = torch.tensor([[-1.0, 1.0], [0.5, 2.0], [1.0, 3.0], [0.0, -0.5]])
    assert torch.allclose(bootstrap_pvalues(samples), torch.tensor([3 / 5, 2 / 5]))
    p = torch.tensor([0.01, 0.04, 0.03, 0.005])
    # sorted 0.005*4=0.02, 0.01*3=0.03, 0.03*2=0.06, 0.04*1=0.04 -> cummax 0.02, 0.03, 0.06, 0.06
    adjusted, reject = holm(p, alpha=0.05)
    assert torch.allclose(adjusted, torch.tensor([0.03, 0.06, 0.06, 0.02]))
    assert reject.tolist() == [True, False, False, True]
    adjusted, _ = holm(torch.tensor([0.5, 0.6]))
    assert torch.allclose(adjusted, torch.tensor([1.0, 1.0]))


def test_pareto_front_hand_worked():
    cost = torch.tensor([1.0, 2.0, 3.0, 2.0, 4.0])
    value = torch.tensor([0.1, 0.3, 0.2, 0.3, 0.5])
    assert pareto_front(cost, value).tolist() == [True, True, False, True, True]


def test_bad_input_raises():
    det = torch.full((4, 3), 1 / 3)
    with pytest.raises(ValueError, match="probs_bayes"):
        delta_ece(det, det, torch.zeros(4, dtype=torch.int64))
    with pytest.raises(ValueError, match="generator"):
        paired_bootstrap(det, det[None], torch.zeros(4, dtype=torch.int64), 10, None)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_bootstrap_matches_cpu_estimate():
    gen = torch.Generator().manual_seed(14)
    det, bayes, labels = _random_models(2000, 5, 10, gen)
    res = paired_bootstrap(det.cuda(), bayes.cuda(), labels.cuda(), 300, torch.Generator(device="cuda").manual_seed(0))
    assert res.samples.device.type == "cuda"
    assert torch.allclose(res.estimate.cpu(), delta_ece(det, bayes, labels), atol=1e-12)
    jk = jackknife_delta_ece(det.cuda(), bayes.cuda(), labels.cuda())
    assert torch.allclose(jk.cpu(), jackknife_delta_ece(det, bayes, labels), atol=1e-12)


def _tuned_seed(det, tables_by_g, labels, val_loss):
    """A TunedSeed whose column p predicts with the per-sample tables ``tables_by_g[g][p]`` (K, N, C)
    at setting g and chooses g by ``val_loss[p]`` (G, N_val)."""
    def column(p):
        return TunedColumn(val_loss[p], lambda g, w: torch.einsum("rk,knc->rnc", w, tables_by_g[g][p]))
    return TunedSeed(det, labels, [column(p) for p in range(len(val_loss))], tables_by_g[0].shape[1])


def _tuned_case(gen, n=30, n_seeds=2, n_val=12, g=3, k=5):
    """``n_seeds`` seeds of three posteriors scored on the same n test images (the first seed's
    labels), with per-sample tables at ``g`` settings (setting j moves the confidence by 0.1 j), and
    per-example validation losses (P, G, N_val) shared by the seeds."""
    seeds = []
    val_loss = torch.rand(3, g, n_val, generator=gen, dtype=torch.float64)
    for _ in range(n_seeds):
        det, bayes, labels = _study(n, gen)
        a = 0.3 * torch.randn(k, 3, generator=gen, dtype=torch.float64)
        tables = [_mc_tables(bayes, a + 0.1 * j) for j in range(g)]
        seeds.append((det, tables, seeds[0][2] if seeds else labels))
    return seeds, val_loss


def test_tuned_bootstrap_shares_one_test_and_one_validation_resample_by_hand():
    """Replicate r by hand: validation counts u_r from the validation generator and test-image
    draws from the other generator, both once per replicate and used by every seed; g_r(p) =
    argmin_g Σ_n u_rn loss[p, g, n] by a loop; Δ with lib.calibration.ece on the repeated examples
    at g_r(p) with the K samples averaged uniformly; the replicate is the mean over seeds, and the
    estimate and per-seed estimates use the unweighted mean loss."""
    seeds, val_loss = _tuned_case(torch.Generator().manual_seed(31))
    tuned = [_tuned_seed(det, tables, labels, val_loss) for det, tables, labels in seeds]
    R, M, n = 9, 6, 30
    res = tuned_bootstrap(tuned, R, torch.Generator().manual_seed(3), torch.Generator().manual_seed(4), n_bins=M,
                          row_chunk=2)
    u = bootstrap_counts(12, R, torch.Generator().manual_seed(4), torch.float64, "cpu").tolist()
    ex = torch.randint(0, n, (R, n), generator=torch.Generator().manual_seed(3))
    loss = val_loss.tolist()

    def choose(p, weights):
        sums = [sum(w * x for w, x in zip(weights, loss[p][j])) for j in range(3)]
        return min(range(3), key=lambda j: (sums[j], j))

    total = torch.zeros(R, 3, dtype=torch.float64)
    moved = 0
    for det, tables, labels in seeds:
        for r in range(R):
            y = labels[ex[r]]
            row = []
            for p in range(3):
                gp = choose(p, u[r])
                moved += gp != choose(p, [1.0] * 12)
                row.append(ece(det[ex[r]], y, M) - ece(tables[gp][p].mean(0)[ex[r]], y, M))
            total[r] += torch.stack(row)
    assert torch.allclose(res.samples, total / 2, atol=1e-10)
    assert moved > 0  # the resamples do change the chosen setting here
    ests = []
    for det, tables, labels in seeds:
        best = [choose(p, [1.0] * 12) for p in range(3)]
        ests.append(torch.stack([delta_ece(det, tables[best[p]][p].mean(0)[None], labels, M)[0] for p in range(3)]))
    assert torch.allclose(res.seed_estimates, torch.stack(ests), atol=1e-12)
    assert torch.allclose(res.estimate, torch.stack(ests).mean(0), atol=1e-12)


def test_tuned_bootstrap_with_a_degenerate_validation_set_is_the_paired_bootstrap_of_the_seed_mean():
    """When every validation image prefers the same setting, every resample chooses it again: the
    replicates are the seed mean of paired_bootstrap at that setting with one generator state for
    all seeds (the same test resamples), to rounding, and the basic interval reflects them."""
    seeds, val_loss = _tuned_case(torch.Generator().manual_seed(32), n_seeds=3)
    val_loss[:, 1] -= 2.0  # setting 1 has the least loss on every validation image
    tuned = [_tuned_seed(det, tables, labels, val_loss) for det, tables, labels in seeds]
    res = tuned_bootstrap(tuned, 200, torch.Generator().manual_seed(3), torch.Generator().manual_seed(4), n_bins=6)
    refs = [paired_bootstrap(det, tables[1].mean(1), labels, 200, torch.Generator().manual_seed(3), n_bins=6)
            for det, tables, labels in seeds]
    assert torch.allclose(res.samples, torch.stack([r.samples for r in refs]).mean(0), atol=1e-12)
    assert torch.allclose(res.estimate, torch.stack([r.estimate for r in refs]).mean(0), atol=1e-12)
    lo, hi = basic_interval(res.samples, res.estimate)
    rlo, rhi = percentile_interval(torch.stack([r.samples for r in refs]).mean(0), 0.05)
    assert torch.allclose(lo, 2 * res.estimate - rhi, atol=1e-12) and torch.allclose(hi, 2 * res.estimate - rlo, atol=1e-12)


def test_tuned_bootstrap_intervals_widen_when_the_setting_is_re_chosen():
    """Simulation: the validation losses of three settings are nearly tied, so resamples choose
    differently, and the setting moves Δ by about its test-set error. With the same test draws, the
    interval that re-chooses the setting is wider on average than the one that holds it at the
    full-validation choice (a mixture over settings need not be wider for every posterior, so the
    bound is on the mean width ratio over 6 studies × 3 posteriors). Width only: coverage is
    tested in tests/test_coverage.py."""
    gen = torch.Generator().manual_seed(33)
    ratios = []
    for _ in range(6):
        seeds, val_loss = _tuned_case(gen, n=150, n_val=40)
        val_loss = val_loss[:, :1] + 0.02 * torch.randn(3, 3, 40, generator=gen, dtype=torch.float64)
        fixed = val_loss.clone()
        best = val_loss.mean(-1).argmin(-1)
        fixed[torch.arange(3), best] -= 10.0
        widths = []
        for loss in (val_loss, fixed):
            tuned = [_tuned_seed(det, tables, labels, loss) for det, tables, labels in seeds]
            res = tuned_bootstrap(tuned, 400, torch.Generator().manual_seed(5), torch.Generator().manual_seed(6),
                                  n_bins=10)
            lo, hi = basic_interval(res.samples, res.estimate)
            widths.append(hi - lo)
        ratios.append(widths[0] / widths[1])
    assert torch.cat(ratios).mean() > 1.05, ratios


def test_tuned_bootstrap_rejects_columns_of_different_validation_sizes_and_different_test_sets():
    det, bayes, labels = _study(10, torch.Generator().manual_seed(1))
    tables = [_mc_tables(bayes, torch.zeros(2, 3, dtype=torch.float64))]
    bad = TunedSeed(det, labels, [TunedColumn(torch.zeros(1, 4), lambda g, w: tables[0][0][None].mean(1)),
                                  TunedColumn(torch.zeros(1, 5), lambda g, w: tables[0][0][None].mean(1))], 2)
    with pytest.raises(ValueError, match="N_val"):
        tuned_bootstrap([bad], 3, torch.Generator(), torch.Generator())
    good = TunedSeed(det, labels, [TunedColumn(torch.zeros(1, 4), lambda g, w: tables[0][0][None].mean(1))], 2)
    other = dataclasses.replace(good, labels=1 - labels)
    with pytest.raises(ValueError, match="same test images"):
        tuned_bootstrap([good, other], 3, torch.Generator(), torch.Generator())


def test_basic_interval_and_replicates_hand_worked():
    """θ* = 1..101 (quantiles 3.5 and 98.5 at α = 0.05 with linear interpolation), θ̂ = 40:
    basic interval [80 − 98.5, 80 − 3.5] = [−18.5, 76.5], the percentile interval of 2θ̂ − θ*; the
    percentile interval would be [3.5, 98.5]."""
    samples = torch.arange(1.0, 102.0, dtype=torch.float64)[:, None].repeat(1, 2)
    est = torch.tensor([40.0, 51.0], dtype=torch.float64)
    lo, hi = basic_interval(samples, est)
    assert lo.tolist() == pytest.approx([-18.5, 3.5]) and hi.tolist() == pytest.approx([76.5, 98.5])
    assert torch.equal(basic_replicates(samples, est), 2 * est - samples)
    plo, phi = percentile_interval(basic_replicates(samples, est))
    assert torch.allclose(plo, lo) and torch.allclose(phi, hi)
    # a p-value from reflected replicates: the one-sided basic test
    assert float(bootstrap_pvalues(basic_replicates(samples, est))[0]) == pytest.approx((1 + 22) / 102)  # θ* ≥ 80: 22 of 101
    with pytest.raises(ValueError, match="samples must be"):
        basic_replicates(samples, est[:1])


def test_seed_spread_interval_hand_worked():
    """Seeds 1, 2, 6 (mean 3, s² = 7): with constant replicates (no shared variance) it is the
    Student-t interval 3 ± t_{0.975, 2} sqrt(7/3); with replicates of variance v the half-width is
    t_ν sqrt(7/3 + v) with ν = (7/3 + v)² / ((7/3)²/2 + v²/(R − 1)); one seed gives NaN."""
    est = torch.tensor([[1.0], [2.0], [6.0]], dtype=torch.float64)
    lo, hi = seed_spread_interval(est, torch.full((50, 1), 3.0, dtype=torch.float64))
    half = student_t.ppf(0.975, 2) * math.sqrt(7 / 3)
    assert float(lo) == pytest.approx(3 - half) and float(hi) == pytest.approx(3 + half)
    reps = torch.tensor([[0.0], [2.0], [4.0], [6.0]], dtype=torch.float64)  # variance 20/3, R = 4
    a, v = 7 / 3, 20 / 3
    nu = (a + v) ** 2 / (a**2 / 2 + v**2 / 3)
    lo, hi = seed_spread_interval(est, reps, 0.1)
    assert float(hi - 3) == pytest.approx(student_t.ppf(0.95, nu) * math.sqrt(a + v))
    assert float(3 - lo) == pytest.approx(float(hi - 3))
    lo, hi = seed_spread_interval(est[:1], reps)
    assert math.isnan(float(lo)) and math.isnan(float(hi))


def test_kendall_tau_b_against_scipy_with_ties():
    g = torch.Generator().manual_seed(2)
    a = torch.randint(0, 4, (6, 9), generator=g).double()
    b = torch.randint(0, 4, (6, 9), generator=g).double()
    got = kendall_tau_b(a, b)
    for k in range(6):
        assert abs(float(got[k]) - kendalltau(a[k].numpy(), b[k].numpy()).statistic) < 1e-12
    assert float(kendall_tau_b(torch.arange(5.0), torch.arange(5.0))) == 1.0
    assert float(kendall_tau_b(torch.arange(5.0), -torch.arange(5.0))) == -1.0
