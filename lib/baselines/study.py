"""The baselines of a study beside its restricted Laplace posteriors: the analysis behind the
chapter "Baselines" (an analysis taking a :class:`lib.study.Study`, imported only by the chapters
that show it).

:func:`priced_latency`: the latency of every priced block choice (:func:`lib.attribution.block_subsets`)
on the first seed, one cached ``latency`` stage (:func:`lib.deploy.cached_latency`), so the
baselines and deployment chapters price the Laplace posteriors with the same measurement.

:func:`baseline_study`: per seed, every method of :data:`lib.baselines.run.METHODS` (each a cached
stage of its own module, computed from the seed's MAP run ``study.seed(s).run``), the MAP model,
temperature scaling and the named Laplace posteriors (their test probabilities from the seed's
``subsets`` stage, their validation ones from its validation bank at the same κ_S); a ``+ TS``
row for every baseline (:func:`lib.baselines.table.with_temperature`); and the seed-mean table of
:func:`lib.baselines.table.baseline_table` with paired intervals against MAP and temperature
scaling. Cost of a Laplace row: its latency from :func:`priced_latency`, its training the Laplace
fit (``fit_seconds`` of the ``laplace`` stage), its stored floats the K posterior samples of its
blocks' LoRA weights that a server keeps (:class:`lib.deploy.GLMPredictor`).

:func:`importance_study`: the per-block importance scores (:func:`lib.baselines.importance.importance_scores`,
averaged over the seeds) against ΔECE(ℓ) of the study's attribution, with Kendall τ-b intervals.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import pandas as pd
import torch
from tqdm import tqdm

from lib.attribution import block_subsets, choose_set, choose_single
from lib.baselines.importance import importance_scores, importance_table
from lib.baselines.result import BaselineResult, baseline_seeds, baselines_config
from lib.baselines.run import METHODS, method_predictions
from lib.baselines.table import TS_SUFFIX, MethodPredictions, baseline_table, with_temperature
from lib.baselines.variational import pruning_table
from lib.data import batches
from lib.deploy import cached_latency
from lib.laplace.predictive import iter_subset_probs
from lib.model import lora_modules
from lib.names import display_name
from lib.stages.seed import SeedStudy
from lib.temperature import apply_temperature

VARIATIONAL = "variational LoRA"
"""The name of the variational LoRA's method and rows (:data:`lib.baselines.run.METHODS`)."""
UNPRUNED = "rank-wise Gaussian-dropout LoRA"
"""The true name of the variational LoRA's rows when its pruning removed no rank on any seed: then it
is BayesLoRA's rank-wise variational dropout without the pruning that its name promises."""
MAP, TS = "MAP", "temperature scaling"
"""The two reference rows of the table."""
LAPLACE = "Laplace, "
"""Prefix of the Laplace rows: ``'Laplace, <label>'`` for each posterior passed to :func:`baseline_study`."""


def priced_latency(study: Any) -> pd.DataFrame:
    """:func:`lib.deploy.latency_table` of the deterministic model and every priced block choice
    on the first seed of ``study`` (a :class:`lib.study.Study`), batch ``deploy.batch_size`` of its
    test images, measured once (cached stage ``latency``)."""
    cfg, device = study.cfg, study.device
    first: SeedStudy = study.seed(cfg.seeds[0])
    x, _ = next(iter(batches(first.run.splits.test, cfg.deploy.batch_size, preprocess=first.run.preprocess,
                             device=device)))
    return cached_latency(first.run.model, first.posterior, x, block_subsets(len(first.posterior.blocks)),
                          n_samples=cfg.predictive.n_samples, seed=first.seed, device=device,
                          n_warmup=cfg.deploy.n_warmup, n_iters=cfg.deploy.n_iters,
                          upstream=[first.run.stage, first.laplace])


