"""The study per training seed — Laplace fit, perturbation bank, subset predictions — as cached stages.

``map`` (:mod:`lib.pipeline`) → ``laplace`` (curvature + tuned prior, :mod:`lib.laplace`) →
``bank`` (per-block GLM logit perturbations of the test set; ``bank_val`` the same for the
validation images, which tune the covariance scale, :mod:`lib.laplace.scale`, and choose the best
blocks, :func:`lib.attribution.validation_table`; ``bank_iso`` and ``bank_iso_val`` those of the
isotropic control, :mod:`lib.laplace.isotropic`) → ``subsets``
(predictive probabilities of the study's named posteriors, temperature-scaling baseline, and the
bootstrap ECE of all 2^L block subsets for Shapley values). Each stage records where it was computed.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import time
from dataclasses import dataclass

import pandas as pd
import torch
from torch import Tensor
from tqdm import tqdm

from lib.artifacts import Stage, stage
from lib.calibration import calibration_summary, weighted_ece
from lib.config import Config
from lib.data import Split, batches
from lib.laplace.curvature import fit_curvature
from lib.laplace.exact import fit_block_ggn
from lib.laplace.isotropic import IsotropicPosterior
from lib.laplace.posterior import LaplacePosterior, build_posterior
from lib.laplace.quality import prepare_curvature_quality
from lib.laplace.predictive import Bank, iter_subset_mixtures, iter_subset_probs, perturbation_bank, standard_subsets
from lib.laplace.scale import example_nll, scale_grid, validation_nll
from lib.pipeline import MapRun, map_run, numerics
from lib.provenance import environment
from lib.stats import bootstrap_counts
from lib.temperature import apply_temperature, fit_temperature
from lib.train import amp_dtype, prior_precision


@dataclass
class SeedStudy:
    """All cached stages of one training seed (``val_bank``: the validation images' bank, which tunes
    κ_S and chooses blocks; ``control`` / ``control_val``: the isotropic control's test and
    validation banks)."""

    seed: int
    run: MapRun
    posterior: LaplacePosterior
    laplace: Stage
    bank: Stage
    subsets: Stage
    val_bank: Stage
    control: Stage
    control_val: Stage

    def named(self) -> dict:
        """The named posteriors' predictions: {names, masks (P, L), scales (P,), probs (P, N, C),
        labels (N,), det (N, C), ts (N, C), temperature} (see :func:`subset_predictions`)."""
        return torch.load(self.subsets.file("named.pt"), weights_only=True)

    def metrics(self) -> pd.DataFrame:
        """Test metrics per named posterior and temperature scaling (``metrics.csv``)."""
        return pd.read_csv(self.subsets.file("metrics.csv"))

    def scales(self) -> pd.DataFrame:
        """Per named posterior: κ_S, validation NLL at κ_S and κ = 1, test metrics at κ = 1."""
        return pd.read_csv(self.subsets.file("scales.csv"))

    def subset_ece(self) -> torch.Tensor:
        """ECE (R+1, 2^L) of every block subset: row 0 the test set, rows 1..R bootstrap replicates."""
        return torch.load(self.subsets.file("subset_ece.pt"), weights_only=True)

    def test_bank(self) -> Bank:
        """The perturbation bank of the test set (CPU fp32)."""
        return _load_bank(self.bank)

    def validation_bank(self) -> Bank:
        """The perturbation bank of the validation images that tune κ_S (CPU fp32)."""
        return _load_bank(self.val_bank)

    def control_bank(self) -> Bank:
        """The isotropic control's perturbation bank of the test set, unit variance (CPU fp32)."""
        return _load_bank(self.control)

    def control_validation_bank(self) -> Bank:
        """The isotropic control's bank of the validation images that tune its σ² (CPU fp32)."""
        return _load_bank(self.control_val)

    def validation_logits(self) -> tuple[Tensor, Tensor]:
        """MAP logits (N_val, C) and labels (N_val,) of the whole validation split (temperature scaling's data)."""
        return torch.load(self.run.stage.file("val_logits.pt"), weights_only=True), self.run.splits.val.y


