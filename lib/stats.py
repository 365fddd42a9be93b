"""Statistics that make a layer ranking sound.

Target quantity: ``Delta(l) = ECE_det - ECE_Bayes(l)`` for P posteriors (e.g. 25: 12 single
blocks, all blocks, 12 leave-one-out), positive = the Bayesian posterior improves calibration.
ECE is the equal-width top-label ECE of :func:`lib.calibration.ece` :cite:`guo2017calibration`.

Everything is vectorised torch and device-agnostic: pass tensors and a ``torch.Generator`` on the
same device (CPU or CUDA).

Performance. The paired bootstrap of ``N`` test points x ``R`` resamples x ``P`` posteriors is
one matmul per chunk of resamples: multinomial counts ``W`` (chunk, N) times a fixed design
``D`` (N, (P + 1)(M + 1)) of per-bin residuals (see :func:`lib.calibration.ece_from_weights`);
cost ``O(R N P M)`` flops, memory ``O(chunk N + N P M)``. For N = 10,000, R = 2,000, P = 25,
M = 15 this is ~8 GFLOP. Measured with ``benchmarks/bench_stats.py`` (float32): the bootstrap
takes < 0.01 s on one H100 (0.3 s including BCa, ranks and the rank confidence set) and
0.3-1 s on a 2-core CPU (target: seconds on a GPU, under a minute on CPU), 30x faster than a
loop over resamples on CPU. The BCa jackknife is exact and
closed-form in O(N P M) (deleting one example changes one bin sum), so no grouped delete-d
jackknife is needed even for large N.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import torch
from scipy.stats import t as student_t
from torch import Tensor

from lib.calibration import _residual_design, bin_index, ece_from_weights, top_label, weighted_ece
from lib.resample import bootstrap_counts

__all__ = [
    "BootstrapResult",
    "delta_ece",
    "paired_bootstrap",
    "SeedSamples",
    "sample_bootstrap",
    "TunedColumn",
    "TunedSeed",
    "tuned_bootstrap",
    "jackknife_delta_ece",
    "MonteCarloError",
    "mc_error_delta_ece",
    "percentile_interval",
    "basic_interval",
    "basic_replicates",
    "seed_spread_interval",
    "bca_interval",
    "rank_samples",
    "rank_probabilities",
    "RankConfidenceSet",
    "rank_confidence_set",
    "bootstrap_pvalues",
    "holm",
    "pareto_front",
    "kendall_tau_b",
]


@dataclass(frozen=True)
class BootstrapResult:
    """Point estimate and bootstrap distribution of Delta.

    Attributes:
        estimate: (P,) Delta on the original data.
        samples: (R, P) bootstrap replicates of Delta.
        seed_estimates: (S, P) Delta of each training seed when the estimate is their mean
            (:func:`tuned_bootstrap`), else None.
    """

    estimate: Tensor
    samples: Tensor
    seed_estimates: Tensor | None = None


def _stack_inputs(probs_det: Tensor, probs_bayes: Tensor, labels: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Confidences and correctness of the distinct models among the P + 1 (row 0 deterministic).

    Returns ``conf`` and ``corr`` (U, N) of the U <= P + 1 distinct (confidence, correctness) rows
    and ``models`` (P + 1,) int64, model j being distinct row ``models[j]`` (:func:`_distinct_rows`).
    """
    if probs_bayes.ndim != 3 or probs_bayes.shape[1:] != probs_det.shape:
        raise ValueError(
            f"probs_bayes must be (P, N, C) matching probs_det {tuple(probs_det.shape)}; "
            f"got {tuple(probs_bayes.shape)}"
        )
    conf_d, corr_d = top_label(probs_det, labels)
    conf_b, pred_b = probs_bayes.max(dim=2)
    corr_b = (pred_b == labels[None]).to(probs_det.dtype)
    return _distinct_rows(torch.cat([conf_d[None], conf_b]), torch.cat([corr_d[None], corr_b]))


