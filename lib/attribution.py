"""Cross-seed attribution of the calibration gain to transformer blocks.

From the cached per-seed predictions and perturbation banks of :mod:`lib.stages`: Δ_ECE of every
named posterior with basic bootstrap intervals over the test and validation images that the seeds
share (davison1997bootstrap) and Student-t intervals over training runs
(satterthwaite1946approximate; within one seed, percentile vs BCa over examples is compared too,
efron1987better), the accompanying NLL / Brier / accuracy changes, Holm-corrected tests of
"block ℓ improves calibration" (holm1979simple), the bootstrap distribution of the single-block
ranks with a simultaneous rank confidence set
(mogstad2024inference), exact Shapley values of the blocks (shapley1953value), and the Monte Carlo
error of Δ from the predictive's posterior samples next to its test-set error.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import pandas as pd
import torch
from scipy.stats import kendalltau

from lib.calibration import debiased_ece, ece, ece_equal_mass, prepare_reliability, smooth_ece
from lib.config import PredictiveConfig, StatsConfig
from lib.laplace.predictive import Bank, iter_subset_probs, sample_mixture
from lib.laplace.scale import example_nll, iter_grid_probs, scale_grid
from lib.resample import bootstrap_counts
from lib.stats import (
    TunedColumn,
    TunedSeed,
    basic_interval,
    basic_replicates,
    bca_interval,
    bootstrap_pvalues,
    delta_ece,
    holm,
    jackknife_delta_ece,
    mc_error_delta_ece,
    paired_bootstrap,
    percentile_interval,
    rank_confidence_set,
    rank_probabilities,
    seed_spread_interval,
    tuned_bootstrap,
)
from lib.shapley import antithetic_permutations, antithetic_standard_error, permutation_contributions, shapley_values, widen
from lib.stages.seed import SeedStudy


@dataclass(frozen=True)
class Attribution:
    """Δ_ECE of the named posteriors: ``table`` (one row per posterior), the bootstrap ``samples``
    (R, P) of the seed-averaged Δ in the order of ``table.posterior``, reflected around the estimate
    (:func:`lib.stats.basic_replicates`, so that their percentiles are the basic interval and the
    tests and rank sets built on them inherit it), and the isotropic control of every block
    (:func:`attribution`; empty when not computed)."""

    table: pd.DataFrame
    samples: torch.Tensor
    control: pd.DataFrame = dataclasses.field(default_factory=pd.DataFrame)

    def singles(self) -> pd.DataFrame:
        """Rows of the single-block posteriors, ordered by block."""
        return self.table[self.table.kind == "single"].sort_values("block").reset_index(drop=True)

    def single_samples(self) -> torch.Tensor:
        """Bootstrap samples (R, L) of the single-block Δ, columns ordered by block."""
        rows = self.table.index[self.table.kind == "single"].to_numpy()
        order = self.table.loc[rows, "block"].to_numpy().argsort()
        return self.samples[:, torch.as_tensor(rows[order])]


def _kind(name: str) -> tuple[str, int]:
    if name == "all":
        return "all", -1
    if name.startswith("single "):
        return "single", int(name.split()[1])
    if name.startswith("all but "):
        return "leave-one-out", int(name.split()[2])
    head, k = name.split()
    return f"{head}-k", int(k)


class _BankColumn:
    """Test probabilities of one subset of a bank at the scales of a grid, as
    :attr:`lib.stats.TunedColumn.probs`; keeps the per-sample softmaxes of the last scale asked for."""

    def __init__(self, bank: Bank, mask: torch.Tensor, grid: torch.Tensor, method: str):
        self.bank, self.mask, self.grid, self.method = bank, mask, grid, method
        self._last: tuple[int, object] | None = None

    def __call__(self, g: int, weights: torch.Tensor) -> torch.Tensor:
        if self._last is None or self._last[0] != g:
            self._last = (g, sample_mixture(self.bank, self.mask, method=self.method, scale=float(self.grid[g])))
        return self._last[1](weights)


TEMPERATURE_SPAN = 8.0
"""Temperature scaling in the bootstrap of :func:`attribution` re-fits ``T`` on a log grid from
``T/8`` to ``8T`` around the study's ``T`` (:data:`TEMPERATURE_POINTS` points plus ``T`` itself)."""

TEMPERATURE_POINTS = 241
"""Points of the temperature grid (steps of about 1.7% in ``T``)."""


def temperature_grid(temperature: float) -> torch.Tensor:
    """The temperatures (float64, ascending) among which a bootstrap replicate re-fits ``T``: a log
    grid over ``[T/span, T·span]`` (:data:`TEMPERATURE_SPAN`, :data:`TEMPERATURE_POINTS`) with the
    fitted ``T`` itself, so that the whole validation set chooses ``T`` again."""
    grid = temperature * torch.logspace(-1, 1, TEMPERATURE_POINTS, base=TEMPERATURE_SPAN, dtype=torch.float64)
    return torch.cat([grid, torch.tensor([temperature], dtype=torch.float64)]).unique()


def _padded(loss: torch.Tensor, n_val: int) -> torch.Tensor:
    """Per-example validation losses (..., n) padded with zeros to ``n_val`` examples: the images
    beyond the first n (``predictive.scale_images``) do not enter the choice."""
    return torch.nn.functional.pad(loss, (0, n_val - loss.shape[-1]))


