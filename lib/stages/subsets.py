"""Stage ``subsets``: the predictions of one seed's named posteriors and of temperature scaling,
and the validation-tuned covariance scale κ_S and bootstrap ECE of every one of the 2^L block
subsets (the values of :func:`lib.attribution.shapley`), from the seed's perturbation banks
(:mod:`lib.stages.banks`)."""

from __future__ import annotations

import shutil

import pandas as pd
import torch
from torch import Tensor
from tqdm import tqdm

from lib.artifacts import Stage, cached
from lib.calibration import calibration_summary, ece_from_weights
from lib.config import Config
from lib.laplace.predictive import Bank, iter_subset_probs, standard_subsets
from lib.laplace.scale import example_nll, scale_grid, validation_nll
from lib.pipeline import MapRun, numerics
from lib.resample import bootstrap_counts
from lib.shapley import antithetic_permutations, coalitions
from lib.temperature import apply_temperature, fit_temperature

SUBSET_PART = 256
"""Block subsets per resumable part of the ``subsets`` stage (κ tuning and bootstrap ECEs)."""


def evaluated_subsets(cfg: Config, n_blocks: int) -> Tensor:
    """Bitmasks (sorted, long) of the block subsets whose κ_S and bootstrap ECEs the stage computes:
    all 2^L when ``stats.shapley_permutations`` is None (exact Shapley values), else the prefixes of
    the sampled orderings (:func:`lib.shapley.coalitions`) and the named posteriors
    (:func:`lib.laplace.predictive.standard_subsets`)."""
    n = cfg.stats.shapley_permutations
    if n is None:
        return torch.arange(2**n_blocks)
    masks = torch.stack(list(standard_subsets(n_blocks).values()))
    named = (masks.long() << torch.arange(n_blocks)).sum(1)
    return torch.cat([coalitions(antithetic_permutations(n_blocks, n)), named]).unique()


def _scales(cfg: Config, val_bank: Bank | None, subsets: Tensor, val_weights: Tensor | None) -> dict[str, Tensor]:
    """Covariance scales ``scale`` κ (S,) of bool ``subsets`` (S, L), with the validation NLL over
    the grid ``nll`` (S, G) and at κ = 1 ``unit`` (S,) when they are tuned (NaN otherwise), and
    ``chosen`` (R+1, S): the grid index of κ_S re-tuned under each row of validation multiplicities
    ``val_weights`` (R+1, N_val) (row 0 all ones: the study's κ_S), i.e. the weighted argmin of the
    per-example validation NLL (:func:`lib.laplace.scale.example_nll`); all zeros when not tuned."""
    pc = cfg.predictive
    S = subsets.shape[0]
    if pc.scale == "none":
        nan = torch.full((S,), float("nan"), dtype=torch.float64)
        return {"scale": torch.ones(S, dtype=torch.float64), "nll": nan[:, None], "unit": nan,
                "chosen": torch.zeros(cfg.stats.n_boot_shapley + 1, S, dtype=torch.int64)}
    grid = scale_grid(pc.scale_range[0], pc.scale_range[1], pc.scale_points)
    per_example = example_nll(val_bank, subsets, grid, method=pc.method).double()  # (S, G, N_val), CPU
    nll = per_example.mean(-1)
    chosen = torch.einsum("rn,sgn->rsg", val_weights, per_example.to(val_weights.device)).argmin(-1).cpu()
    chosen[0] = nll.argmin(1)  # the study's κ_S exactly as lib.laplace.scale.tune_scales chooses it
    unit = validation_nll(val_bank, subsets, torch.ones(1, dtype=torch.float64), method=pc.method)[:, 0]
    return {"scale": grid[chosen[0]], "nll": nll, "unit": unit, "chosen": chosen}


VALIDATION_SEED = 0
"""Seed of the validation resamples of the ``subsets`` stage: the same for every training seed,
which share one validation split."""

TEST_SEED = 1
"""Seed of the test-image resamples of the ``subsets`` stage: the same for every training seed,
which share one test set, so that the seed average of a replicate resamples the test images once
(as :func:`lib.stats.tuned_bootstrap` does)."""


