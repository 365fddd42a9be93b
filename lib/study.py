"""The study per training seed — Laplace fit, perturbation bank, subset predictions — as cached stages.

``map`` (:mod:`lib.pipeline`) → ``laplace`` (curvature + tuned prior, :mod:`lib.laplace`) →
``bank`` (per-block GLM logit perturbations of the test set) → ``subsets`` (predictive
probabilities of the study's named posteriors, temperature-scaling baseline, and the bootstrap
ECE of all 2^L block subsets for Shapley values). Each stage records where it was computed.
"""

from __future__ import annotations

import dataclasses
import json
import time
from dataclasses import dataclass

import pandas as pd
import torch

from lib.artifacts import Stage, stage
from lib.calibration import calibration_summary, ece_from_weights
from lib.config import Config
from lib.data import Split, batches
from lib.laplace.curvature import fit_curvature
from lib.laplace.posterior import LaplacePosterior, build_posterior
from lib.laplace.predictive import Bank, iter_subset_probs, perturbation_bank, standard_subsets
from lib.pipeline import MapRun, map_run
from lib.provenance import environment
from lib.temperature import apply_temperature, fit_temperature
from lib.train import prior_precision


@dataclass
class SeedStudy:
    """All cached stages of one training seed."""

    seed: int
    run: MapRun
    posterior: LaplacePosterior
    laplace: Stage
    bank: Stage
    subsets: Stage

    def named(self) -> dict:
        return torch.load(self.subsets.file("named.pt"), weights_only=True)

    def metrics(self) -> pd.DataFrame:
        return pd.read_csv(self.subsets.file("metrics.csv"))

    def subset_ece(self) -> torch.Tensor:
        return torch.load(self.subsets.file("subset_ece.pt"), weights_only=True)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def _amp(device: torch.device) -> torch.dtype | None:
    return torch.bfloat16 if device.type == "cuda" else None


def _check_restricted_prior(cfg: Config) -> None:
    lc = cfg.laplace
    if lc.restricted_prior == "retune" and not lc.prior_per_block:
        raise ValueError(
            "laplace.restricted_prior: 'retune' with prior_per_block: false makes every block's "
            "covariance depend on the subset S, which the per-block perturbation bank cannot reuse; "
            "set prior_per_block: true (then retune = inherit) or restricted_prior: inherit"
        )


def fit_laplace(cfg: Config, run: MapRun, device: torch.device) -> tuple[Stage, LaplacePosterior]:
    """Curvature on the training split and the marginal-likelihood-tuned posterior of one seed.

    With ``laplace.fit_size`` < N the curvature is computed on a random subset of that size and
    extrapolated to the N training examples (the GGN is a sum over the data).
    """
    _check_restricted_prior(cfg)
    lc = cfg.laplace
    st = stage("laplace", {"laplace": dataclasses.asdict(lc)}, upstream=[run.stage])
    if st.done:
        return st, LaplacePosterior.load(st.file("posterior.pt"), map_location=device)
    train = run.splits.train
    if lc.fit_size is not None and lc.fit_size < len(train):
        idx = torch.randperm(len(train), generator=torch.Generator().manual_seed(run.seed))[: lc.fit_size]
        train = Split(train.x[idx], train.y[idx])
    delta0 = lc.prior_init if lc.prior_init is not None else prior_precision(cfg.train.weight_decay, len(run.splits.train))
    _sync(device)
    t0 = time.perf_counter()
    curvature = fit_curvature(
        run.model, batches(train, lc.batch_size, preprocess=run.preprocess, device=device),
        structure=lc.structure, device=device, kfac=lc.kfac, fisher=lc.fisher, mc_samples=lc.mc_samples,
        generator=torch.Generator(device=device).manual_seed(run.seed), autocast_dtype=_amp(device),
    )
    _sync(device)
    fit_s = time.perf_counter() - t0
    if len(train) < len(run.splits.train):
        curvature = curvature.scaled(len(run.splits.train))
    post = build_posterior(curvature, prior_precision=delta0, prior_tuning=lc.prior_tuning,
                           prior_per_block=lc.prior_per_block, rank=lc.rank)
    post.save(st.file("posterior.pt"))
    pd.DataFrame(post.summary()).to_csv(st.file("blocks.csv"), index=False)
    st.file("info.json").write_text(json.dumps({
        "fit_seconds": fit_s, "fit_images": len(train), "fit_images_per_s": len(train) / fit_s,
        "prior_init": delta0, "log_marginal_likelihood": float(post.log_marginal_likelihood()),
        "environment": environment(),
    }, indent=1))
    st.mark_done()
    return st, post