def tuned_seed(study: SeedStudy, names: list[str], predictive: PredictiveConfig, device: torch.device) -> TunedSeed:
    """One seed's tuned predictives (:class:`lib.stats.TunedSeed`), in this column order: the named
    posteriors ``names`` (each over the κ grid of ``predictive``; a single κ = 1 when
    ``predictive.scale`` is ``'none'``), the isotropic control of every block (over the σ² grid
    ``predictive.control_range``), and temperature scaling (over :func:`temperature_grid`).

    The validation loss is the per-example NLL (:func:`lib.laplace.scale.example_nll`, the rule
    that chooses κ_S in :mod:`lib.stages.subsets`; for temperature scaling the NLL of ``softmax(f/T)``) on
    the validation split, padded with zeros beyond the bank's images. Uniform validation weights
    choose the study's κ_S and temperature again.
    """
    d = study.named()
    bank, val = study.test_bank().to(device), study.validation_bank().to(device)
    ctrl, ctrl_val = study.control_bank().to(device), study.control_validation_bank().to(device)
    val_logits, val_labels = (t.to(device) for t in study.validation_logits())
    n_val = len(val_labels)
    method = predictive.method
    masks = d["masks"][[d["names"].index(n) for n in names]].to(device)
    if predictive.scale == "none":
        grid = torch.ones(1, dtype=torch.float64)
        nll = torch.zeros(len(names), 1, n_val, device=device)
    else:
        grid = scale_grid(predictive.scale_range[0], predictive.scale_range[1], predictive.scale_points)
        nll = _padded(example_nll(val, masks, grid, method=method).to(device), n_val)
    columns = [TunedColumn(nll[i], _BankColumn(bank, masks[i], grid, method)) for i in range(len(names))]
    cgrid = control_grid(predictive)
    eye = torch.eye(ctrl.n_blocks, dtype=torch.bool, device=device)
    cnll = _padded(example_nll(ctrl_val, eye, cgrid, method=method).to(device), n_val)
    columns += [TunedColumn(cnll[i], _BankColumn(ctrl, eye[i], cgrid, method)) for i in range(ctrl.n_blocks)]
    temps = temperature_grid(float(d["temperature"])).to(device)
    logp = torch.log_softmax(val_logits.double()[None] / temps[:, None, None], -1)  # (G, N_val, C)
    tnll = -logp.gather(-1, val_labels.expand(len(temps), -1)[..., None]).squeeze(-1)  # (G, N_val)
    test_logits = bank.map_logits.double()
    columns.append(TunedColumn(tnll, lambda g, w: torch.softmax(test_logits / temps[g], -1).expand(w.shape[0], -1, -1)))
    return TunedSeed(d["det"].to(device).double(), d["labels"].to(device), columns, bank.delta.shape[2])


def control_grid(predictive: PredictiveConfig) -> torch.Tensor:
    """The σ² grid of the isotropic control (``predictive.control_range``, ``control_points``)."""
    return scale_grid(predictive.control_range[0], predictive.control_range[1], predictive.control_points)