def _distinct_rows(conf: Tensor, corr: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Merge models with identical confidences and correctness: (R, N) -> (U, N), (U, N), index (R,).

    Every ECE is then computed once per distinct model and copied to its duplicates, so models
    with equal inputs get bitwise equal ECEs and a Delta of exactly 0, whatever order the reduction
    kernels (matmul blocking, SIMD tails, GPU atomics) sum in; without this, two equal columns of
    the residual design can differ by ~1e-17 and an interval of Delta can exclude 0 by round-off.
    Costs one sort of the R rows, O(R log R N).
    """
    n = conf.shape[-1]
    rows, index = torch.unique(torch.cat([conf, corr], -1), dim=0, return_inverse=True)
    return rows[:, :n], rows[:, n:], index


def _delta_from_sums(sums: Tensor, total: Tensor, models: Tensor, n_bins: int) -> Tensor:
    """Delta (..., P) from per-bin residual sums (..., U (M + 1)) of the U distinct models."""
    e = sums.reshape(*sums.shape[:-1], -1, n_bins + 1).abs().sum(-1) / total[..., None]
    e = e[..., models]
    return e[..., :1] - e[..., 1:]


def delta_ece(probs_det: Tensor, probs_bayes: Tensor, labels: Tensor, n_bins: int = 15) -> Tensor:
    """``Delta(l) = ECE_det - ECE_Bayes(l)`` for each of P posteriors.

    Args:
        probs_det: (N, C) deterministic (MAP) probabilities.
        probs_bayes: (P, N, C) predictive probabilities of P posteriors on the same examples.
        labels: (N,) int64.
        n_bins: M equal-width bins (:func:`lib.calibration.bin_index`).

    Returns:
        (P,) tensor; exactly 0 for a posterior whose confidences and correctness equal the
        deterministic model's (each distinct model's ECE is computed once).
    """
    conf, corr, models = _stack_inputs(probs_det, probs_bayes, labels)
    d = _residual_design(conf, corr, n_bins)
    n = torch.tensor(float(conf.shape[1]), dtype=conf.dtype, device=conf.device)
    return _delta_from_sums(d.sum(0), n, models, n_bins)


def _check_generator(generator: torch.Generator, device: torch.device) -> None:
    if not isinstance(generator, torch.Generator):
        raise ValueError("generator must be a torch.Generator (seeded by the caller)")
    if torch.device(generator.device).type != device.type:
        raise ValueError(
            f"generator is on {generator.device} but the data is on {device}; "
            f"create it with torch.Generator(device='{device.type}')"
        )


def _bootstrap_design(conf: Tensor, corr: Tensor, models: Tensor, n_resamples: int, n_bins: int,
                      generator: torch.Generator, chunk_size: int) -> Tensor:
    """(R, P) bootstrap Delta from the (U, N) distinct models of :func:`_stack_inputs`, chunked over R."""
    _check_generator(generator, conf.device)
    if n_resamples < 1 or chunk_size < 1:
        raise ValueError(f"n_resamples and chunk_size must be >= 1; got {n_resamples}, {chunk_size}")
    d = _residual_design(conf, corr, n_bins)
    n = conf.shape[1]
    out = []
    for start in range(0, n_resamples, chunk_size):
        rows = min(chunk_size, n_resamples - start)
        w = bootstrap_counts(n, rows, generator, conf.dtype, conf.device)
        total = torch.full((rows,), float(n), dtype=conf.dtype, device=conf.device)
        out.append(_delta_from_sums(w @ d, total, models, n_bins))
    return torch.cat(out)


def paired_bootstrap(
    probs_det: Tensor,
    probs_bayes: Tensor,
    labels: Tensor,
    n_resamples: int,
    generator: torch.Generator,
    n_bins: int = 15,
    chunk_size: int = 256,
) -> BootstrapResult:
    """Paired nonparametric bootstrap of Delta over test examples :cite:`efron1993introduction`.

    Each replicate draws N test examples with replacement and evaluates the deterministic model
    and all P posteriors on the *same* resampled examples, so replicates of Delta(l) keep the
    pairing (and the correlation between layers needed for ranks). Implemented with multinomial
    multiplicities and :func:`lib.calibration.ece_from_weights`-style matmuls, ``chunk_size``
    resamples at a time (memory ``chunk_size * N`` weights).

    Args:
        probs_det: (N, C). probs_bayes: (P, N, C). labels: (N,) int64.
        n_resamples: R. generator: seeded torch.Generator on the data's device.
        n_bins: M. chunk_size: resamples per matmul.

    Returns:
        :class:`BootstrapResult` with estimate (P,) and samples (R, P); every replicate is exactly 0
        for a posterior equal to the deterministic model (as in :func:`delta_ece`).
    """
    conf, corr, models = _stack_inputs(probs_det, probs_bayes, labels)
    d = _residual_design(conf, corr, n_bins)
    n = torch.tensor(float(conf.shape[1]), dtype=conf.dtype, device=conf.device)
    est = _delta_from_sums(d.sum(0), n, models, n_bins)
    samples = _bootstrap_design(conf, corr, models, n_resamples, n_bins, generator, chunk_size)
    return BootstrapResult(estimate=est, samples=samples)


@dataclass(frozen=True)
class SeedSamples:
    """One training seed's predictives as functions of weights on their K posterior samples.

    Attributes:
        probs_det: (N, C) deterministic probabilities.
        labels: (N,) int64.
        mixture: weights (c, K), rows summing to 1, -> probabilities (c, P, N, C) of the P
            posteriors (e.g. :func:`lib.laplace.predictive.sample_mixture` of each posterior, stacked).
        n_samples: K.
    """

    probs_det: Tensor
    labels: Tensor
    mixture: Callable[[Tensor], Tensor]
    n_samples: int


def _weighted_delta(conf_det: Tensor, corr_det: Tensor, probs: Tensor, labels: Tensor, weights: Tensor,
                    n_bins: int) -> Tensor:
    """Delta (c, P) of posteriors ``probs`` (c, P, N, C) with example multiplicities ``weights`` (c, N).

    A posterior whose confidences and correctness equal the deterministic model's in a copy takes
    the deterministic ECE of that copy, so its Delta is exactly 0 whatever order the scatter sums
    in (GPU atomics); an elementwise comparison, O(c P N), rather than the sort of
    :func:`_distinct_rows` on every chunk.
    """
    conf, pred = probs.max(dim=-1)
    corr = (pred == labels).to(conf.dtype)
    c = conf.shape[0]
    same = ((conf == conf_det) & (corr == corr_det)).all(-1)  # (c, P)
    conf = torch.cat([conf_det.expand(c, 1, -1), conf], 1)  # (c, P + 1, N); row 0 deterministic
    corr = torch.cat([corr_det.expand(c, 1, -1), corr], 1)
    ece = weighted_ece(conf, corr, weights[:, None, :], n_bins)
    return ece[:, :1] - torch.where(same, ece[:, :1], ece[:, 1:])


def sample_bootstrap(
    per_seed: Sequence[SeedSamples],
    n_resamples: int,
    generator: torch.Generator,
    n_bins: int = 15,
    chunk_size: int = 8,
) -> BootstrapResult:
    """Bootstrap over training seeds, test examples and posterior samples :cite:`davison1997bootstrap`.

    The target is the seed-averaged ``Delta_bar(l)`` of the exact (infinite-sample) predictives.
    Replicate r draws S seeds with replacement; for every drawn copy it resamples that seed's test
    examples (paired across posteriors) and, independently, its K posterior samples (sample k of
    every block together, so all posteriors of the seed see the same resampled samples, as the
    estimate does), recomputes every predictive from the resampled samples and Delta on the
    resampled examples, and averages over the S copies. With one seed only the inner two levels
    vary. Unlike a bootstrap that holds the samples fixed, the spread includes the Monte Carlo error
    of the predictive (:func:`mc_error_delta_ece`); with all samples equal it is the two-level
    bootstrap over seeds and examples.

    For each drawn copy (chunks of ``chunk_size``): example counts ``w`` (N,) and sample counts
    ``v`` (K,) are multinomial; ``p = mixture(v / K)``, and per bin m
    ``S_m = sum_{i in B_m} w_i (correct_i - conf_i)``, ``ECE = sum_m |S_m| / N``.

    Args:
        per_seed: S :class:`SeedSamples` with the same P; N and K may differ between seeds.
        n_resamples: R. generator: seeded, on the data's device. n_bins: M. chunk_size: copies per
            call of ``mixture`` (memory ``chunk_size * P * N * C``).

    Returns:
        :class:`BootstrapResult`: estimate = mean over seeds of Delta at the K-sample predictives
        (uniform weights), samples (R, P).
    """
    if len(per_seed) < 1 or n_resamples < 1 or chunk_size < 1:
        raise ValueError(f"need >= 1 seed, n_resamples >= 1, chunk_size >= 1; got {len(per_seed)}, "
                         f"{n_resamples}, {chunk_size}")
    device, dtype = per_seed[0].probs_det.device, per_seed[0].probs_det.dtype
    _check_generator(generator, device)
    n_seeds = len(per_seed)
    ests = []
    for s in per_seed:
        if s.n_samples < 1:
            raise ValueError(f"SeedSamples.n_samples must be >= 1, got {s.n_samples}")
        uniform = s.mixture(torch.full((1, s.n_samples), 1.0 / s.n_samples, dtype=dtype, device=device)).to(dtype)
        ests.append(delta_ece(s.probs_det, uniform[0], s.labels, n_bins))
    p = ests[0].shape[0]
    if any(e.shape[0] != p for e in ests):
        raise ValueError("per_seed: every seed must have the same number P of posteriors")
    mult = bootstrap_counts(n_seeds, n_resamples, generator, torch.int64, device)  # (R, S) seed copies
    total = torch.zeros(n_resamples, p, dtype=dtype, device=device)
    rows = torch.arange(n_resamples, device=device)
    for s, seed in enumerate(per_seed):
        copies = int(mult[:, s].sum())
        if copies == 0:
            continue
        conf_det, corr_det = top_label(seed.probs_det, seed.labels)
        n, k = seed.labels.shape[0], seed.n_samples
        reps = []
        for start in range(0, copies, chunk_size):
            c = min(chunk_size, copies - start)
            w = bootstrap_counts(n, c, generator, dtype, device)
            v = bootstrap_counts(k, c, generator, dtype, device) / k
            reps.append(_weighted_delta(conf_det, corr_det, seed.mixture(v).to(dtype), seed.labels, w, n_bins))
        total.index_add_(0, torch.repeat_interleave(rows, mult[:, s]), torch.cat(reps))
    return BootstrapResult(estimate=torch.stack(ests).mean(0), samples=total / n_seeds)


@dataclass(frozen=True)
class TunedColumn:
    """One predictive whose setting is chosen on validation data (a covariance scale κ_S, a noise
    size σ², a temperature T), as candidates on a grid.

    Attributes:
        val_loss: (G, N_val) per-example validation loss of each of the G candidate settings; the
            chosen one minimises its (weighted) sum, ties to the first.
        probs: ``(g, sample weights (c, K)) -> (c, N, C)`` test probabilities at candidate g under
            weights on the K posterior samples (rows summing to 1; a predictive without samples
            ignores them).
    """

    val_loss: Tensor
    probs: Callable[[int, Tensor], Tensor]

    def chosen(self, val_weights: Tensor | None = None) -> Tensor:
        """The candidate (int64) minimising ``Σ_n u_n val_loss[g, n]`` for each row u of
        ``val_weights`` (c, N_val), computed in float64; None: the unweighted mean, shape ()."""
        loss = self.val_loss.double()
        if val_weights is None:
            return loss.mean(-1).argmin()
        return (val_weights.double() @ loss.T).argmin(-1)


@dataclass(frozen=True)
class TunedSeed:
    """One training seed's P tuned predictives (:class:`TunedColumn`) on its test set.

    Attributes:
        probs_det: (N, C) deterministic probabilities. labels: (N,) int64.
        columns: the P predictives; every ``val_loss`` has the same N_val (one validation split).
        n_samples: K, the posterior samples the sample weights refer to.
    """

    probs_det: Tensor
    labels: Tensor
    columns: Sequence[TunedColumn]
    n_samples: int


def tuned_bootstrap(
    per_seed: Sequence[TunedSeed],
    n_resamples: int,
    generator: torch.Generator,
    validation_generator: torch.Generator,
    n_bins: int = 15,
    row_chunk: int = 256,
) -> BootstrapResult:
    """Bootstrap of the seed-averaged Delta of predictives whose setting is chosen on validation
    data, with one test-image and one validation resample per replicate shared by every seed
    :cite:`efron1993introduction,davison1997bootstrap`.

    The target is ``Delta_bar(p) = (1/S) Σ_s Delta_s(p)`` of the chosen models: these S training
    runs with their K posterior samples, each predictive at the setting its validation loss picks,
    scored on the population of test images. Every seed is scored on the *same* test images and
    tuned on the *same* validation images, so replicate r draws test multiplicities ``w_r`` (N,)
    from ``generator`` and validation multiplicities ``u_r`` (N_val,) from ``validation_generator``
    once, and every seed uses both (a per-seed test resample would shrink the shared test-image
    variance by about 1/S). For every seed and predictive p the setting is re-chosen,
    ``g_r(p) = argmin_g Σ_n u_rn val_loss_p[g, n]``, and
    ``Delta*_rs(p) = ECE_det(w_r) − ECE_p(w_r)`` is computed at ``g_r(p)`` from the predictive with
    uniform weights on its K samples (held fixed: they are part of the chosen model);
    ``samples[r] = (1/S) Σ_s Delta*_rs``. The replicates are paired across predictives (the same
    ``w`` and ``u``), so differences of columns (e.g. ECE_TS − ECE_S = Delta_S − Delta_TS) have the
    right bootstrap distribution. Seeds are not resampled: the spread over training runs enters
    :func:`seed_spread_interval` through ``seed_estimates``.

    Binned ECE is biased upwards by about ``Σ_m |noise of S_m|`` where a bin's residual sum is near
    zero (a near-calibrated predictive after tuning), and the replicates carry that bias a second
    time, so use :func:`basic_interval` (reflection around the estimate), not the percentile
    interval, for these replicates.

    Per predictive and setting, ``probs`` is called once (uniform sample weights); the ECEs of
    ``row_chunk`` replicates come from one matmul (:func:`lib.calibration.ece_from_weights`).

    Args:
        per_seed: S :class:`TunedSeed` with the same P, the same test labels and the same N_val.
        n_resamples: R. generator, validation_generator: seeded, on the data's device. n_bins: M.
        row_chunk: replicates per matmul (memory ``row_chunk * N``).

    Returns:
        :class:`BootstrapResult`: estimate = mean over seeds of Delta at the settings chosen on the
        whole validation set, samples (R, P), seed_estimates (S, P).
    """
    if len(per_seed) < 1 or n_resamples < 1 or row_chunk < 1:
        raise ValueError(f"need >= 1 seed, n_resamples, row_chunk >= 1; got {len(per_seed)}, {n_resamples}, {row_chunk}")
    device, dtype = per_seed[0].probs_det.device, per_seed[0].probs_det.dtype
    _check_generator(generator, device)
    _check_generator(validation_generator, device)
    p = len(per_seed[0].columns)
    n_val = {c.val_loss.shape[-1] for s in per_seed for c in s.columns}
    if any(len(s.columns) != p for s in per_seed) or len(n_val) != 1 or p < 1:
        raise ValueError("per_seed: every seed needs the same number P >= 1 of columns, all with the same N_val")
    labels = per_seed[0].labels
    if any(s.labels.shape != labels.shape or not torch.equal(s.labels, labels) for s in per_seed):
        raise ValueError("per_seed: every seed must be scored on the same test images (equal labels)")
    test_weights = bootstrap_counts(labels.shape[0], n_resamples, generator, dtype, device)
    val_weights = bootstrap_counts(n_val.pop(), n_resamples, validation_generator, torch.float64, device)
    ests, reps = [], []
    for seed in per_seed:
        uniform = torch.full((1, seed.n_samples), 1.0 / seed.n_samples, dtype=dtype, device=device)
        conf_det, corr_det = top_label(seed.probs_det.to(dtype), labels)
        est = torch.empty(p, dtype=dtype, device=device)
        delta = torch.empty(n_resamples, p, dtype=dtype, device=device)
        for j, col in enumerate(seed.columns):
            chosen, first = col.chosen(val_weights), int(col.chosen())
            for g in sorted(set(chosen.unique().tolist()) | {first}):
                conf, pred = col.probs(g, uniform)[0].to(dtype).max(-1)
                corr = (pred == labels).to(dtype)
                if torch.equal(conf, conf_det) and torch.equal(corr, corr_det):  # the MAP itself: Delta exactly 0
                    if g == first:
                        est[j] = 0.0
                    delta[chosen == g, j] = 0.0
                    continue
                both = (torch.stack([conf_det, conf]), torch.stack([corr_det, corr]))
                if g == first:
                    e = ece_from_weights(*both, torch.ones(1, labels.shape[0], dtype=dtype, device=device), n_bins)
                    est[j] = e[0, 0] - e[0, 1]
                idx = (chosen == g).nonzero().squeeze(1)
                for start in range(0, idx.numel(), row_chunk):
                    sel = idx[start : start + row_chunk]
                    e = ece_from_weights(*both, test_weights[sel], n_bins)
                    delta[sel, j] = e[:, 0] - e[:, 1]
        ests.append(est)
        reps.append(delta)
    seed_estimates = torch.stack(ests)
    return BootstrapResult(estimate=seed_estimates.mean(0), samples=torch.stack(reps).mean(0),
                           seed_estimates=seed_estimates)


def jackknife_delta_ece(probs_det: Tensor, probs_bayes: Tensor, labels: Tensor, n_bins: int = 15) -> Tensor:
    """Exact leave-one-out (jackknife) values of Delta, in closed form :cite:`efron1987better`.

    With per-bin residual sums ``S_m = sum_{i in B_m}(y_i - c_i)``, deleting example i (in bin
    m_i, residual r_i) gives ``ECE_{-i} = (sum_m |S_m| - |S_{m_i}| + |S_{m_i} - r_i|) / (N - 1)``,
    for every model at once: O(N P) after the bin sums, no loop and no grouping.

    Returns:
        (N, P) tensor; row i is Delta computed without example i.
    """
    conf, corr, models = _stack_inputs(probs_det, probs_bayes, labels)
    n = conf.shape[1]
    if n < 2:
        raise ValueError("jackknife needs N >= 2 examples")
    idx = bin_index(conf, n_bins)  # (U, N)
    r = corr - conf
    sums = torch.zeros(conf.shape[0], n_bins + 1, dtype=conf.dtype, device=conf.device)
    sums.scatter_add_(1, idx, r)
    total = sums.abs().sum(1, keepdim=True)  # (U, 1)
    s_i = sums.gather(1, idx)  # (U, N)
    e = ((total - s_i.abs() + (s_i - r).abs()) / (n - 1))[models]  # (P+1, N)
    return (e[:1] - e[1:]).T


@dataclass(frozen=True)
class MonteCarloError:
    """Monte Carlo error of Delta from the K posterior samples of the predictive (test set fixed).

    Attributes:
        estimate: () Delta of the K-sample predictive.
        se: () bootstrap standard error over the K samples.
        halving: () mean change of Delta when the predictive keeps a random half of the samples,
            ``mean Delta(K/2) - Delta(K)``.
    """

    estimate: Tensor
    se: Tensor
    halving: Tensor


def mc_error_delta_ece(
    probs_det: Tensor,
    labels: Tensor,
    mixture: Callable[[Tensor], Tensor],
    n_samples: int,
    n_resamples: int,
    generator: torch.Generator,
    n_bins: int = 15,
    n_halvings: int = 8,
    chunk_size: int = 32,
) -> MonteCarloError:
    """Monte Carlo error of Delta: bootstrap over the posterior samples of the predictive.

    ``mixture`` maps weights (R, K) on the K posterior samples (rows summing to 1) to predictive
    probabilities (R, N, C) (:func:`lib.laplace.predictive.sample_mixture`); uniform weights give
    the predictive that was used. Each bootstrap replicate redraws the K samples with replacement
    (multinomial multiplicities / K) and recomputes Delta on the same test examples; ``se`` is the
    standard deviation of the replicates :cite:`efron1993introduction`. This is the error from
    drawing K posterior samples, conditional on the test set; the bootstraps over test examples
    (and seeds) give the error from the test set at fixed samples. The samples perturb every test
    example at once (one parameter draw moves all logits), so the error does not average out over
    the test set. The delete-one jackknife is not used: ECE bins confidences and takes absolute
    values, and for such non-smooth statistics the jackknife overstates the standard error (3-4x in
    the simulation of the test suite), while this bootstrap matches the spread of Delta over
    independent sample sets.

    ``halving`` is ``mean_h Delta(K/2 samples) - Delta(K)`` over ``n_halvings`` random splits into
    two halves (both halves used): how much Delta moves when the sample count is halved, a direct
    check that K is large enough.

    Args:
        probs_det: (N, C). labels: (N,) int64. mixture: as above. n_samples: K >= 2.
        n_resamples: R >= 2. generator: seeded, on the data's device. n_bins: M.
        n_halvings: H random splits. chunk_size: weight rows per call of ``mixture``.

    Returns:
        :class:`MonteCarloError` of 0-dim tensors.
    """
    k = n_samples
    if k < 2 or n_resamples < 2 or n_halvings < 1:
        raise ValueError(f"need K >= 2 samples, n_resamples >= 2, n_halvings >= 1; got {k}, {n_resamples}, {n_halvings}")
    _check_generator(generator, probs_det.device)
    dtype, device = probs_det.dtype, probs_det.device

    def deltas(weights: Tensor) -> Tensor:
        return torch.cat([delta_ece(probs_det, mixture(weights[i : i + chunk_size]).to(dtype), labels, n_bins)
                          for i in range(0, weights.shape[0], chunk_size)])

    estimate = deltas(torch.full((1, k), 1.0 / k, dtype=dtype, device=device))[0]
    se = deltas(bootstrap_counts(k, n_resamples, generator, dtype, device) / k).std()
    half = k // 2
    order = torch.rand(n_halvings, k, generator=generator, device=device).argsort(1)
    halves = torch.zeros(2 * n_halvings, k, dtype=dtype, device=device)
    rows = torch.arange(n_halvings, device=device)[:, None]
    halves[2 * rows, order[:, :half]] = 1.0 / half
    halves[2 * rows + 1, order[:, half : 2 * half]] = 1.0 / half
    return MonteCarloError(estimate=estimate, se=se, halving=deltas(halves).mean() - estimate)


def percentile_interval(samples: Tensor, alpha: float = 0.05) -> tuple[Tensor, Tensor]:
    """Two-sided percentile bootstrap interval ``[q_{alpha/2}, q_{1-alpha/2}]`` of each column.

    :cite:`efron1993introduction`. samples (R, P) -> (lower (P,), upper (P,)).
    """
    _check_alpha(alpha)
    q = torch.tensor([alpha / 2, 1 - alpha / 2], dtype=samples.dtype, device=samples.device)
    lo, hi = torch.quantile(samples, q, dim=0)
    return lo, hi


def basic_interval(samples: Tensor, estimate: Tensor, alpha: float = 0.05) -> tuple[Tensor, Tensor]:
    """Two-sided basic bootstrap interval ``[2 θ̂ − q_{1−α/2}, 2 θ̂ − q_{α/2}]`` of each column
    :cite:`davison1997bootstrap` (Sec. 5.2), ``q`` the quantiles of the replicates θ*.

    It assumes that θ̂ − θ is distributed like θ* − θ̂, so a bias of the estimator that the
    replicates repeat (binned ECE's upward bias near calibration, see :func:`tuned_bootstrap`) is
    subtracted once rather than added once as in :func:`percentile_interval`. samples (R, P),
    estimate (P,) -> (lower (P,), upper (P,)); it equals the percentile interval of
    :func:`basic_replicates`.
    """
    return percentile_interval(basic_replicates(samples, estimate), alpha)


def basic_replicates(samples: Tensor, estimate: Tensor) -> Tensor:
    """The replicates reflected around the estimate, ``2 θ̂ − θ*_r`` (R, P).

    Their percentile interval is :func:`basic_interval`, so the statistics that consume replicates
    (:func:`bootstrap_pvalues` with :func:`holm`, :func:`rank_confidence_set`,
    :func:`rank_probabilities`) inherit the basic interval's correction when given these instead of
    the raw replicates :cite:`davison1997bootstrap`. Differences of columns reflect alike, since
    ``2(θ̂_a − θ̂_b) − (θ*_a − θ*_b)`` is the difference of the reflected columns.
    """
    if samples.ndim != 2 or estimate.shape != samples.shape[1:]:
        raise ValueError(f"samples must be (R, P) for estimate (P,); got {tuple(samples.shape)}, {tuple(estimate.shape)}")
    return 2 * estimate[None] - samples


def seed_spread_interval(seed_estimates: Tensor, samples: Tensor, alpha: float = 0.05) -> tuple[Tensor, Tensor]:
    """Student-t interval for the expected Delta over training runs :cite:`satterthwaite1946approximate`.

    The seeds are S draws of the training run (and of its posterior samples); their mean
    ``θ̄ = (1/S) Σ_s θ̂_s`` estimates the expectation over training runs of the Delta of the whole
    procedure, and its variance has two parts: the spread between seeds, ``s²/S`` with
    ``s² = Σ_s (θ̂_s − θ̄)² / (S − 1)`` (S − 1 degrees of freedom), and the test-image (and
    validation) variance that every seed shares and that cancels from ``s²``, the variance ``v``
    of the shared-resample replicates of :func:`tuned_bootstrap` (R − 1 degrees of freedom). The
    interval is ``θ̄ ± t_{1−α/2, ν} sqrt(s²/S + v)`` with the Welch–Satterthwaite degrees of
    freedom ``ν = (s²/S + v)² / ((s²/S)² / (S − 1) + v² / (R − 1))``.

    Args:
        seed_estimates: (S, P) per-seed Delta. samples: (R, P) replicates of the seed mean with
            shared resamples. alpha: 1 − confidence level.

    Returns:
        (lower (P,), upper (P,)); NaN with one seed, where the spread over training runs cannot be
        estimated.
    """
    _check_alpha(alpha)
    if seed_estimates.ndim != 2 or samples.ndim != 2 or seed_estimates.shape[1] != samples.shape[1]:
        raise ValueError(f"seed_estimates (S, P) and samples (R, P) must share P; got "
                         f"{tuple(seed_estimates.shape)}, {tuple(samples.shape)}")
    s, r = seed_estimates.shape[0], samples.shape[0]
    mean = seed_estimates.mean(0)
    if s < 2:
        nan = torch.full_like(mean, float("nan"))
        return nan, nan.clone()
    a = seed_estimates.var(0) / s
    b = samples.var(0) if r > 1 else torch.zeros_like(a)
    den = a.pow(2) / (s - 1) + (b.pow(2) / (r - 1) if r > 1 else 0.0)
    df = torch.where(den > 0, (a + b).pow(2) / den.clamp_min(torch.finfo(a.dtype).tiny), torch.full_like(a, s - 1.0))
    t = torch.as_tensor(student_t.ppf(1 - alpha / 2, df.double().cpu().numpy()), dtype=mean.dtype, device=mean.device)
    half = t * (a + b).sqrt()
    return mean - half, mean + half


def _check_alpha(alpha: float) -> None:
    if not 0 < alpha < 1:
        raise ValueError(f"alpha must be in (0, 1); got {alpha}")


def bca_interval(samples: Tensor, estimate: Tensor, jackknife: Tensor, alpha: float = 0.05) -> tuple[Tensor, Tensor]:
    """Bias-corrected and accelerated (BCa) bootstrap interval :cite:`efron1987better`.

    ``z0 = Phi^{-1}( (#{theta*_r < theta_hat} + #{theta*_r = theta_hat}/2) / R )``,
    acceleration from the jackknife ``a = sum_i (bar - theta_(i))^3 / (6 [sum_i (bar - theta_(i))^2]^{3/2})``,
    endpoints are the bootstrap quantiles at
    ``Phi(z0 + (z0 + z_q) / (1 - a (z0 + z_q)))`` for ``q = alpha/2, 1 - alpha/2``.

    Args:
        samples: (R, P) bootstrap replicates. estimate: (P,). jackknife: (N, P) leave-one-out values
            (e.g. :func:`jackknife_delta_ece`).
        alpha: 1 - confidence level.

    Returns:
        (lower (P,), upper (P,)).
    """
    _check_alpha(alpha)
    normal = torch.distributions.Normal(
        torch.zeros((), dtype=samples.dtype, device=samples.device),
        torch.ones((), dtype=samples.dtype, device=samples.device),
    )
    r = samples.shape[0]
    frac = ((samples < estimate).sum(0) + 0.5 * (samples == estimate).sum(0)).to(samples.dtype) / r
    z0 = normal.icdf(frac.clamp(0.5 / r, 1 - 0.5 / r))
    dev = jackknife.mean(0) - jackknife
    den = 6 * (dev.pow(2).sum(0)).pow(1.5)
    a = torch.where(den > 0, dev.pow(3).sum(0) / den.clamp_min(torch.finfo(samples.dtype).tiny), torch.zeros_like(den))
    out = []
    for q in (alpha / 2, 1 - alpha / 2):
        zq = normal.icdf(torch.tensor(q, dtype=samples.dtype, device=samples.device))
        adj = normal.cdf(z0 + (z0 + zq) / (1 - a * (z0 + zq)))
        out.append(_column_quantiles(samples, adj))
    return out[0], out[1]


def _column_quantiles(samples: Tensor, q: Tensor) -> Tensor:
    """Per-column quantile (linear interpolation, as torch.quantile) at per-column levels q (P,)."""
    s = samples.sort(0).values
    r = s.shape[0]
    pos = q.clamp(0, 1) * (r - 1)
    lo = pos.floor().to(torch.int64).clamp(0, r - 1)
    hi = (lo + 1).clamp(max=r - 1)
    frac = pos - lo
    cols = torch.arange(s.shape[1], device=s.device)
    return s[lo, cols] * (1 - frac) + s[hi, cols] * frac


def rank_samples(samples: Tensor) -> Tensor:
    """Rank of each column within each row, rank 1 = largest value (ties by column order).

    samples (R, P) -> int64 (R, P) with values 1..P.
    """
    order = torch.argsort(-samples, dim=1, stable=True)
    ranks = torch.empty_like(order)
    ranks.scatter_(1, order, torch.arange(1, samples.shape[1] + 1, device=samples.device).expand_as(order))
    return ranks


def rank_probabilities(samples: Tensor) -> Tensor:
    """Bootstrap rank-probability matrix ``Pi[l, k] = P*(rank(l) = k + 1)``.

    samples (R, P) -> (P layers, P ranks) float; rows and columns sum to 1. The bootstrap
    probability of being in the top k is ``Pi[:, :k].sum(1)``.
    """
    ranks = rank_samples(samples)
    onehot = torch.nn.functional.one_hot(ranks - 1, samples.shape[1]).to(samples.dtype)
    return onehot.mean(0)


@dataclass(frozen=True)
class RankConfidenceSet:
    """Simultaneous rank confidence intervals and top-k sets (Mogstad et al. 2024).

    Attributes:
        lower, upper: (P,) int64 rank bounds; with probability >= 1 - alpha (asymptotically) the
            true rank of every layer lies in ``[lower, upper]`` simultaneously.
        top_k_candidates: (P,) bool, ``lower <= k``: a confidence set that contains *all* true
            top-k layers with probability >= 1 - alpha.
        top_k_certain: (P,) bool, ``upper <= k``: layers that can be said to be in the top k.
        critical_value: the studentised bootstrap critical value c.
    """

    lower: Tensor
    upper: Tensor
    top_k_candidates: Tensor
    top_k_certain: Tensor
    critical_value: float


def rank_confidence_set(estimate: Tensor, samples: Tensor, k: int = 1, alpha: float = 0.05) -> RankConfidenceSet:
    """Simultaneous confidence sets for ranks, single-step method of :cite:`mogstad2024inference`.

    Pairwise differences ``d_jl = Delta_j - Delta_l`` get simultaneous two-sided intervals
    ``d_hat_jl +- c se_jl`` where ``se_jl`` is the bootstrap standard deviation of ``d*_jl`` and c is
    the (1 - alpha) bootstrap quantile of ``max_{j<l} |d*_jl - d_hat_jl| / se_jl``. Then
    ``lower_j = 1 + #{l : interval for d_lj > 0}`` (layers surely better than j) and
    ``upper_j = P - #{l : interval for d_jl > 0}``. If the pairwise intervals cover jointly (prob.
    >= 1 - alpha), every true rank lies in its interval, hence the candidates ``{j: lower_j <= k}``
    contain the true top-k set (Mogstad et al. 2024, Sec. 3-4; their "tau-best" projection set).

    Args:
        estimate: (P,) point estimates (larger = better, rank 1 = largest).
        samples: (R, P) bootstrap replicates (paired, e.g. :func:`paired_bootstrap`).
        k: size of the top set. alpha: 1 - confidence level.

    Returns:
        :class:`RankConfidenceSet`.
    """
    _check_alpha(alpha)
    p = estimate.shape[0]
    if samples.ndim != 2 or samples.shape[1] != p:
        raise ValueError(f"samples must be (R, P={p}); got {tuple(samples.shape)}")
    if not 1 <= k <= p:
        raise ValueError(f"k must be in 1..P={p}; got {k}")
    d_hat = estimate[:, None] - estimate[None, :]  # (P, P): j - l
    d_star = samples[:, :, None] - samples[:, None, :]  # (R, P, P)
    se = d_star.std(0)
    iu = torch.triu_indices(p, p, offset=1, device=estimate.device)
    se_pairs = se[iu[0], iu[1]].clamp_min(torch.finfo(samples.dtype).eps)
    t = (d_star[:, iu[0], iu[1]] - d_hat[iu[0], iu[1]]).abs() / se_pairs
    c = torch.quantile(t.max(1).values, 1 - alpha) if iu.shape[1] > 0 else torch.zeros((), dtype=samples.dtype)
    se_full = se.clamp_min(torch.finfo(samples.dtype).eps)
    better = (d_hat - c * se_full) > 0  # better[j, l]: Delta_j > Delta_l asserted
    better.fill_diagonal_(False)
    lower = 1 + better.sum(0)  # layers l surely better than j: better[l, j]
    upper = p - better.sum(1)
    return RankConfidenceSet(
        lower=lower, upper=upper, top_k_candidates=lower <= k, top_k_certain=upper <= k, critical_value=float(c)
    )


def bootstrap_pvalues(samples: Tensor) -> Tensor:
    """One-sided bootstrap p-values for H0: Delta(l) <= 0 vs H1: Delta(l) > 0.

    ``p_l = (1 + #{r : Delta*_rl <= 0}) / (R + 1)``, the inversion of the one-sided percentile
    interval (reject at level alpha iff the lower (1 - alpha) percentile bound is > 0, up to the
    +1 finite-sample correction) :cite:`efron1993introduction`. samples (R, P) -> (P,).
    """
    r = samples.shape[0]
    return (1 + (samples <= 0).sum(0)).to(samples.dtype) / (r + 1)


def holm(pvalues: Tensor, alpha: float = 0.05) -> tuple[Tensor, Tensor]:
    """Holm's step-down multiple-testing correction :cite:`holm1979simple`.

    With ordered p-values ``p_(1) <= ... <= p_(P)``, adjusted
    ``p~_(i) = max_{j <= i} min(1, (P - j + 1) p_(j))``; reject H_(i) iff ``p~_(i) <= alpha``,
    controlling the family-wise error rate at alpha.

    Returns:
        (adjusted p-values (P,), reject (P,) bool), in the input order.
    """
    _check_alpha(alpha)
    m = pvalues.shape[0]
    order = torch.argsort(pvalues, stable=True)
    factors = torch.arange(m, 0, -1, device=pvalues.device, dtype=pvalues.dtype)
    adj_sorted = torch.cummax((factors * pvalues[order]).clamp(max=1), dim=0).values
    adjusted = torch.empty_like(pvalues)
    adjusted[order] = adj_sorted
    return adjusted, adjusted <= alpha


def pareto_front(cost: Tensor, value: Tensor) -> Tensor:
    """Pareto-optimal points for minimising ``cost`` and maximising ``value``.

    Point j is dominated iff some i has ``cost_i <= cost_j`` and ``value_i >= value_j`` with at
    least one strict. cost, value (P,) -> bool (P,) (True = on the front).
    """
    if cost.shape != value.shape or cost.ndim != 1:
        raise ValueError(f"cost and value must be 1-D of equal length; got {tuple(cost.shape)}, {tuple(value.shape)}")
    le = cost[:, None] <= cost[None, :]
    ge = value[:, None] >= value[None, :]
    strict = (cost[:, None] < cost[None, :]) | (value[:, None] > value[None, :])
    dominated = (le & ge & strict).any(0)
    return ~dominated


def kendall_tau_b(a: Tensor, b: Tensor) -> Tensor:
    """Kendall's τ-b :cite:`kendall1938new` between rows of ``a`` and ``b`` (..., P) → (...,).

    ``τ_b = Σ_{i<j} sgn(a_i − a_j) sgn(b_i − b_j) / sqrt((n_0 − n_a)(n_0 − n_b))`` with
    ``n_0 = P(P−1)/2`` and ``n_a``, ``n_b`` the tied pairs of ``a`` and ``b`` (NaN if either row is constant).
    """
    if a.shape != b.shape or a.shape[-1] < 2:
        raise ValueError(f"a and b must have the same shape (..., P) with P >= 2; got {tuple(a.shape)}, {tuple(b.shape)}")
    p = a.shape[-1]
    iu = torch.triu_indices(p, p, 1, device=a.device)
    sa = torch.sign(a[..., iu[0]] - a[..., iu[1]])
    sb = torch.sign(b[..., iu[0]] - b[..., iu[1]])
    den = (sa.abs().sum(-1) * sb.abs().sum(-1)).sqrt()
    return (sa * sb).sum(-1) / den