def build_bank(cfg: Config, run: MapRun, post: LaplacePosterior, lap: Stage, device: torch.device) -> tuple[Stage, Bank]:
    """The per-block perturbation bank of the test split (cached, CPU fp32)."""
    pc = cfg.predictive
    st = stage("bank", {"predictive": dataclasses.asdict(pc)}, upstream=[lap])
    if st.done:
        return st, Bank(**torch.load(st.file("bank.pt"), weights_only=True))
    _sync(device)
    t0 = time.perf_counter()
    bank = perturbation_bank(
        run.model, post, batches(run.splits.test, pc.batch_size, preprocess=run.preprocess, device=device),
        n_samples=pc.n_samples, seed=run.seed, device=device,
        dtype=torch.bfloat16 if device.type == "cuda" else torch.float32,
    )
    _sync(device)
    seconds = time.perf_counter() - t0
    torch.save(dataclasses.asdict(bank), st.file("bank.pt"))
    st.file("info.json").write_text(json.dumps({
        "seconds": seconds, "images": len(run.splits.test), "n_samples": pc.n_samples,
        "blocks": list(bank.blocks), "environment": environment(),
    }, indent=1))
    st.mark_done()
    return st, bank


def subset_predictions(cfg: Config, run: MapRun, bank: Bank, bank_stage: Stage, device: torch.device) -> Stage:
    """Named posteriors' probabilities + metrics, temperature scaling, and all-subset bootstrap ECEs.

    Files: ``named.pt`` {names, masks (P, L), probs (P, N, C), labels, det (N, C), ts (N, C),
    temperature}; ``metrics.csv`` (one row per named posterior and 'temperature scaling');
    ``subset_ece.pt`` (R+1, 2^L): ECE of every block subset (bit ℓ of the column index ⇔ block ℓ
    Bayesian) on the test set (row 0) and on R paired bootstrap resamples of it (rows 1..R, the
    same resamples for every subset).
    """
    sc, method = cfg.stats, cfg.predictive.method
    st = stage("subsets", {"stats": dataclasses.asdict(sc), "method": method}, upstream=[bank_stage])
    if st.done:
        return st
    bank_dev = Bank(bank.map_logits.to(device), bank.labels.to(device), bank.delta.to(device), bank.blocks)
    labels = bank_dev.labels
    named = standard_subsets(bank.n_blocks)
    masks = torch.stack(list(named.values()))
    probs = torch.cat([p for _, p in iter_subset_probs(bank_dev, masks, method=method)]).cpu()
    det = torch.softmax(bank.map_logits.float(), -1)
    val_logits = torch.load(run.stage.file("val_logits.pt"), weights_only=True)
    temperature = fit_temperature(val_logits, run.splits.val.y)
    ts = apply_temperature(bank.map_logits, temperature)
    rows = [{"posterior": n, **calibration_summary(p, bank.labels, sc.n_bins)} for n, p in zip(named, probs)]
    rows.append({"posterior": "temperature scaling", **calibration_summary(ts, bank.labels, sc.n_bins)})
    pd.DataFrame(rows).to_csv(st.file("metrics.csv"), index=False)
    torch.save({"names": list(named), "masks": masks, "probs": probs, "labels": bank.labels, "det": det,
                "ts": ts, "temperature": temperature}, st.file("named.pt"))

    n, L = len(labels), bank.n_blocks
    g = torch.Generator(device=device).manual_seed(run.seed)
    draws = torch.randint(n, (sc.n_boot_shapley, n), generator=g, device=device)
    weights = torch.zeros(sc.n_boot_shapley + 1, n, device=device)
    weights[0] = 1  # row 0: the test set itself; rows 1..R: bootstrap multiplicities
    weights[1:].scatter_add_(1, draws, torch.ones_like(draws, dtype=weights.dtype))
    bits = (torch.arange(2**L, device=device)[:, None] >> torch.arange(L, device=device)) & 1
    out = torch.empty(sc.n_boot_shapley + 1, 2**L)
    for rows_, p in iter_subset_probs(bank_dev, bits.bool(), method=method):
        conf, pred = p.max(-1)
        correct = (pred == labels).to(conf.dtype)
        out[:, rows_] = ece_from_weights(conf, correct, weights, sc.n_bins).cpu()
    torch.save(out, st.file("subset_ece.pt"))
    st.mark_done()
    return st


def run_seed(cfg: Config, seed: int, device: torch.device) -> SeedStudy:
    """Every stage of one seed, computing only what is not cached yet."""
    run = map_run(cfg, seed, device)
    lap, post = fit_laplace(cfg, run, device)
    bank_stage, bank = build_bank(cfg, run, post, lap, device)
    subsets = subset_predictions(cfg, run, bank, bank_stage, device)
    return SeedStudy(seed, run, post, lap, bank_stage, subsets)


def run_all(cfg: Config, device: torch.device) -> list[SeedStudy]:
    """:func:`run_seed` for every seed of the profile."""
    return [run_seed(cfg, s, device) for s in cfg.seeds]