def attribution(studies: list[SeedStudy], stats: StatsConfig, predictive: PredictiveConfig,
                device: torch.device) -> Attribution:
    """Δ_ECE = ECE_det − ECE_S (positive: S improves calibration) for every named posterior S, the
    same for temperature scaling and the isotropic control of every block, with paired intervals.

    Two intervals, for two targets (level 1 − ``stats.alpha``):

    - ``lower``/``upper``: the chosen models, these seeds with their posterior samples, each
      setting (κ_S, σ², T) tuned on the validation images: the basic interval
      (:func:`lib.stats.basic_interval`) of :func:`lib.stats.tuned_bootstrap`, whose replicates draw
      one test-image and one validation resample shared by every seed and re-choose every setting on
      the latter, so the interval includes the error of selecting κ_S (and σ², T). The basic
      interval subtracts the upward bias of binned ECE that the replicates repeat; its coverage of
      this target is checked by simulation (:mod:`lib.coverage`).
    - ``seed_lower``/``seed_upper``: the expected Δ over training runs, the Student-t interval of
      :func:`lib.stats.seed_spread_interval` (spread between seeds plus the shared test-image
      variance, Welch–Satterthwaite degrees of freedom); NaN with one seed.

    ``d_nll`` and ``d_brier`` are det − S (positive: better), ``d_acc`` is S − det; all means over
    seeds. ``p_holm``/``improves``: Holm-adjusted one-sided bootstrap test of Δ(ℓ) > 0 over the
    family of single-block posteriors, on the reflected replicates (the inversion of the one-sided
    basic interval). ``ts_delta``/``ts_lower``/``ts_upper``: ECE_TS − ECE_S with its basic interval
    from the same replicates (positive: S calibrates better than temperature scaling).

    ``control``: one row per block with the Laplace block's ``kappa`` and the control's ``sigma2``
    (medians over seeds), ``sigma2_edge`` (``'lower'``/``'upper'`` when the tuned σ² sits at that end
    of its grid on some seed, else ``''``), Δ of the Laplace block (``delta``, ``lower``, ``upper``),
    of the control (``delta_iso``, ``iso_lower``, ``iso_upper``) and their paired difference
    Δ_Laplace − Δ_iso (``diff``, ``diff_lower``, ``diff_upper``), with its (1 − 2α) interval
    (``tost_lower``, ``tost_upper``) for the equivalence test of :mod:`lib.equivalence`.
    """
    named = [s.named() for s in studies]
    names = [n for n in named[0]["names"] if n != "none"]
    per_seed = []
    for d in named:
        idx = torch.tensor([d["names"].index(n) for n in names])
        per_seed.append((d["det"].to(device), d["probs"][idx].to(device), d["labels"].to(device)))
    tuned = [tuned_seed(s, names, predictive, device) for s in studies]
    res = tuned_bootstrap(tuned, stats.n_boot, torch.Generator(device=device).manual_seed(0),
                          torch.Generator(device=device).manual_seed(1), n_bins=stats.n_bins)
    est = res.estimate.cpu().double()
    samples = basic_replicates(res.samples.cpu().double(), est)
    P = len(names)
    lower, upper = percentile_interval(samples[:, :P], stats.alpha)  # = basic_interval of the raw replicates
    seed_lower, seed_upper = seed_spread_interval(res.seed_estimates[:, :P].cpu().double(),
                                                  res.samples[:, :P].cpu().double(), stats.alpha)
    ts = samples[:, :P] - samples[:, -1:]  # ECE_TS − ECE_S = Δ_S − Δ_TS, reflected alike
    ts_lower, ts_upper = percentile_interval(ts, stats.alpha)
    interval = "basic; test images × validation images shared by the seeds (κ_S, σ², T re-chosen)"
    per_seed_delta = torch.stack([delta_ece(*ps, n_bins=stats.n_bins) for ps in per_seed]).cpu()
    metrics = [s.metrics().set_index("posterior") for s in studies]

    def change(col: str, sign: float) -> list[float]:
        return [sum(sign * (m.loc[n, col] - m.loc["none", col]) for m in metrics) / len(metrics) for n in names]

    table = pd.DataFrame({
        "posterior": names,
        "kind": [_kind(n)[0] for n in names],
        "block": [_kind(n)[1] for n in names],
        "delta": est[:P].numpy(),
        "lower": lower.numpy(),
        "upper": upper.numpy(),
        "seed_lower": seed_lower.numpy(),
        "seed_upper": seed_upper.numpy(),
        "seed_sd": per_seed_delta.std(0).numpy() if len(studies) > 1 else float("nan"),
        "d_nll": change("nll", -1.0),
        "d_brier": change("brier", -1.0),
        "d_acc": change("accuracy", 1.0),
        "ece": [sum(m.loc[n, "ece"] for m in metrics) / len(metrics) for n in names],
        "ts_delta": (est[:P] - est[-1]).numpy(),
        "ts_lower": ts_lower.numpy(),
        "ts_upper": ts_upper.numpy(),
        "interval": interval,
    })
    for i, s in enumerate(studies):
        table[f"delta_seed{s.seed}"] = per_seed_delta[i].numpy()
    singles = (table.kind == "single").to_numpy()
    pvals = bootstrap_pvalues(samples[:, :P])
    adj, reject = holm(pvals[torch.from_numpy(singles.copy())], stats.alpha)
    table["p_holm"] = float("nan")
    table["improves"] = False
    table.loc[singles, "p_holm"] = adj.numpy()
    table.loc[singles, "improves"] = reject.numpy()
    return Attribution(table=table, samples=samples[:, :P],
                       control=_control_table(table, tuned, names, samples, est, predictive, stats.alpha))


def _control_table(table: pd.DataFrame, tuned: list[TunedSeed], names: list[str], samples: torch.Tensor,
                   est: torch.Tensor, predictive: PredictiveConfig, alpha: float) -> pd.DataFrame:
    """The ``control`` frame of :func:`attribution` from its reflected bootstrap replicates
    (:func:`lib.stats.basic_replicates`; columns: named posteriors, then the L controls, then
    temperature scaling), whose percentile intervals are basic intervals."""
    P = len(names)
    L = len(tuned[0].columns) - P - 1
    cols = [names.index(f"single {b}") for b in range(L)]
    lap, iso = samples[:, cols], samples[:, P : P + L]
    lo, hi = percentile_interval(lap, alpha)
    ilo, ihi = percentile_interval(iso, alpha)
    dlo, dhi = percentile_interval(lap - iso, alpha)
    tlo, thi = percentile_interval(lap - iso, 2 * alpha)  # the (1 − 2α) interval of the TOST (lib.equivalence)
    kgrid = (torch.ones(1, dtype=torch.float64) if predictive.scale == "none"
             else scale_grid(predictive.scale_range[0], predictive.scale_range[1], predictive.scale_points))
    cgrid = control_grid(predictive)
    kappa = torch.stack([kgrid[torch.stack([t.columns[c].chosen().cpu() for c in cols])] for t in tuned])
    chosen = torch.stack([torch.stack([t.columns[P + b].chosen().cpu() for b in range(L)]) for t in tuned])  # (S, L)
    edge = ["lower" if bool((chosen[:, b] == 0).any()) else "upper" if bool((chosen[:, b] == len(cgrid) - 1).any())
            else "" for b in range(L)]
    return pd.DataFrame({
        "block": range(L),
        "kappa": kappa.quantile(0.5, dim=0).numpy(),
        "sigma2": cgrid[chosen].quantile(0.5, dim=0).numpy(),
        "sigma2_edge": edge,
        "delta": est[cols].numpy(), "lower": lo.numpy(), "upper": hi.numpy(),
        "delta_iso": est[P : P + L].numpy(), "iso_lower": ilo.numpy(), "iso_upper": ihi.numpy(),
        "diff": (est[cols] - est[P : P + L]).numpy(), "diff_lower": dlo.numpy(), "diff_upper": dhi.numpy(),
        "tost_lower": tlo.numpy(), "tost_upper": thi.numpy(),
    })


