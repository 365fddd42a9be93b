"""Stage ``laplace``: the curvature of the LoRA parameters on the training split and the
evidence-tuned Laplace posterior of one seed.

The one place where ``laplace.structure`` picks the curvature: ``'kron'``/``'diag'`` through
:func:`lib.laplace.curvature.fit_curvature` (:cite:`martens2015optimizing`,
:cite:`eschenhagen2023kronecker`), ``'dense_block'`` the exact GGN of every block
(:func:`lib.laplace.exact.fit_block_ggn`); its name in words is
:attr:`lib.config.LaplaceConfig.approximation`.
"""

from __future__ import annotations

import dataclasses
import json
import time

import pandas as pd
import torch

from lib.artifacts import Stage, cached
from lib.config import Config
from lib.data import Split, batches
from lib.laplace.curvature import fit_curvature
from lib.laplace.exact import fit_block_ggn
from lib.laplace.posterior import LaplacePosterior, build_posterior
from lib.pipeline import MapRun, numerics
from lib.provenance import environment
from lib.train import amp_dtype, prior_precision, synchronize


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
    extrapolated to the N training examples (the GGN is a sum over the data). Files:
    ``posterior.pt`` (:meth:`LaplacePosterior.save`), ``blocks.csv`` (its per-block summary),
    ``info.json`` (fit time and throughput, initial prior, log evidence, environment).
    """
    _check_restricted_prior(cfg)
    lc = cfg.laplace

    def fit(st: Stage) -> None:
        train = run.splits.train
        if lc.fit_size is not None and lc.fit_size < len(train):
            idx = torch.randperm(len(train), generator=torch.Generator().manual_seed(run.seed))[: lc.fit_size]
            train = Split(train.x[idx], train.y[idx])
        delta0 = (lc.prior_init if lc.prior_init is not None
                  else prior_precision(cfg.train.weight_decay, len(run.splits.train)))
        synchronize(device)
        t0 = time.perf_counter()
        kw = dict(device=device, fisher=lc.fisher, mc_samples=lc.mc_samples,
                  generator=torch.Generator(device=device).manual_seed(run.seed), autocast_dtype=amp_dtype(device),
                  class_chunk=lc.class_chunk)
        data = batches(train, lc.batch_size, preprocess=run.preprocess, device=device)
        if lc.structure == "dense_block":
            curvature = fit_block_ggn(run.model, data, **kw)
        else:
            curvature = fit_curvature(run.model, data, structure=lc.structure, kfac=lc.kfac, **kw)
        synchronize(device)
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

    # restricted_prior is left out of the key: with per-block priors re-tuning on a subset gives each
    # block the prior it already has, and a shared prior with 'retune' is refused above, so it never
    # changes this stage's result; quality_images only feeds the curvature_quality stage.
    inputs = {k: v for k, v in dataclasses.asdict(lc).items() if k not in ("restricted_prior", "quality_images")}
    st = cached("laplace", {"laplace": inputs, "numerics": numerics(device)}, code=__name__, compute=fit,
                upstream=[run.stage])
    return st, LaplacePosterior.load(st.file("posterior.pt"), map_location=device)