def chosen_posteriors(study: Any, latency: pd.DataFrame) -> dict[str, str]:
    """The restricted Laplace posteriors the baselines and shift chapters report, row label → named
    posterior: all blocks; the validation-chosen set (:func:`lib.attribution.choose_set` over the
    priced choices of ``latency``, left out when it is all blocks or when none is chosen); the
    validation-chosen single block (:func:`lib.attribution.choose_single`); one row for both when
    the chosen set is that block."""
    att, validation = study.attribution, study.validation
    priced = latency[latency.posterior != "deterministic"].set_index("posterior")
    cost = pd.DataFrame({"name": [n for n in priced.index if n in set(att.table.posterior)]})
    cost["cost"] = priced.loc[cost.name, "extra_ms"].to_numpy(float)
    choice, best = choose_set(validation, cost), choose_single(validation)
    single = f"single {best}"
    out = {"all blocks": "all"}
    if choice == single:
        out[f"validation-chosen set and block ({display_name(single)})"] = single
        return out
    if choice is not None and choice != "all":
        out[f"validation-chosen set ({display_name(choice)})"] = choice
    out[f"validation-chosen block ({display_name(single)})"] = single
    return out


def stored_floats(seed: SeedStudy, blocks: list[int], n_samples: int) -> int:
    """Floats a server keeps for the linearised predictive of ``blocks``: K samples of their LoRA weights."""
    return n_samples * sum(m.A.weight.numel() + m.B.weight.numel() for m in lora_modules(seed.run.model)
                           if m.block in blocks)


def _laplace_val_probs(seed: SeedStudy, names: list[str], method: str, device: torch.device) -> torch.Tensor:
    """(P, N_val, C): the named posteriors ``names`` on the validation bank at their κ_S."""
    named = seed.named()
    idx = [list(named["names"]).index(n) for n in names]
    bank = seed.validation_bank().to(device)
    return torch.cat([p.cpu() for _, p in iter_subset_probs(bank, named["masks"][idx].to(device), method=method,
                                                            scales=named["scales"][idx])])


def _stack(rows: list[MethodPredictions], **cost) -> MethodPredictions:
    """The per-seed predictions of one method as one (S, N, C) row with the seeds' mean cost."""
    mean = lambda vals: None if any(v is None for v in vals) else sum(vals) / len(vals)  # noqa: E731
    return MethodPredictions(
        val=torch.stack([r.val for r in rows]), test=torch.stack([r.test for r in rows]),
        ms_per_image=mean([r.ms_per_image for r in rows]), peak_mib=mean([r.peak_mib for r in rows]),
        train_seconds=mean([r.train_seconds for r in rows]), extra_params=int(mean([r.extra_params for r in rows])),
        **cost)


@dataclass(frozen=True)
class BaselineStudy:
    """What :func:`baseline_study` returns.

    Attributes:
        table: :func:`lib.baselines.table.baseline_table` over the seeds (rows: MAP, temperature
            scaling, the Laplace rows, every baseline row and its ``+ TS`` row; the variational
            LoRA's rows are named :data:`UNPRUNED` when it pruned no rank on any seed).
        results: per seed (``cfg.seeds`` order), the :class:`~lib.baselines.result.BaselineResult`
            of every method of :data:`lib.baselines.run.METHODS`.
        training: one row per method: ``method``, ``training`` (how it was trained), ``epochs``,
            ``lr`` (peak), ``l2``, ``augment``, ``train_seconds`` (mean over seeds), ``tuning`` (its
            validation step).
        pruning: the variational LoRA's pruning log, :func:`lib.baselines.variational.pruning_table`
            per seed with a ``seed`` column (empty when no pruning epoch ran).
        ranks: per seed the variational LoRA's LoRA ranks before and after training (``seed``,
            ``ranks_before``, ``ranks_after``).
        ensemble: per seed and ensemble size the member seeds and the cost (``seed``, ``members``,
            ``member_seeds``, ``extra_train_seconds``, ``forward_passes``, ``extra_params``).
    """

    table: pd.DataFrame
    results: list[list[BaselineResult]]
    training: pd.DataFrame
    pruning: pd.DataFrame
    ranks: pd.DataFrame
    ensemble: pd.DataFrame