def subset_predictions(
    cfg: Config, run: MapRun, bank: Bank, bank_stage: Stage, device: torch.device,
    val: tuple[Stage, Bank] | None = None,
) -> Stage:
    """Named posteriors' probabilities + metrics, temperature scaling, and all-subset bootstrap ECEs.

    ``val``: the validation bank (stage, bank), needed when ``predictive.scale`` is ``'val_nll'``;
    every subset then predicts with its own covariance scale ``κ_S`` (:mod:`lib.laplace.scale`).
    The subsets evaluated are :func:`evaluated_subsets` (all 2^L, or those that sampled orderings
    of the blocks visit); the columns of the others are NaN.

    Files: ``named.pt`` {names, masks (P, L), scales (P,), probs (P, N, C), labels, det (N, C),
    ts (N, C), temperature}; ``metrics.csv`` (one row per named posterior and 'temperature
    scaling', with its ``scale``); ``scales.csv`` (per named posterior: κ, validation NLL at κ and
    at κ = 1, test metrics at κ = 1); ``subset_ece.pt`` (R+1, 2^L): ECE of every block subset (bit
    ℓ of the column index ⇔ block ℓ Bayesian) at its κ_S on the test set (row 0) and on R
    bootstrap replicates (rows 1..R) that resample the test images (from :data:`TEST_SEED`) and the
    validation images (from :data:`VALIDATION_SEED`), on which each subset's κ_S is re-tuned (the
    replicate's ECE is at that re-tuned κ_S, ``subset_scales_boot.pt`` (R+1, 2^L); with
    ``predictive.scale: none`` κ = 1 throughout; ``subset_scales.pt`` (2^L): κ_S), the K posterior samples held fixed; a replicate's
    resamples are shared by all subsets and by all seeds, so differences between subsets are paired
    and :func:`lib.attribution.shapley` averages the replicates over seeds.

    Resumable: κ_S and the bootstrap ECEs are computed in parts of :data:`SUBSET_PART` subsets,
    each saved (``parts/<start>-<stop>.pt``, atomically) as it finishes; the bootstrap resamples
    are drawn before the first part, so a resumed stage equals one run without interruption.
    """
    sc, pc = cfg.stats, cfg.predictive
    if pc.scale != "none" and val is None:
        raise ValueError("predictive.scale is 'val_nll' but no validation bank was given; "
                         "pass val=(stage, bank) of the seed's 'bank_val' stage")
    scale_inputs = {k: getattr(pc, k) for k in ("method", "scale", "scale_range", "scale_points")}
    # Only the stats fields this stage uses: changing an interval level or bootstrap size that the
    # chapters apply later must not recompute the predictions of all 2^L subsets.
    # "resample" names what the bootstrap rows of subset_ece.pt resample, so that caches written
    # when they resampled test images only are not reused.
    stats_inputs = {"n_bins": sc.n_bins, "n_boot_shapley": sc.n_boot_shapley, "shapley_permutations": sc.shapley_permutations,
                    "resample": "test images and validation images shared by the seeds (κ_S re-tuned), samples fixed"}

    def compute(st: Stage) -> None:
        method = pc.method
        bank_dev = bank.to(device)
        val_dev = val[1].to(device) if val is not None else None
        labels = bank_dev.labels
        n, L = len(labels), bank.n_blocks
        todo = evaluated_subsets(cfg, L)
        bits = ((todo[:, None] >> torch.arange(L)) & 1).bool()  # row i: the subset with bitmask todo[i]

        R = sc.n_boot_shapley
        # Row 0: the test set itself; rows 1..R: bootstrap multiplicities of the test images, from their
        # own generator, so the same for every seed (which share the test set) and every subset.
        tg = torch.Generator(device=device).manual_seed(TEST_SEED)
        images = torch.cat([torch.ones(1, n, device=device), bootstrap_counts(n, R, tg, torch.float32, device)])
        # Validation multiplicities from their own generator (the same for every seed); row 0: the whole set.
        val_weights = None
        if pc.scale != "none":
            n_val = val[1].labels.shape[0]
            vg = torch.Generator(device=device).manual_seed(VALIDATION_SEED)
            val_weights = torch.cat([torch.ones(1, n_val, dtype=torch.float64, device=device),
                                     bootstrap_counts(n_val, R, vg, torch.float64, device)])
        grid = (scale_grid(pc.scale_range[0], pc.scale_range[1], pc.scale_points) if pc.scale != "none"
                else torch.ones(1, dtype=torch.float64))
        # Every subset's κ_S and bootstrap ECEs, in parts of SUBSET_PART subsets saved as they finish
        # (an interrupted stage resumes from the first missing part).
        parts = []
        for start in tqdm(range(0, len(todo), SUBSET_PART), desc="subset parts", disable=None):
            stop = min(start + SUBSET_PART, len(todo))
            path = st.file(f"parts/{start:05d}-{stop:05d}.pt")
            if path.is_file():
                parts.append(torch.load(path, weights_only=True))
                continue
            part = _scales(cfg, val_dev, bits[start:stop], val_weights)
            ece_part = torch.empty(R + 1, stop - start)
            # Per grid value, the subsets that choose it in some replicate; keep the replicates that do.
            for gi in part["chosen"].unique().tolist():
                cols = (part["chosen"] == gi).any(0).nonzero().squeeze(1)
                for rows_, p in iter_subset_probs(bank_dev, bits[start:stop][cols].to(device), method=method,
                                                  scales=grid[gi].expand(len(cols))):
                    conf, pred = p.max(-1)  # (s, N)
                    e = ece_from_weights(conf, (pred == labels).to(conf.dtype), images, sc.n_bins).cpu()  # (R+1, s)
                    sub = cols[rows_]
                    ece_part[:, sub] = torch.where(part["chosen"][:, sub] == gi, e, ece_part[:, sub])
            part["ece"] = ece_part
            torch.save(part, path.with_suffix(".tmp"))
            path.with_suffix(".tmp").replace(path)
            parts.append(part)
        def table(values: Tensor) -> Tensor:  # (..., len(todo)) → (..., 2^L) indexed by bitmask, NaN where not evaluated
            full = torch.full((*values.shape[:-1], 2**L), float("nan"), dtype=values.dtype)
            full[..., todo] = values
            return full

        all_scales = table(torch.cat([p["scale"] for p in parts]))
        all_nll = table(torch.cat([p["nll"] for p in parts]).T).T
        all_unit = table(torch.cat([p["unit"] for p in parts]))
        torch.save(table(grid[torch.cat([p["chosen"] for p in parts], dim=1)]), st.file("subset_scales_boot.pt"))
        out = table(torch.cat([p["ece"] for p in parts], dim=1))

        named = standard_subsets(L)
        masks = torch.stack(list(named.values()))
        index = (masks.long() << torch.arange(L)).sum(1)  # each named posterior's bitmask
        scales = all_scales[index]
        probs = torch.cat([p for _, p in iter_subset_probs(bank_dev, masks, method=method, scales=scales)]).cpu()
        unscaled = torch.cat([p for _, p in iter_subset_probs(bank_dev, masks, method=method)]).cpu()
        det = torch.softmax(bank.map_logits.float(), -1)
        val_logits = torch.load(run.stage.file("val_logits.pt"), weights_only=True)
        temperature = fit_temperature(val_logits, run.splits.val.y)
        ts = apply_temperature(bank.map_logits, temperature)
        rows = [{"posterior": name, "scale": float(k), **calibration_summary(p, bank.labels, sc.n_bins)}
                for name, k, p in zip(named, scales, probs)]
        rows.append({"posterior": "temperature scaling", "scale": float("nan"),
                     **calibration_summary(ts, bank.labels, sc.n_bins)})
        pd.DataFrame(rows).to_csv(st.file("metrics.csv"), index=False)
        scale_rows = []
        for name, i, k, p in zip(named, index, scales, unscaled):
            m = calibration_summary(p, bank.labels, sc.n_bins)
            scale_rows.append({
                "posterior": name, "scale": float(k),
                "val_nll": float(all_nll[i].min()),
                "val_nll_unscaled": float(all_unit[i]),
                **{f"{key}_unscaled": m[key] for key in ("accuracy", "ece", "nll")},
            })
        pd.DataFrame(scale_rows).to_csv(st.file("scales.csv"), index=False)
        torch.save({"names": list(named), "masks": masks, "scales": scales, "probs": probs, "labels": bank.labels,
                    "det": det, "ts": ts, "temperature": temperature}, st.file("named.pt"))
        torch.save(out, st.file("subset_ece.pt"))
        torch.save(all_scales, st.file("subset_scales.pt"))
        shutil.rmtree(st.path / "parts")

    return cached("subsets", {"stats": stats_inputs, **scale_inputs, "numerics": numerics(device)},
                  code=__name__, compute=compute,
                  upstream=[bank_stage, *([val[0]] if pc.scale != "none" else [])])
