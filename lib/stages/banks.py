"""Stages ``bank``, ``bank_val``, ``bank_iso``, ``bank_iso_val``: the per-block GLM logit
perturbations ``J_ℓ δθ_ℓ`` of one seed's test and validation images
(:func:`lib.laplace.predictive.perturbation_bank`), for the Laplace posterior and for its
isotropic control (:mod:`lib.laplace.isotropic`).

The validation bank tunes the covariance scale (``predictive.scale``, :mod:`lib.laplace.scale`)
and the choice of blocks on validation data (:func:`lib.attribution.validation_table`); the
control's banks do the same for its noise variance. Every bank is computed in resumable parts of
about :data:`BANK_PART_IMAGES` images (:func:`bank_parts`, :func:`compute_part`), each saved as
soon as it is done; several processes can fill one bank's parts (:func:`open_bank`,
:func:`save_parts`, as :mod:`lib.compute` does) before :func:`build_bank` joins them. A Laplace
bank and its control's bank of the same images are computed in one pass where both are missing
(:func:`lib.laplace.predictive.perturbation_banks`: the backward passes are shared).
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import time
from dataclasses import dataclass

import torch
from torch import Tensor
from tqdm import tqdm

from lib.artifacts import Stage, cached, open_cached
from lib.config import Config
from lib.data import Split, batches
from lib.laplace.isotropic import IsotropicPosterior
from lib.laplace.posterior import LaplacePosterior
from lib.laplace.predictive import Bank, BlockPosterior, perturbation_banks
from lib.pipeline import MapRun, numerics
from lib.provenance import environment
from lib.train import amp_dtype, synchronize

BANK_PART_IMAGES = 1024
"""Images per resumable part of a perturbation bank (rounded up to whole batches of
``predictive.batch_size``, so that the parts batch the images exactly as one pass would)."""


def load_bank(st: Stage) -> Bank:
    """The bank a bank stage saved (``bank.pt``, CPU fp32)."""
    return Bank(**torch.load(st.file("bank.pt"), weights_only=True))


def bank_parts(n_images: int, batch_size: int) -> list[tuple[int, int]]:
    """The image ranges ``[start, stop)`` of a bank's parts: :data:`BANK_PART_IMAGES` rounded up
    to whole batches of ``batch_size``, the last part shorter."""
    per_part = batch_size * -(-BANK_PART_IMAGES // batch_size)
    return [(start, min(start + per_part, n_images)) for start in range(0, n_images, per_part)]


def compute_part(cfg: Config, run: MapRun, posteriors: list[BlockPosterior], data: Split, start: int, stop: int,
                 device: torch.device) -> list[dict]:
    """The banks of images ``start:stop`` of ``data``, one per posterior of ``posteriors`` (same
    blocks), from one pass (:func:`lib.laplace.predictive.perturbation_banks`), each with its share
    of the compute time: ``[{"bank": dataclasses.asdict(Bank), "seconds": float}]``. Every part
    draws the same posterior samples (they depend on the seed and the block only,
    :func:`lib.laplace.predictive.block_generator`) and batches its images as one pass over ``data``
    would, so joined parts equal a single pass."""
    pc = cfg.predictive
    chunk = Split(data.x[start:stop], data.y[start:stop])
    synchronize(device)
    t0 = time.perf_counter()
    banks = perturbation_banks(
        run.model, posteriors, batches(chunk, pc.batch_size, preprocess=run.preprocess, device=device),
        n_samples=pc.n_samples, seed=run.seed, device=device, dtype=amp_dtype(device) or torch.float32,
    )
    synchronize(device)
    seconds = (time.perf_counter() - t0) / len(banks)
    return [{"bank": dataclasses.asdict(bank), "seconds": seconds} for bank in banks]


@dataclass(frozen=True)
class BankPlan:
    """One bank stage (not necessarily done) with what its parts are computed from: the images
    ``data`` and the ``posterior`` whose perturbations they hold."""

    stage: Stage
    data: Split
    posterior: BlockPosterior


def save_parts(cfg: Config, run: MapRun, plans: list[BankPlan], start: int, stop: int,
               device: torch.device) -> list[tuple[dict, bool]]:
    """The part of images ``start:stop`` of each of ``plans``' banks (same images, same blocks) and
    whether it was saved before: loaded from ``parts/<start>-<stop>.pt`` where that file exists;
    the missing ones computed in one pass (:func:`compute_part`) and each saved atomically (a
    temporary file renamed), so that a part file is always whole."""
    paths = [plan.stage.file(f"parts/{start:07d}-{stop:07d}.pt") for plan in plans]
    missing = [i for i, path in enumerate(paths) if not path.is_file()]
    if any(len(plan.data) != len(plans[0].data) for plan in plans):
        raise ValueError(f"the banks {[p.stage.name for p in plans]} do not cover the same images")
    computed = dict(zip(missing, compute_part(cfg, run, [plans[i].posterior for i in missing], plans[0].data,
                                              start, stop, device) if missing else []))
    out = []
    for i, path in enumerate(paths):
        if i in computed:
            torch.save(computed[i], path.with_suffix(".tmp"))
            path.with_suffix(".tmp").replace(path)
            out.append((computed[i], False))
        else:
            out.append((torch.load(path, weights_only=True), True))
    return out


def _bank_spec(cfg: Config, run: MapRun, post: LaplacePosterior, device: torch.device, split: str,
               control: bool) -> tuple[str, dict, Split, BlockPosterior]:
    """Stage name, stage inputs, images and posterior of a bank (see :func:`build_bank`)."""
    pc = cfg.predictive
    data = {"test": run.splits.test, "val": run.splits.val}[split]
    if split == "val" and pc.scale_images is not None:
        data = Split(data.x[: pc.scale_images], data.y[: pc.scale_images])
    # "map_logits" names where the bank's f_MAP comes from (see _map_logits), so that banks which
    # kept the logits of their own forward pass are not reused.
    name = ("bank_iso" if control else "bank") + ("" if split == "test" else "_val")
    inputs = {"n_samples": pc.n_samples, "batch_size": pc.batch_size, "split": split, "images": len(data),
              "map_logits": "map stage", "numerics": numerics(device)}
    if control:
        inputs["posterior"] = "isotropic N(0, I)"
    return name, inputs, data, IsotropicPosterior.like(post) if control else post


def open_bank(cfg: Config, run: MapRun, post: LaplacePosterior, lap: Stage, device: torch.device,
              split: str = "test", control: bool = False) -> BankPlan:
    """The stage :func:`build_bank` with these arguments computes, opened without computing it."""
    name, inputs, data, posterior = _bank_spec(cfg, run, post, device, split, control)
    return BankPlan(open_cached(name, inputs, code=__name__, upstream=[lap]), data, posterior)


def build_bank(
    cfg: Config, run: MapRun, post: LaplacePosterior, lap: Stage, device: torch.device, split: str = "test",
    control: bool = False,
) -> tuple[Stage, Bank]:
    """The per-block perturbation bank of the ``'test'`` or ``'val'`` split (cached, CPU fp32).

    The validation bank covers the first ``predictive.scale_images`` validation images (all when
    None). ``control``: the bank of the isotropic control :meth:`IsotropicPosterior.like` ``(post)``
    instead (stages ``bank_iso`` / ``bank_iso_val``, keyed by the Laplace stage like the Laplace
    banks, so they are recomputed whenever the posterior is), with unit variance: its noise size
    enters as a scale.

    Resumable: each part (:func:`bank_parts`) is saved as ``parts/<start>-<stop>.pt``, named by its
    image range and written atomically; while the partner bank (the control's for a Laplace bank
    and back) is not done, its parts are computed in the same pass and saved in its own stage; an interrupted stage resumes from the missing parts, and a
    part whose range no longer matches (another part size) is never joined. Files: ``bank.pt``
    (:class:`Bank` as a dict; ``map_logits`` are the MAP stage's, :func:`_map_logits`), ``info.json``.
    """
    pc = cfg.predictive
    name, inputs, data, posterior = _bank_spec(cfg, run, post, device, split, control)

    def compute(st: Stage) -> None:
        ranges = bank_parts(len(data), pc.batch_size)
        partner = open_bank(cfg, run, post, lap, device, split, not control)
        plans = [BankPlan(st, data, posterior)] + ([] if partner.stage.done else [partner])
        parts, seconds, resumed = [], 0.0, 0
        for start, stop in tqdm(ranges, desc=f"{split} bank parts", disable=None):
            (part, saved), *_ = save_parts(cfg, run, plans, start, stop, device)
            resumed += saved
            parts.append(Bank(**part["bank"]))
            seconds += part["seconds"]
        labels = torch.cat([b.labels for b in parts])
        bank = Bank(map_logits=_map_logits(run, split, len(data), labels), labels=labels,
                    delta=torch.cat([b.delta for b in parts], dim=1), blocks=parts[0].blocks)
        torch.save(dataclasses.asdict(bank), st.file("bank.pt"))
        st.file("info.json").write_text(json.dumps({
            "seconds": seconds, "images": len(data), "split": split, "n_samples": pc.n_samples,
            "blocks": list(bank.blocks), "parts": len(ranges), "parts_resumed": resumed,
            "environment": environment(),
        }, indent=1))
        shutil.rmtree(st.path / "parts")

    st = cached(name, inputs, code=__name__, compute=compute, upstream=[lap])
    return st, load_bank(st)


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
