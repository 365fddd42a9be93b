"""MAP training: Adam with coupled L2 (the Gaussian prior), linear warm-up and cosine decay, resumable, seeded.

The Gaussian prior is exact. Fine-tuning minimises the mean negative log posterior

    L(θ) = (1/N) Σ_n −log p(y_n | x_n, θ) + (λ/2) ‖θ‖²,

i.e. the L2 term belongs to the objective (coupled weight decay ``λ`` = ``train.weight_decay``:
Adam adds its gradient λθ to the loss gradient in one fused update; no decoupled decay). Multiplying by N shows that the minimiser is the MAP under the
isotropic prior θ ~ N(0, δ⁻¹ I) with prior precision **δ = λ·N** (N = training-set size); this δ
is where the Laplace prior precision starts before marginal-likelihood tuning (daxberger2021laplace).
AdamW's decoupled decay would not give a MAP: its fixed point is Adam's preconditioned gradient
equal to −λθ, not ∇L = 0 (loshchilov2019decoupled). Pre-training the backbone is not a MAP step
and uses the ordinary decoupled decay.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from lib.data import Preprocess, Split, batches


@dataclass(frozen=True)
class FitSpec:
    """One optimisation run. ``l2``: coupled L2 (the prior); ``decoupled_wd``: AdamW decay."""

    epochs: int
    batch_size: int
    lr: float
    warmup_epochs: float = 0.0
    grad_clip: float | None = None
    augment: bool = False
    l2: float = 0.0
    decoupled_wd: float = 0.0
    label_smoothing: float = 0.0
    compile: bool = False


def prior_precision(l2: float, n_train: int) -> float:
    """δ = λ·N: the prior precision that coupled weight decay λ on the mean loss corresponds to."""
    return l2 * n_train


def amp_dtype(device: torch.device) -> torch.dtype | None:
    """The autocast precision of every stage on ``device``: bf16 on CUDA, none (fp32) on CPU."""
    return torch.bfloat16 if device.type == "cuda" else None


def autocast(device: torch.device):
    """Autocast at :func:`amp_dtype` (a no-op on CPU)."""
    dtype = amp_dtype(device)
    return torch.autocast(device_type=device.type, dtype=dtype or torch.float32, enabled=dtype is not None)


def synchronize(device: torch.device) -> None:
    """Wait for the kernels queued on a CUDA ``device`` (a no-op on CPU), so that a wall-clock
    interval around a stage's work covers that work."""
    if device.type == "cuda":
        torch.cuda.synchronize()


def epoch_generator(seed: int, epoch: int) -> torch.Generator:
    """The generator of one epoch's shuffling and augmentation (independent of resumption)."""
    return torch.Generator().manual_seed(seed * 1_000_003 + epoch)


@torch.no_grad()
def predict_logits(model: nn.Module, split: Split, *, preprocess: Preprocess, device: torch.device, batch_size: int = 256) -> torch.Tensor:
    """Logits (N, C), fp32 on CPU, of the deterministic model in eval mode."""
    model.eval()
    out = []
    for x, _ in batches(split, batch_size, preprocess=preprocess, device=device):
        with autocast(device):
            out.append(model(x).float().cpu())
    return torch.cat(out)


def fit(
    model: nn.Module,
    params: Sequence[nn.Parameter],
    train: Split,
    val: Split,
    spec: FitSpec,
    *,
    preprocess: Preprocess,
    device: torch.device,
    seed: int,
    ckpt: Path | None = None,
    desc: str = "train",
) -> list[dict]:
    """Train ``params`` of ``model`` and return the per-epoch history.

    History rows: epoch, lr, train_loss (mean CE), train_acc, val_loss, val_acc, seconds,
    images_per_s. With ``ckpt`` the state (params, optimiser, schedule, history) is saved after
    every epoch and a run resumes from it; on CPU a resumed run is bit-identical to an
    uninterrupted one. A non-finite loss raises ``FloatingPointError`` naming epoch and step.
    """
    params = list(params)
    steps_per_epoch = math.ceil(len(train) / spec.batch_size)
    total = spec.epochs * steps_per_epoch
    warmup = int(spec.warmup_epochs * steps_per_epoch)
    if spec.l2 and spec.decoupled_wd:
        raise ValueError("FitSpec: use either l2 (a Gaussian prior, MAP) or decoupled_wd, not both")
    if spec.l2:
        opt = torch.optim.Adam(params, lr=spec.lr, weight_decay=spec.l2)
    else:
        opt = torch.optim.AdamW(params, lr=spec.lr, weight_decay=spec.decoupled_wd)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(s, warmup, total))
    history: list[dict] = []
    start = 0
    if ckpt is not None and ckpt.is_file():
        state = torch.load(ckpt, map_location=device, weights_only=False)
        with torch.no_grad():
            for p, saved in zip(params, state["params"]):
                p.copy_(saved)
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["scheduler"])
        history, start = state["history"], state["epoch"] + 1
    forward = torch.compile(model) if spec.compile else model
    for epoch in range(start, spec.epochs):
        model.train()
        g = epoch_generator(seed, epoch)
        t0, loss_sum, correct, seen = time.perf_counter(), 0.0, 0, 0
        bar = tqdm(
            batches(train, spec.batch_size, preprocess=preprocess, device=device, shuffle=True, generator=g, augment=spec.augment),
            total=steps_per_epoch, desc=f"{desc} epoch {epoch + 1}/{spec.epochs}", leave=False, disable=None,
        )
        for step, (x, y) in enumerate(bar):
            with autocast(device):
                logits = forward(x)
            loss = F.cross_entropy(logits.float(), y, label_smoothing=spec.label_smoothing)
            if not torch.isfinite(loss):
                raise FloatingPointError(
                    f"{desc}: non-finite loss {loss.item()} at epoch {epoch + 1}, step {step + 1} "
                    f"(global step {epoch * steps_per_epoch + step + 1}); lower train.lr or check the data"
                )
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if spec.grad_clip is not None:
                torch.nn.utils.clip_grad_norm_(params, spec.grad_clip)
            opt.step()
            sched.step()
            loss_sum += loss.item() * len(y)
            correct += (logits.argmax(1) == y).sum().item()
            seen += len(y)
        if device.type == "cuda":
            torch.cuda.synchronize()
        seconds = time.perf_counter() - t0
        val_logits = predict_logits(model, val, preprocess=preprocess, device=device)
        history.append({
            "epoch": epoch + 1,
            "lr": opt.param_groups[0]["lr"],
            "train_loss": loss_sum / seen,
            "train_acc": correct / seen,
            "val_loss": F.cross_entropy(val_logits, val.y).item(),
            "val_acc": (val_logits.argmax(1) == val.y).float().mean().item(),
            "seconds": seconds,
            "images_per_s": seen / seconds,
        })
        if ckpt is not None:
            tmp = ckpt.with_suffix(".tmp")
            torch.save({
                "params": [p.detach().clone() for p in params],
                "optimizer": opt.state_dict(),
                "scheduler": sched.state_dict(),
                "history": history,
                "epoch": epoch,
            }, tmp)
            tmp.replace(ckpt)
    return history


def lr_factor(step: int, warmup: int, total: int) -> float:
    """The learning-rate multiplier at optimiser step ``step`` (0-based): linear warm-up over
    ``warmup`` steps, then cosine decay to 0 at ``total`` steps."""
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