def _load_bank(st: Stage) -> Bank:
    """The bank a ``bank`` / ``bank_val`` stage saved (``bank.pt``, CPU fp32)."""
    return Bank(**torch.load(st.file("bank.pt"), weights_only=True))


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


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
    extrapolated to the N training examples (the GGN is a sum over the data). ``laplace.structure``
    ``'kron'``/``'diag'``: :func:`lib.laplace.curvature.fit_curvature`; ``'dense_block'``: the
    exact GGN of every block (:func:`lib.laplace.exact.fit_block_ggn`, blocks independent of each other).
    """
    _check_restricted_prior(cfg)
    lc = cfg.laplace
    # restricted_prior is left out of the key: with per-block priors re-tuning on a subset gives each
    # block the prior it already has, and a shared prior with 'retune' is refused above, so it never
    # changes this stage's result; quality_images only feeds the curvature_quality stage.
    inputs = {k: v for k, v in dataclasses.asdict(lc).items() if k not in ("restricted_prior", "quality_images")}
    st = stage("laplace", {"laplace": inputs, "numerics": numerics(device)}, upstream=[run.stage])
    if st.done:
        return st, LaplacePosterior.load(st.file("posterior.pt"), map_location=device)
    train = run.splits.train
    if lc.fit_size is not None and lc.fit_size < len(train):
        idx = torch.randperm(len(train), generator=torch.Generator().manual_seed(run.seed))[: lc.fit_size]
        train = Split(train.x[idx], train.y[idx])
    delta0 = lc.prior_init if lc.prior_init is not None else prior_precision(cfg.train.weight_decay, len(run.splits.train))
    _sync(device)
    t0 = time.perf_counter()
    kw = dict(device=device, fisher=lc.fisher, mc_samples=lc.mc_samples,
              generator=torch.Generator(device=device).manual_seed(run.seed), autocast_dtype=amp_dtype(device),
              class_chunk=lc.class_chunk)
    data = batches(train, lc.batch_size, preprocess=run.preprocess, device=device)
    if lc.structure == "dense_block":
        curvature = fit_block_ggn(run.model, data, **kw)
    else:
        curvature = fit_curvature(run.model, data, structure=lc.structure, kfac=lc.kfac, **kw)
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


def curvature_quality(cfg: Config, run: MapRun, device: torch.device) -> tuple[Stage, pd.DataFrame]:
    """Curvature-quality table of one seed (:func:`lib.laplace.quality.prepare_curvature_quality`), cached.

    K-FAC-expand, K-FAC-reduce and the diagonal GGN against the exact GGN of every block, all
    fitted (exact output vectors, float32 forward) on the first ``laplace.quality_images`` images
    of the training split and extrapolated to all of it (as :func:`fit_laplace` extrapolates
    ``fit_size``); the logit variances on the first ``laplace.quality_images`` validation images.
    File: ``quality.csv``.
    """
    lc = cfg.laplace
    if lc.quality_images < 1:
        raise ValueError("laplace.quality_images is 0: the curvature-quality table is switched off; set it ≥ 1")
    inputs = {"images": lc.quality_images, "batch_size": lc.batch_size, "class_chunk": lc.class_chunk,
              "numerics": numerics(device)}
    st = stage("curvature_quality", inputs, upstream=[run.stage])
    if st.done:
        return st, pd.read_csv(st.file("quality.csv"))
    n = lc.quality_images
    fit = Split(run.splits.train.x[:n], run.splits.train.y[:n])
    val = Split(run.splits.val.x[:n], run.splits.val.y[:n])
    _sync(device)
    t0 = time.perf_counter()
    table = prepare_curvature_quality(
        run.model, list(batches(fit, lc.batch_size, preprocess=run.preprocess, device=device)),
        batches(val, lc.batch_size, preprocess=run.preprocess, device=device),
        device=device, n_data=len(run.splits.train), class_chunk=lc.class_chunk,
    )
    _sync(device)
    table.insert(0, "seed", run.seed)
    table.to_csv(st.file("quality.csv"), index=False)
    st.file("info.json").write_text(json.dumps({
        "seconds": time.perf_counter() - t0, "fit_images": len(fit), "val_images": len(val),
        "environment": environment(),
    }, indent=1))
    st.mark_done()
    return st, table


BANK_PART_IMAGES = 1024
"""Images per resumable part of a perturbation bank (rounded up to whole batches of
``predictive.batch_size``, so that the parts batch the images exactly as one pass would)."""


def build_bank(
    cfg: Config, run: MapRun, post: LaplacePosterior, lap: Stage, device: torch.device, split: str = "test",
    control: bool = False,
) -> tuple[Stage, Bank]:
    """The per-block perturbation bank of the ``'test'`` or ``'val'`` split (cached, CPU fp32).

    The validation bank (for the covariance scale, ``predictive.scale``, and the choice of blocks on
    validation data, :func:`lib.attribution.validation_table`) covers the first
    ``predictive.scale_images`` validation images (all when None). ``control``: the bank of the
    isotropic control :meth:`IsotropicPosterior.like` ``(post)`` instead (stages ``bank_iso`` /
    ``bank_iso_val``, keyed by the Laplace stage like the Laplace banks, so they are recomputed
    whenever the posterior is), with unit variance: its noise size enters as a scale.

    Resumable: the images are processed in parts of about :data:`BANK_PART_IMAGES`, each saved
    (``parts/<start>-<stop>.pt``, named by its image range and written atomically) as soon as it
    is done; an interrupted stage resumes from the first missing part, and a part whose range no
    longer matches (another part size) is never joined. Every part uses the same posterior
    samples (they depend on the seed and the block only,
    :func:`lib.laplace.predictive.block_generator`) and the same batches, so the joined bank
    equals one computed in a single pass.
    """
    pc = cfg.predictive
    data = {"test": run.splits.test, "val": run.splits.val}[split]
    if split == "val" and pc.scale_images is not None:
        data = Split(data.x[: pc.scale_images], data.y[: pc.scale_images])
    # "map_logits" names where the bank's f_MAP comes from (see below), so that banks which kept
    # the logits of their own forward pass are not reused.
    name = ("bank_iso" if control else "bank") + ("" if split == "test" else "_val")
    inputs = {"n_samples": pc.n_samples, "batch_size": pc.batch_size, "split": split, "images": len(data),
              "map_logits": "map stage", "numerics": numerics(device)}
    if control:
        inputs["posterior"] = "isotropic N(0, I)"
        post = IsotropicPosterior.like(post)
    st = stage(name, inputs, upstream=[lap])
    if st.done:
        return st, _load_bank(st)
    per_part = pc.batch_size * -(-BANK_PART_IMAGES // pc.batch_size)
    starts = list(range(0, len(data), per_part))
    parts, seconds, resumed = [], 0.0, 0
    for start in tqdm(starts, desc=f"{split} bank parts", disable=None):
        stop = min(start + per_part, len(data))
        path = st.file(f"parts/{start:07d}-{stop:07d}.pt")
        if path.is_file():
            part = torch.load(path, weights_only=True)
            resumed += 1
        else:
            chunk = Split(data.x[start:stop], data.y[start:stop])
            _sync(device)
            t0 = time.perf_counter()
            bank = perturbation_bank(
                run.model, post, batches(chunk, pc.batch_size, preprocess=run.preprocess, device=device),
                n_samples=pc.n_samples, seed=run.seed, device=device,
                dtype=amp_dtype(device) or torch.float32,
            )
            _sync(device)
            part = {"bank": dataclasses.asdict(bank), "seconds": time.perf_counter() - t0}
            torch.save(part, path.with_suffix(".tmp"))
            path.with_suffix(".tmp").replace(path)
        parts.append(Bank(**part["bank"]))
        seconds += part["seconds"]
    labels = torch.cat([b.labels for b in parts])
    bank = Bank(map_logits=_map_logits(run, split, len(data), labels), labels=labels,
                delta=torch.cat([b.delta for b in parts], dim=1), blocks=parts[0].blocks)
    torch.save(dataclasses.asdict(bank), st.file("bank.pt"))
    st.file("info.json").write_text(json.dumps({
        "seconds": seconds, "images": len(data), "split": split, "n_samples": pc.n_samples,
        "blocks": list(bank.blocks), "parts": len(starts), "parts_resumed": resumed, "environment": environment(),
    }, indent=1))
    shutil.rmtree(st.path / "parts")
    st.mark_done()
    return st, bank


def _map_logits(run: MapRun, split: str, n: int, labels: Tensor) -> Tensor:
    """The MAP logits (n, C) of the first ``n`` images of ``split``, as the MAP stage saved them
    (``test_logits.pt`` / ``val_logits.pt``, :func:`lib.train.predict_logits`).

    They are the bank's ``f_MAP`` rather than the logits of the bank's own forward pass, which runs
    without fused attention and in other batches and so differs from them by rounding (visibly under
    bf16 autocast on a GPU): ECE_det is then one number, the deterministic model's of the setup
    chapter, in every table, and every predictive ``f_MAP + J δθ`` is centred on it.
    """
    logits = torch.load(run.stage.file(f"{split}_logits.pt"), weights_only=True)[:n].float()
    y = {"test": run.splits.test, "val": run.splits.val}[split].y[:n]
    if logits.shape[0] != n or not torch.equal(y.cpu(), labels.cpu()):
        raise ValueError(f"{run.stage.path}/{split}_logits.pt does not hold the {split} images of the bank in order; "
                         "delete the map stage to recompute it")
    return logits


SUBSET_PART = 256
"""Block subsets per resumable part of the ``subsets`` stage (κ tuning and bootstrap ECEs)."""


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


def subset_predictions(
    cfg: Config, run: MapRun, bank: Bank, bank_stage: Stage, device: torch.device,
    val: tuple[Stage, Bank] | None = None,
) -> Stage:
    """Named posteriors' probabilities + metrics, temperature scaling, and all-subset bootstrap ECEs.

    ``val``: the validation bank (stage, bank), needed when ``predictive.scale`` is ``'val_nll'``;
    every subset then predicts with its own covariance scale ``κ_S`` (:mod:`lib.laplace.scale`).

    Files: ``named.pt`` {names, masks (P, L), scales (P,), probs (P, N, C), labels, det (N, C),
    ts (N, C), temperature}; ``metrics.csv`` (one row per named posterior and 'temperature
    scaling', with its ``scale``); ``scales.csv`` (per named posterior: κ, validation NLL at κ and
    at κ = 1, test metrics at κ = 1); ``subset_ece.pt`` (R+1, 2^L): ECE of every block subset (bit
    ℓ of the column index ⇔ block ℓ Bayesian) at its κ_S on the test set (row 0) and on R
    bootstrap replicates (rows 1..R) that resample the test images, independently the K posterior
    samples of the predictive, and the validation images, on which each subset's κ_S is re-tuned
    (the replicate's ECE is at that re-tuned κ_S, ``subset_scales_boot.pt`` (R+1, 2^L); with
    ``predictive.scale: none`` κ = 1 throughout); a replicate's resamples are shared by all
    subsets, so differences between subsets are paired. :func:`lib.attribution.shapley` adds the
    seed level.

    Resumable: κ_S and the bootstrap ECEs are computed in parts of :data:`SUBSET_PART` subsets,
    each saved (``parts/<start>-<stop>.pt``, atomically) as it finishes; the bootstrap resamples
    are drawn before the first part, so a resumed stage equals one run without interruption.
    """
    sc, pc = cfg.stats, cfg.predictive
    if pc.scale != "none" and val is None:
        raise ValueError("predictive.scale is 'val_nll' but no validation bank was given; use run_seed")
    scale_inputs = {k: getattr(pc, k) for k in ("method", "scale", "scale_range", "scale_points")}
    # Only the stats fields this stage uses: changing an interval level or bootstrap size that the
    # chapters apply later must not recompute the predictions of all 2^L subsets.
    # "resample" names what the bootstrap rows of subset_ece.pt resample, so that caches written
    # when they resampled test images only are not reused.
    stats_inputs = {"n_bins": sc.n_bins, "n_boot_shapley": sc.n_boot_shapley,
                    "resample": "test images, posterior samples, validation images (κ_S re-tuned)"}
    st = stage("subsets", {"stats": stats_inputs, **scale_inputs, "numerics": numerics(device)},
               upstream=[bank_stage, *([val[0]] if pc.scale != "none" else [])])
    if st.done:
        return st
    method = pc.method
    bank_dev = bank.to(device)
    val_dev = val[1].to(device) if val is not None else None
    labels = bank_dev.labels
    n, L = len(labels), bank.n_blocks
    bits = ((torch.arange(2**L)[:, None] >> torch.arange(L)) & 1).bool()  # row s: the subset with bitmask s

    g = torch.Generator(device=device).manual_seed(run.seed)
    R, K = sc.n_boot_shapley, bank.delta.shape[2]
    # Row 0: the test set and the K samples themselves; rows 1..R: bootstrap multiplicities of the
    # test images and, independently, of the posterior samples (shared by all subsets).
    images = torch.cat([torch.ones(1, n, device=device), bootstrap_counts(n, R, g, torch.float32, device)])
    samples = torch.cat([torch.ones(1, K, device=device), bootstrap_counts(K, R, g, torch.float32, device)]) / K
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
    for start in tqdm(range(0, 2**L, SUBSET_PART), desc="subset parts", disable=None):
        stop = min(start + SUBSET_PART, 2**L)
        path = st.file(f"parts/{start:05d}-{stop:05d}.pt")
        if path.is_file():
            parts.append(torch.load(path, weights_only=True))
            continue
        part = _scales(cfg, val_dev, bits[start:stop], val_weights)
        ece_part = torch.empty(R + 1, stop - start)
        # Per grid value, the subsets that choose it in some replicate; keep the replicates that do.
        for gi in part["chosen"].unique().tolist():
            cols = (part["chosen"] == gi).any(0).nonzero().squeeze(1)
            for rows_, reps, p in iter_subset_mixtures(bank_dev, bits[start:stop][cols].to(device), samples,
                                                       method=method, scales=grid[gi].expand(len(cols))):
                conf, pred = p.max(-1)  # (s, r, N)
                e = weighted_ece(conf, (pred == labels).to(conf.dtype), images[reps], sc.n_bins).T.cpu()
                sub = cols[rows_]
                ece_part[reps, sub] = torch.where(part["chosen"][reps][:, sub] == gi, e, ece_part[reps, sub])
        part["ece"] = ece_part
        torch.save(part, path.with_suffix(".tmp"))
        path.with_suffix(".tmp").replace(path)
        parts.append(part)
    all_scales, all_nll, all_unit = (torch.cat([p[k] for p in parts]) for k in ("scale", "nll", "unit"))
    torch.save(grid[torch.cat([p["chosen"] for p in parts], dim=1)], st.file("subset_scales_boot.pt"))
    out = torch.cat([p["ece"] for p in parts], dim=1)

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
    st.mark_done()
    return st


def run_seed(cfg: Config, seed: int, device: torch.device) -> SeedStudy:
    """Every stage of one seed, computing only what is not cached yet."""
    run = map_run(cfg, seed, device)
    lap, post = fit_laplace(cfg, run, device)
    bank_stage, bank = build_bank(cfg, run, post, lap, device)
    val = build_bank(cfg, run, post, lap, device, split="val")
    subsets = subset_predictions(cfg, run, bank, bank_stage, device, val)
    control, _ = build_bank(cfg, run, post, lap, device, control=True)
    control_val, _ = build_bank(cfg, run, post, lap, device, split="val", control=True)
    return SeedStudy(seed, run, post, lap, bank_stage, subsets, val[0], control, control_val)


def run_all(cfg: Config, device: torch.device) -> list[SeedStudy]:
    """:func:`run_seed` for every seed of the profile."""
    return [run_seed(cfg, s, device) for s in cfg.seeds]