def validation_table(studies: list[SeedStudy], predictive: PredictiveConfig, n_bins: int,
                     device: torch.device) -> pd.DataFrame:
    """Δ_ECE on the validation images of every named posterior at its κ_S (means over seeds): the
    data on which the best single block and the recommended set are chosen (:func:`choose_single`,
    :func:`choose_set`), so that the test set, on which they are reported, plays no part in choosing
    them (no winner's curse).

    Per seed, the linearised predictive of each named posterior on the validation bank
    (:meth:`lib.stages.seed.SeedStudy.validation_bank`, the images that tuned κ_S) at its κ_S against the
    MAP ``softmax(f)`` on the same images. Columns: ``posterior``, ``kind``, ``block``, ``val_delta``.
    """
    acc = None
    for s in studies:
        d = s.named()
        names = [n for n in d["names"] if n != "none"]
        idx = [d["names"].index(n) for n in names]
        val = s.validation_bank().to(device)
        probs = torch.cat([p for _, p in iter_subset_probs(val, d["masks"][idx].to(device), method=predictive.method,
                                                           scales=d["scales"][idx])])
        det = torch.softmax(val.map_logits.double(), -1)
        delta = delta_ece(det, probs.double(), val.labels, n_bins).cpu()
        acc = delta if acc is None else acc + delta
    return _posterior_frame(names, (acc / len(studies))[:, None], ["val_delta"])


def choose_single(validation: pd.DataFrame) -> int:
    """The single block with the largest validation Δ_ECE (:func:`validation_table`; ties: the lower block)."""
    singles = validation[validation.kind == "single"].sort_values("block", kind="stable")
    return int(singles.block.iloc[int(singles.val_delta.to_numpy().argmax())])


SET_SHARE = 0.8
""":func:`choose_set` recommends the cheapest choice with at least this share of the all-block gain."""


def choose_set(validation: pd.DataFrame, cost: pd.DataFrame) -> str | None:
    """The recommended set of Bayesian blocks, chosen on validation data: among the priced choices
    (``cost``: ``name``, ``cost``, e.g. :func:`lib.figures.prepare_pareto_from_tables`), the cheapest
    whose validation Δ_ECE (:func:`validation_table`) is at least :data:`SET_SHARE` of the
    all-block one (ties in cost: the larger validation gain). None when the all-block posterior does
    not lower the validation ECE: then no choice is recommended for calibration.
    """
    val = validation.set_index("posterior").val_delta
    full = float(val["all"])
    if full <= 0:
        return None
    priced = cost[cost.name.isin(val.index)].assign(val_delta=lambda df: val.loc[df.name].to_numpy())
    good = priced[priced.val_delta >= SET_SHARE * full].sort_values(["cost", "val_delta"], ascending=[True, False],
                                                                     kind="stable")
    return str(good.name.iloc[0])