def baseline_study(study: Any, posteriors: Mapping[str, str], latency: pd.DataFrame) -> BaselineStudy:
    """The baselines of ``study`` (a :class:`lib.study.Study` whose profile has a ``baselines``
    section) beside MAP, temperature scaling and the Laplace posteriors ``posteriors`` (row label →
    named posterior, e.g. ``{'all blocks': 'all', 'validation-chosen block (block 1 only)': 'single 1'}``;
    each becomes the row ``'Laplace, <label>'``), priced with ``latency`` (:func:`priced_latency`).
    Intervals: ``stats.n_boot`` resamples of the test images at level 1 − ``stats.alpha``, shared by
    the seeds (module docstring)."""
    cfg, device = study.cfg, study.device
    bc = baselines_config(cfg)
    lat = latency.set_index("posterior")
    missing = [n for n in posteriors.values() if n not in lat.index]
    if missing:
        raise ValueError(f"posteriors {missing} are not priced in latency; pass priced_latency(study) and priced choices")
    per_seed: list[dict[str, MethodPredictions]] = []
    results: list[list[BaselineResult]] = []
    seeds = baseline_seeds(cfg)
    jobs = [(s, name) for s in seeds for name in METHODS]
    done: dict[int, list[BaselineResult]] = {}
    for s, name in tqdm(jobs, desc="baselines (seed, method)", disable=None):
        done.setdefault(s, []).append(METHODS[name](cfg, study.seed(s).run, device))
    ranks = _ranks(done, seeds)
    honest = {} if (ranks.ranks_before > ranks.ranks_after).any() else {VARIATIONAL: UNPRUNED}
    val_y = test_y = None
    for s in seeds:
        seed: SeedStudy = study.seed(s)
        named = seed.named()
        val_logits, val_y = seed.validation_logits()
        test_y = named["labels"]
        det_ms = float(lat.loc["deterministic", "ms_per_image"])
        det_mem = lat.loc["deterministic", "peak_mib"]
        rows = {MAP: MethodPredictions(val_logits.float().softmax(-1), named["det"], det_ms,
                                       None if pd.isna(det_mem) else float(det_mem)),
                TS: MethodPredictions(apply_temperature(val_logits, float(named["temperature"])).float(), named["ts"],
                                      det_ms, None if pd.isna(det_mem) else float(det_mem), extra_params=1,
                                      tuning="temperature", temperature=float(named["temperature"]))}
        val = _laplace_val_probs(seed, list(posteriors.values()), cfg.predictive.method, device)
        fit_seconds = json.loads(seed.laplace.file("info.json").read_text())["fit_seconds"]
        for (label, name), v in zip(posteriors.items(), val):
            k = list(named["names"]).index(name)
            row = lat.loc[name]
            blocks = [int(b) for b in str(row.blocks).split()]
            rows[LAPLACE + label] = MethodPredictions(
                v, named["probs"][k], float(row.ms_per_image), None if pd.isna(row.peak_mib) else float(row.peak_mib),
                train_seconds=fit_seconds, extra_params=stored_floats(seed, blocks, cfg.predictive.n_samples),
                tuning="κ_S on validation NLL" if cfg.predictive.scale != "none" else "none")
        trained = {_renamed(k, honest): v for k, v in method_predictions(done[s]).items()}
        rows.update(with_temperature(trained, val_y))
        per_seed.append(rows)
        results.append(done[s])
    methods = {name: _stack([r[name] for r in per_seed], tuning=per_seed[0][name].tuning,
                            temperature=_mean_or_none([r[name].temperature for r in per_seed]))
               for name in per_seed[0]}
    table = baseline_table(methods, val_y, test_y, n_bins=cfg.stats.n_bins, n_resamples=cfg.stats.n_boot,
                           seed=cfg.seeds[0], alpha=cfg.stats.alpha)
    return BaselineStudy(table, results, _training(results, honest), _pruning(results, seeds), ranks,
                         _ensemble(results, seeds))