def rank_analysis(att: Attribution, stats: StatsConfig) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Rank probabilities (blocks × ranks) and per-block rank confidence intervals.

    The second frame has ``block``, ``delta``, ``rank`` (point), ``rank_lower``, ``rank_upper``
    (simultaneous 1−α), ``p_top_k`` (bootstrap probability of being in the top k),
    ``top_k_candidate`` (cannot be excluded from the top k) and ``surely_top_k``.
    """
    singles = att.singles()
    samples = att.single_samples()
    est = torch.tensor(singles.delta.to_numpy())
    probs = rank_probabilities(samples)
    blocks = [f"block {b}" for b in singles.block]
    heat = pd.DataFrame(probs.numpy(), index=blocks, columns=range(1, len(blocks) + 1))
    k = min(stats.top_k, len(blocks))
    rcs = rank_confidence_set(est, samples, k=k, alpha=stats.alpha)
    point = (-est).argsort().argsort() + 1
    ranks = pd.DataFrame({
        "block": singles.block.to_numpy(),
        "delta": est.numpy(),
        "rank": point.numpy(),
        "rank_lower": rcs.lower.numpy(),
        "rank_upper": rcs.upper.numpy(),
        "p_top_k": probs[:, :k].sum(1).numpy(),
        "top_k_candidate": rcs.top_k_candidates.numpy(),
        "surely_top_k": rcs.top_k_certain.numpy(),
    })
    return heat, ranks


def shapley(studies: list[SeedStudy], stats: StatsConfig) -> pd.DataFrame:
    """Shapley values of the blocks for v(S) = ECE_det − ECE_S, with intervals.

    Per seed, v is evaluated on the test set and on R bootstrap replicates
    (:func:`lib.stages.subsets.subset_predictions`): replicate r resamples the test images and the
    validation images (each subset's κ_S re-tuned on the latter) with the same multiplicities for
    every seed, which share both sets, and every subset, so the values are paired. The values are
    exact over all 2^L subsets (:func:`lib.shapley.shapley_values`) when
    ``stats.shapley_permutations`` is None, else means of the marginal contributions over that many
    sampled antithetic orderings of the blocks (:func:`lib.shapley.permutation_contributions`,
    the same orderings for every seed and replicate). The values and their replicates are averaged
    over seeds, as in :func:`lib.stats.tuned_bootstrap`; ``lower``/``upper`` is the basic interval
    (level 1 − ``stats.alpha``, :func:`lib.stats.basic_interval`) for these seeds,
    ``seed_lower``/``seed_upper`` the Student-t interval over training runs
    (:func:`lib.stats.seed_spread_interval`; NaN with one seed). With sampled orderings both are
    widened by the Monte Carlo error ``mc_se`` of the seed-averaged contributions
    (:func:`lib.shapley.antithetic_standard_error`, :func:`lib.shapley.widen`); exact values have
    ``mc_se`` 0.

    Returns: one row per block: ``layer``, ``block``, ``phi``, ``lower``, ``upper``,
    ``seed_lower``, ``seed_upper``, ``mc_se``.
    """
    shapes = {tuple(s.subset_ece().shape) for s in studies}
    if len(shapes) != 1:
        raise ValueError("every seed needs the same bootstrap replicates (stats.n_boot_shapley) and blocks; got "
                         f"ECE tables (R + 1, 2^L) of shapes {sorted(shapes)}")
    (_, n_subsets), = shapes
    n = stats.shapley_permutations
    perms = None if n is None else antithetic_permutations(n_subsets.bit_length() - 1, n)  # (n, L), for every seed
    per_seed, contributions = [], []
    for s in studies:
        e = s.subset_ece().double()
        v = e[:, :1] - e
        if perms is None:
            per_seed.append(shapley_values(v))  # (R + 1, L)
        else:
            c = permutation_contributions(v, perms)
            contributions.append(c)  # (R + 1, n, L)
            per_seed.append(c.mean(-2))
    both = torch.stack(per_seed)  # (S, R + 1, L)
    est, reps = both[:, 0].mean(0), both[:, 1:].mean(0)
    lo, hi = basic_interval(reps, est, stats.alpha)
    slo, shi = seed_spread_interval(both[:, 0], reps, stats.alpha)
    mc_se = torch.zeros_like(est)
    if n is not None:
        mc_se = antithetic_standard_error(torch.stack(contributions)[:, 0].mean(0))
        lo, hi = widen(est, lo, hi, mc_se, stats.alpha, n // 2 - 1)
        if len(studies) > 1:
            slo, shi = widen(est, slo, shi, mc_se, stats.alpha, n // 2 - 1)
    L = est.shape[0]
    return pd.DataFrame({"layer": [f"block {b}" for b in range(L)], "block": range(L), "phi": est.numpy(),
                         "lower": lo.numpy(), "upper": hi.numpy(), "seed_lower": slo.numpy(),
                         "seed_upper": shi.numpy(), "mc_se": mc_se.numpy()})


def cumulative(att: Attribution) -> pd.DataFrame:
    """Δ of the first-k and last-k posteriors with intervals, one row per k."""
    t = att.table
    out = {"k": sorted(t[t.kind == "first-k"].block)}
    for kind, col in (("first-k", "first_k"), ("last-k", "last_k")):
        sub = t[t.kind == kind].set_index("block").loc[out["k"]]
        out[col], out[f"{col}_lower"], out[f"{col}_upper"] = sub.delta.to_numpy(), sub.lower.to_numpy(), sub.upper.to_numpy()
    return pd.DataFrame(out)


def leave_one_out(att: Attribution) -> pd.DataFrame:
    """Δ of the all-but-ℓ posteriors, one row per removed block ℓ."""
    t = att.table[att.table.kind == "leave-one-out"].sort_values("block")
    return pd.DataFrame({"layer": [f"block {b}" for b in t.block], "block": t.block.to_numpy(),
                         "delta": t.delta.to_numpy(), "lower": t.lower.to_numpy(), "upper": t.upper.to_numpy()})


def prepare_ranked(table: pd.DataFrame) -> pd.DataFrame:
    """Single blocks and the all-block posterior of an attribution table (:attr:`Attribution.table`,
    or its saved copy) as ``layer``, ``delta``, ``lower``, ``upper`` rows for the ranked bar plot."""
    t = table[table.kind.isin(["single", "all"])]
    return pd.DataFrame({"layer": [f"block {b}" if k == "single" else "all blocks" for k, b in zip(t.kind, t.block)],
                         "delta": t.delta.to_numpy(), "lower": t.lower.to_numpy(), "upper": t.upper.to_numpy()})


def prepare_reliability_panels(study: SeedStudy, block: int, n_bins: int) -> dict:
    """Reliability data of one seed: deterministic, temperature-scaled, Bayes(block), all blocks."""
    d = study.named()
    probs = dict(zip(d["names"], d["probs"]))
    return {
        "Deterministic": prepare_reliability(d["det"], d["labels"], n_bins),
        "Temperature scaled": prepare_reliability(d["ts"], d["labels"], n_bins),
        f"Bayes (block {block})": prepare_reliability(probs[f"single {block}"], d["labels"], n_bins),
        "Bayes (all blocks)": prepare_reliability(probs["all"], d["labels"], n_bins),
    }


def prepare_scatter_panels(att: Attribution, blocks: pd.DataFrame) -> dict[str, pd.DataFrame]:
    """ΔECE of single blocks against depth, Δ accuracy, Δ NLL and the per-block curvature trace."""
    s = att.singles()
    per_block = blocks.set_index("block").loc[s.block]
    base = {"delta": s.delta.to_numpy(), "lower": s.lower.to_numpy(), "upper": s.upper.to_numpy(),
            "label": s.block.to_numpy()}
    return {
        "Block depth (index)": pd.DataFrame({"x": s.block.to_numpy(), **{k: v for k, v in base.items() if k != "label"}}),
        "Δ accuracy (pp, Bayes − det.)": pd.DataFrame({"x": 100 * s.d_acc.to_numpy(), **base}),
        "Δ NLL (nats, det. − Bayes)": pd.DataFrame({"x": s.d_nll.to_numpy(), **base}),
        "Curvature trace tr GGN$_\\ell$ (block's K-FAC)": pd.DataFrame(
            {"x": per_block.curvature_trace.to_numpy(), **base}),
    }


def interval_comparison(study: SeedStudy, stats: StatsConfig, device: torch.device) -> pd.DataFrame:
    """Percentile vs BCa intervals of the single-block Δ on one seed's test set (paired bootstrap)."""
    d = study.named()
    names = [n for n in d["names"] if n.startswith("single ")]
    idx = torch.tensor([d["names"].index(n) for n in names])
    args = (d["det"].to(device), d["probs"][idx].to(device), d["labels"].to(device))
    g = torch.Generator(device=device).manual_seed(1)
    res = paired_bootstrap(*args, stats.n_boot, g, n_bins=stats.n_bins)
    plo, phi = percentile_interval(res.samples, stats.alpha)
    blo, bhi = bca_interval(res.samples, res.estimate, jackknife_delta_ece(*args, n_bins=stats.n_bins), stats.alpha)
    return pd.DataFrame({"block": [int(n.split()[1]) for n in names], "delta": res.estimate.cpu().numpy(),
                         "percentile_lower": plo.cpu().numpy(), "percentile_upper": phi.cpu().numpy(),
                         "bca_lower": blo.cpu().numpy(), "bca_upper": bhi.cpu().numpy()})


def mc_error(study: SeedStudy, stats: StatsConfig, method: str, device: torch.device) -> pd.DataFrame:
    """Monte Carlo vs test-set error of Δ_ECE on one seed, for every single block and all blocks.

    Per posterior (at its covariance scale κ_S, with the predictive ``method``): ``delta``;
    ``mc_se``, the bootstrap standard error over the K posterior samples with the test set fixed,
    and ``halving``, the mean change of Δ when a random half of the samples is kept
    (:func:`lib.stats.mc_error_delta_ece`); ``test_se``, the standard deviation of the paired
    bootstrap over test images with the samples fixed (efron1993introduction);
    ``mc_share`` = ``mc_se / test_se``.
    """
    d = study.named()
    names = _singles_then_all(d["names"])
    idx = torch.tensor([d["names"].index(n) for n in names])
    det, labels = d["det"].to(device), d["labels"].to(device)
    g = torch.Generator(device=device).manual_seed(study.seed)
    test_se = paired_bootstrap(det, d["probs"][idx].to(device), labels, stats.n_boot, g, n_bins=stats.n_bins).samples.std(0)
    bank = study.test_bank().to(device)
    rows = []
    for name, i, se in zip(names, idx.tolist(), test_se.cpu().tolist()):
        mix = sample_mixture(bank, d["masks"][i], method=method, scale=float(d["scales"][i]))
        res = mc_error_delta_ece(det, labels, mix, bank.delta.shape[2], stats.n_boot_mc, g, n_bins=stats.n_bins)
        rows.append({"posterior": name, "block": _kind(name)[1], "delta": float(res.estimate),
                     "mc_se": float(res.se), "halving": float(res.halving), "test_se": se,
                     "mc_share": float(res.se) / se if se > 0 else float("nan")})
    return pd.DataFrame(rows)


ESTIMATORS = ("equal-width ECE", "equal-mass ECE", "debiased ℓ2 ECE", "smooth ECE")
"""The calibration-error estimators of :func:`estimator_robustness`; the first is the study's."""


def _calibration_errors(probs: torch.Tensor, labels: torch.Tensor, n_bins: int) -> list[float]:
    """The :data:`ESTIMATORS` of one predictive (N, C), in that order."""
    return [float(ece(probs, labels, n_bins)), float(ece_equal_mass(probs, labels, n_bins)),
            float(debiased_ece(probs, labels, n_bins)), float(smooth_ece(probs, labels))]


def _single_and_all(names: list[str]) -> list[str]:
    """The single-block and all-block posteriors among ``names``, in their order."""
    return [n for n in names if n == "all" or n.startswith("single ")]


def _singles_then_all(names: list[str]) -> list[str]:
    """The single-block posteriors among ``names`` ordered by block, then ``'all'``."""
    return sorted((n for n in names if n.startswith("single ")), key=lambda n: int(n.split()[1])) + ["all"]


def _posterior_frame(names: list[str], values: torch.Tensor, columns: list[str]) -> pd.DataFrame:
    """``posterior``, ``kind``, ``block`` of each of ``names`` followed by ``values`` (P, len(columns))."""
    out = pd.DataFrame(values.numpy(), columns=columns)
    out.insert(0, "block", [_kind(n)[1] for n in names])
    out.insert(0, "kind", [_kind(n)[0] for n in names])
    out.insert(0, "posterior", names)
    return out


def estimator_robustness(studies: list[SeedStudy], n_bins: int) -> pd.DataFrame:
    """Δ = CE_det − CE_S of the single-block and all-block posteriors under every calibration-error
    estimator of :data:`ESTIMATORS` (point estimates, means over seeds).

    Equal-width binned ECE (guo2017calibration), equal-mass binned ECE (nixon2019measuring), the
    debiased binned ℓ2 error of kumar2019verified (on the ℓ2 scale, so its Δ is not comparable in
    size with the others), and the smooth ECE of blasiok2023smooth, which has no bins. Columns:
    ``posterior``, ``kind``, ``block`` and one per estimator.
    """
    rows = None
    for s in studies:
        d = s.named()
        names = _single_and_all(d["names"])
        det = _calibration_errors(d["det"], d["labels"], n_bins)
        deltas = torch.tensor([[a - b for a, b in zip(det, _calibration_errors(d["probs"][d["names"].index(n)],
                                                                                d["labels"], n_bins))] for n in names])
        rows = deltas if rows is None else rows + deltas
    return _posterior_frame(names, rows / len(studies), list(ESTIMATORS))


def ranking_agreement(table: pd.DataFrame, columns: tuple[str, ...]) -> pd.DataFrame:
    """How the single-block ranking under each of ``columns[1:]`` compares with ``columns[0]``.

    ``table``: one row per posterior with ``kind`` (``'single'`` rows ranked, the ``'all'`` row's
    sign compared) and ``block``, and a Δ column per name in ``columns``. One row per alternative
    column (``estimator``): Kendall's τ between the single-block Δ under it and under the
    reference (kendall1938new; τ-b, ties counted) with the number of block pairs the two order
    differently (``discordant`` of ``pairs``), the block ranked first under each, the number of
    blocks whose Δ has the same sign under both, and whether the all-block Δ has the same sign.
    """
    singles = table[table.kind == "single"].sort_values("block")
    full = table[table.kind == "all"].iloc[0]
    base = singles[columns[0]].to_numpy()
    i, j = torch.triu_indices(len(base), len(base), 1).numpy()
    rows = []
    for est in columns[1:]:
        alt = singles[est].to_numpy()
        rows.append({"estimator": est, "kendall_tau": float(kendalltau(base, alt).statistic),
                     "discordant": int(((base[i] - base[j]) * (alt[i] - alt[j]) < 0).sum()), "pairs": len(i),
                     "top_block": int(singles.block.iloc[alt.argmax()]),
                     "top_block_study": int(singles.block.iloc[base.argmax()]),
                     "same_sign": int(((base > 0) == (alt > 0)).sum()), "blocks": len(singles),
                     "all_same_sign": bool((full[columns[0]] > 0) == (full[est] > 0))})
    return pd.DataFrame(rows)


def estimator_agreement(table: pd.DataFrame) -> pd.DataFrame:
    """:func:`ranking_agreement` of the :data:`ESTIMATORS` columns of :func:`estimator_robustness`."""
    return ranking_agreement(table, ESTIMATORS)


SCALES = ("own κ_S", "shared κ_all", "κ = 1")
"""The covariance scalings of :func:`scale_sensitivity`; the first is the study's."""


def scale_sensitivity(studies: list[SeedStudy], n_bins: int, method: str, device: torch.device) -> pd.DataFrame:
    """Δ_ECE of the single-block and all-block posteriors under three covariance scalings (point
    estimates, means over seeds): each subset at its own validation-tuned κ_S (the study's), every
    subset at the all-block posterior's κ_all (one width for all, so subsets differ only in which
    blocks carry covariance), and the evidence posterior as it is (κ = 1) (ritter2018scalable).
    Columns: ``posterior``, ``kind``, ``block``, one per :data:`SCALES`, and ``kappa_own`` (median of
    κ_S over seeds, the midpoint of the two middle values for an even number of seeds, as in
    :func:`lib.report.scale_table`).
    """
    acc, kappas = None, []
    for s in studies:
        d = s.named()
        names = _single_and_all(d["names"])
        idx = [d["names"].index(n) for n in names]
        bank = s.test_bank().to(device)
        det, labels = d["det"].to(device), d["labels"].to(device)
        masks = d["masks"][idx].to(device)
        shared = torch.full((len(idx),), float(d["scales"][d["names"].index("all")]), dtype=torch.float64)
        probs = [d["probs"][idx].to(device),
                 torch.cat([p for _, p in iter_subset_probs(bank, masks, method=method, scales=shared)]),
                 torch.cat([p for _, p in iter_subset_probs(bank, masks, method=method)])]
        deltas = torch.stack([delta_ece(det, p.to(det.dtype), labels, n_bins).cpu() for p in probs], 1)
        acc = deltas if acc is None else acc + deltas
        kappas.append(d["scales"][idx])
    out = _posterior_frame(names, (acc / len(studies)).double(), list(SCALES))
    out["kappa_own"] = torch.stack(kappas).double().quantile(0.5, dim=0).numpy()
    return out


def scale_selection(studies: list[SeedStudy], att: Attribution, stats: StatsConfig, predictive: PredictiveConfig,
                    device: torch.device, *, seed: int) -> pd.DataFrame:
    """How much Δ_ECE moves when κ_S alone is tuned on another draw of the validation images.

    The intervals of :func:`attribution` include this error together with the others; this table
    isolates it. The validation images are resampled with replacement, ``R = stats.n_boot`` times
    (multinomial weights ``w_r`` (N_val,), drawn from ``seed``; the same weights for every seed,
    which share one validation split), κ_S is re-tuned on each resample,
    ``κ_S^(r) = argmin_{κ ∈ grid} Σ_n w_rn · nll_n(S, κ)`` (:func:`lib.laplace.scale.example_nll`,
    the study's grid and predictive), and Δ_ECE of S is evaluated at ``κ_S^(r)`` on the full test
    set with the samples fixed. The spread of these replicates (means over seeds) is the part of
    the uncertainty that comes from selecting κ_S (efron1993introduction).

    Rows: single blocks (by block) and all blocks. Columns: ``posterior``, ``kind``, ``block``,
    ``kappa`` (κ_S, median over seeds), ``stable`` (share of replicates × seeds that select κ_S
    again), ``delta`` (Δ at κ_S, mean over seeds: the study's estimate), ``sel_lower`` /
    ``sel_upper`` (α/2 and 1 − α/2 quantiles of the re-tuned Δ), ``sel_se`` (their standard
    deviation), ``boot_se`` (standard deviation of ``att``'s bootstrap replicates),
    ``sel_share`` = ``sel_se / boot_se``, ``lower`` / ``upper`` (``att``'s interval) and ``n_val``
    (validation images). The replicates of ``att`` (:func:`attribution`) re-tune κ_S themselves, so
    ``sel_share`` is the part of the intervals' spread that the choice of κ_S alone would make. With
    ``predictive.scale: none`` nothing is tuned and the table is empty.
    """
    if predictive.scale == "none":
        return pd.DataFrame(columns=["posterior", "kind", "block", *SELECTION_COLUMNS, "lower", "upper", "n_val"])
    grid = scale_grid(predictive.scale_range[0], predictive.scale_range[1], predictive.scale_points)
    names = _singles_then_all(att.table.posterior.tolist())
    g = torch.Generator(device=device).manual_seed(seed)
    weights = None
    shifted, stable, kappas = 0.0, 0.0, []
    for s in studies:
        d = s.named()
        idx = [d["names"].index(n) for n in names]
        masks = d["masks"][idx].to(device)
        nll = example_nll(s.validation_bank().to(device), masks, grid, method=predictive.method)
        if weights is None:
            weights = bootstrap_counts(nll.shape[-1], stats.n_boot, g, torch.float32, device).cpu()
        own = nll.double().mean(-1).argmin(-1)  # (S,): the study's κ_S, tuned on the whole validation set
        chosen = torch.einsum("rn,sgn->rsg", weights, nll).argmin(-1)  # (R, S)
        bank = s.test_bank().to(device)
        det, labels = d["det"].to(device), d["labels"].to(device)
        probs = iter_grid_probs(bank, masks, grid, method=predictive.method)
        on_grid = torch.cat([delta_ece(det, p.to(det.dtype), labels, stats.n_bins).cpu() for _, p in probs])
        on_grid = on_grid.reshape(len(idx), len(grid)).double()  # (S, G): test Δ at every grid κ
        shifted = shifted + on_grid.gather(1, chosen.T).T / len(studies)  # (R, S)
        stable = stable + (chosen == own).double().mean(0) / len(studies)
        kappas.append(grid[own])
    cols = [att.table.posterior.tolist().index(n) for n in names]
    boot_se = att.samples[:, cols].double().std(0)
    lower, upper = shifted.quantile(torch.tensor([stats.alpha / 2, 1 - stats.alpha / 2], dtype=torch.float64), dim=0)
    sel_se = shifted.std(0)
    values = torch.stack([torch.stack(kappas).quantile(0.5, dim=0), stable,
                          torch.as_tensor(att.table.delta.to_numpy()[cols], dtype=torch.float64),
                          lower, upper, sel_se, boot_se, sel_se / boot_se], 1)
    out = _posterior_frame(names, values, list(SELECTION_COLUMNS))
    out["lower"], out["upper"] = att.table.lower.to_numpy()[cols], att.table.upper.to_numpy()[cols]
    out["n_val"] = nll.shape[-1]
    return out


SELECTION_COLUMNS = ("kappa", "stable", "delta", "sel_lower", "sel_upper", "sel_se", "boot_se", "sel_share")
"""The value columns of :func:`scale_selection`."""


def estimators_coincide(table: pd.DataFrame, rtol: float = 1e-6) -> bool:
    """Whether equal-width and equal-mass binning give the same Δ for every posterior of
    :func:`estimator_robustness`. They do when every model errs in the same direction at every
    confidence (all bin residuals of one sign): each binned ECE then reduces to |mean confidence −
    accuracy|, whatever the bins, and the comparison says nothing about binning."""
    base = table[ESTIMATORS[0]].to_numpy()
    scale = max(float(abs(base).max()), 1e-12)
    return float(abs(table[ESTIMATORS[1]].to_numpy() - base).max()) <= rtol * scale


def block_subsets(n_blocks: int) -> dict[str, list[int]]:
    """The block choices the deployment chapter prices: single blocks, first-k, last-k (k ≥ 2)."""
    out = {f"single {b}": [b] for b in range(n_blocks)}
    out.update({f"first {k}": list(range(k)) for k in range(2, n_blocks)})
    out.update({f"last {k}": list(range(n_blocks - k, n_blocks)) for k in range(2, n_blocks)})
    out["all"] = list(range(n_blocks))
    return out