def _renamed(name: str, honest: Mapping[str, str]) -> str:
    for old, new in honest.items():
        if name.startswith(old):
            return new + name[len(old):]
    return name


def _mean_or_none(vals: list[float | None]) -> float | None:
    return None if any(v is None for v in vals) else sum(vals) / len(vals)


def _training(results: list[list[BaselineResult]], honest: Mapping[str, str]) -> pd.DataFrame:
    out = []
    for res in results[0]:
        t = res.cost["training"]
        for name in map(lambda n: _renamed(n, honest), res.rows):
            secs = [r.cost["train_seconds"] for seed in results for r in seed if r.method == res.method]
            out.append({"method": name, "training": t["kind"], "epochs": t.get("epochs"), "lr": t.get("lr"),
                        "l2": t.get("l2"), "augment": t.get("augment"), "train_seconds": sum(secs) / len(secs),
                        "tuning": f"none; '{name}{TS_SUFFIX}': temperature on validation NLL"})
    return pd.DataFrame(out)


def _pruning(results: list[list[BaselineResult]], seeds) -> pd.DataFrame:
    logs = []
    for s, seed in zip(seeds, results):
        res = next(r for r in seed if r.method == VARIATIONAL)
        log = json.loads(res.stage.file("prune_log.json").read_text())
        if log:
            logs.append(pruning_table(log).assign(seed=s))
    return pd.concat(logs, ignore_index=True) if logs else pd.DataFrame()


def _ranks(done: Mapping[int, list[BaselineResult]], seeds) -> pd.DataFrame:
    rows = []
    for s in seeds:
        res = next(r for r in done[s] if r.method == VARIATIONAL)
        rows.append({"seed": s, "ranks_before": res.cost["ranks_before"], "ranks_after": res.cost["ranks"]})
    return pd.DataFrame(rows)


def _ensemble(results: list[list[BaselineResult]], seeds) -> pd.DataFrame:
    out = []
    for s, seed in zip(seeds, results):
        res = next(r for r in seed if r.method == "LoRA ensemble")
        for m, c in res.cost["sizes"].items():
            out.append({"seed": s, "members": int(m), "member_seeds": " ".join(map(str, res.cost["member_seeds"][: int(m)])),
                        **{k: v for k, v in c.items() if k != "members"}})
    return pd.DataFrame(out)


@dataclass(frozen=True)
class ImportanceStudy:
    """Per-block importance scores against ΔECE(ℓ).

    Attributes:
        blocks: one row per block: ``block``, ``delta`` (ΔECE(ℓ) of the attribution), and one
            column per score (the mean over seeds).
        tau: :func:`lib.baselines.importance.importance_table` (``score``, ``kendall_tau``,
            ``lower``, ``upper``).
    """

    blocks: pd.DataFrame
    tau: pd.DataFrame


def importance_study(study: Any) -> ImportanceStudy:
    """The importance scores of every seed's MAP model (cached ``baseline_importance`` stages),
    averaged over the seeds, against the single-block ΔECE of ``study.attribution``; τ-b intervals
    from the attribution's bootstrap replicates (:func:`lib.baselines.importance.kendall_tau_interval`)."""
    cfg, device = study.cfg, study.device
    per_seed = [importance_scores(cfg, study.seed(s).run, device)[1]
                for s in tqdm(cfg.seeds, desc="importance scores (seed)", disable=None)]
    scores = {k: torch.stack([p[k] for p in per_seed]).mean(0) for k in per_seed[0]}
    att = study.attribution
    singles = att.singles()
    delta = torch.tensor(singles.delta.to_numpy(), dtype=torch.float64)
    blocks = pd.DataFrame({"block": singles.block.to_numpy(), "delta": singles.delta.to_numpy(),
                           **{k: v.numpy() for k, v in scores.items()}})
    return ImportanceStudy(blocks, importance_table(scores, delta, att.single_samples(), cfg.stats.alpha))
