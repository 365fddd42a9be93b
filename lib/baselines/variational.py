"""Variational Bayesian LoRA: BayesLoRA's rank-wise variational dropout, with rank pruning.

BayesLoRA (doyle2025lowrank, version 3 of the arXiv entry whose version 1, doyle2025bayesian, used
MC dropout; the seed document's demo runs ``--kl-scale 0.05``, ``--kl-freeze-epochs``,
``--beta-warmup-epochs``, ``--sample-warmup-epochs``, ``--logalpha-thresh 3``, ``--prune-every``,
``--min-ranks-per-layer 2``) as this module implements it, without copying its code:

Model. Each LoRA map ``y = W x + s · B A x`` (A: r × d_in, B: d_out × r) gets one multiplicative
Gaussian gate per rank,

    y = W x + s · B diag(g) A x,   g_k = 1 + √α_k ε_k,  ε_k ~ N(0, 1),

i.e. the rank-k component ``b_k a_kᵀ`` carries the weight ``g_k ~ N(1, α_k)``: Gaussian dropout
with a learned rate per rank (kingma2015variational), α_k the rank's noise-to-signal ratio. One
gate vector is drawn per image and shared by its tokens (a draw of the weights, not per-token
noise). The prior on the gate scale is the log-uniform ``p(|θ|) ∝ 1/|θ|``, for which the KL of
``q = N(θ, α θ²)`` depends on α only; we use the approximation of molchanov2017variational

    KL(α) ≈ k₁ − k₁ σ(k₂ + k₃ log α) + ½ log(1 + 1/α),  k₁ = 0.63576, k₂ = 1.87320, k₃ = 1.48695

(:func:`kl_log_uniform`; exact: ``−½ log α + E log|1 + √α ξ| + (γ + log 2)/2``, tested against a
numerical integral). This is the rank-tied noise-to-signal ratio of doyle2025lowrank written as a
gate: the seed's code ties one variance σ_k² to all entries of a_k and b_k and reads α off the
ratio σ_k²/μ², which its KL shrinks by shrinking the means; the gate carries α_k directly.

Objective (one gate draw per image), the mean over a minibatch of

    −log p(y | x, g) + β_e · c · Σ_{maps, ranks} KL(α) / N + (λ/2) ‖θ‖²,

with N the training images, c = ``kl_scale`` (the seed's 0.05–0.1; c = 1 is the ELBO) and β_e
the KL warm-up of epoch e (1-based): 0 for ``e ≤ kl_freeze_epochs``, then
``min(1, (e − kl_freeze_epochs) / beta_warmup_epochs)``. The gates are drawn from epoch
``sample_warmup_epochs + 1`` on (before that the network runs at the gate mean 1). θ = A, B and
the head are the point parameters, trained with the MAP recipe (:mod:`lib.train`: coupled L2 λ,
the schedule, clipping and augmentation of a :class:`lib.train.FitSpec`); log α has its own
constant Adam step size ``log_alpha_lr``, no clipping and no L2 (its prior is the log-uniform).

Pruning (:meth:`VariationalLoRA.prune`) after every epoch e ≥ ``prune_start_epoch`` (default
``kl_freeze_epochs + beta_warmup_epochs``, the seed's) with e a multiple of ``prune_every``:
ranks with ``log α > prune_threshold`` (3: noise std ≥ 4.5× the mean) go, keeping at least the
``min_ranks`` of smallest α per map. Unlike the seed's code, which resets s = α_lora/r_kept and so
rescales the kept ranks, pruning keeps s, so removing a rank changes the mean network by that
rank's own contribution only. Adam moves log α by at most about ``log_alpha_lr`` per step, so a
rank can only be pruned if ``init_log_alpha + log_alpha_lr · (steps with β > 0 before the last
pruning) > prune_threshold``; :func:`fit_variational` refuses a schedule where it cannot.

Prediction: the MC predictive ``(1/K) Σ_k softmax(f(x; g_k))`` (:func:`variational_probs`), and
for comparison the network at the gate mean g = 1 (``mean=True``, what BayesLoRA reports as
``acc_mean``). Why this one and not BLoB (wang2024blob, a mean-field Gaussian on A with a learned
variance per entry): it is the variational LoRA of the seed documents this study answers, it adds
only r parameters per LoRA map, and its pruning log gives a per-block rank profile to set beside
ΔECE(ℓ) (:func:`pruning_table`).

The gates are forward pre-hooks on every LoRA ``B`` (its input is ``A x``, one column per rank),
so the peft model and :func:`lib.model.lora_modules` are unchanged; pruning replaces A, B and
log α by their kept rows/columns.
"""

from __future__ import annotations

import math
import time
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Iterator, Mapping

import pandas as pd
import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from lib.config import _above, _at_least, _build
from lib.data import Preprocess, Split, batches
from lib.model import lora_modules
from lib.train import FitSpec, autocast, epoch_generator, lr_factor

K1, K2, K3 = 0.63576, 1.87320, 1.48695
"""Coefficients of the KL approximation of molchanov2017variational (eq. 14)."""
LOG_ALPHA_MAX = 8.0
"""log α is clamped at this value in the gates and the KL (molchanov2017variational clip α ≤ e⁸)."""


@dataclass(frozen=True)
class VariationalConfig:
    """The variational part of the BayesLoRA baseline (the point parameters' recipe is a
    :class:`lib.train.FitSpec`); formulas in the module docstring.

    ``log_alpha_lr``: Adam step size of log α (constant); ``init_log_alpha``: log α of every rank
    at the start (−4: gate std 0.14); ``kl_scale``: c; ``kl_freeze_epochs``,
    ``beta_warmup_epochs``: the KL warm-up β_e; ``sample_warmup_epochs``: epochs at the gate mean
    before the gates are drawn; ``prune_every``, ``prune_start_epoch`` (None: after the KL
    warm-up), ``prune_threshold``, ``min_ranks``: pruning; ``samples``: gate draws K per test image.
    """

    log_alpha_lr: float = _above(0.05, 0.0)
    init_log_alpha: float = -4.0
    kl_scale: float = _above(0.1, 0.0)
    kl_freeze_epochs: int = _at_least(0, 0)
    beta_warmup_epochs: int = _at_least(2, 1)
    sample_warmup_epochs: int = _at_least(0, 0)
    prune_every: int = _at_least(3, 1)
    prune_start_epoch: int | None = _at_least(None, 1)
    prune_threshold: float = 3.0
    min_ranks: int = _at_least(2, 1)
    samples: int = _at_least(16, 1)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], source: str = "params") -> "VariationalConfig":
        """Build from a mapping, rejecting unknown keys and out-of-range values (``ParamsError``)."""
        return _build(cls, d, source, "variational.")

    def beta(self, epoch: int) -> float:
        """β_e of epoch ``epoch`` (1-based)."""
        if epoch <= self.kl_freeze_epochs:
            return 0.0
        return min(1.0, (epoch - self.kl_freeze_epochs) / self.beta_warmup_epochs)

    def sampling(self, epoch: int) -> bool:
        """Whether the gates are drawn in epoch ``epoch`` (1-based)."""
        return epoch > self.sample_warmup_epochs

    def prune_epochs(self, epochs: int) -> list[int]:
        """The epochs (1-based) of ``1..epochs`` after which ranks are pruned."""
        start = self.kl_freeze_epochs + self.beta_warmup_epochs if self.prune_start_epoch is None else self.prune_start_epoch
        return [e for e in range(max(1, start), epochs + 1) if e % self.prune_every == 0]


def kl_log_uniform(log_alpha: torch.Tensor) -> torch.Tensor:
    """KL(N(θ, αθ²) ‖ log-uniform) per entry, the approximation of molchanov2017variational:
    ``k₁ − k₁ σ(k₂ + k₃ log α) + ½ log(1 + α⁻¹)``; same shape as ``log_alpha``, ≥ 0."""
    la = log_alpha.clamp(max=LOG_ALPHA_MAX)
    return K1 - K1 * torch.sigmoid(K2 + K3 * la) + 0.5 * F.softplus(-la)


class VariationalLoRA(nn.Module):
    """Rank gates on every LoRA map of a peft model: ``log_alpha[name]`` (r,) per module and a
    forward pre-hook on its ``B``; sampling (``g = 1 + √α ε``) or mean (``g = 1``) mode.

    ``generator``: the stream of the gate noise, on the model's device (seed it for determinism).
    """

    def __init__(self, model: nn.Module, *, init_log_alpha: float, generator: torch.Generator):
        super().__init__()
        mods = lora_modules(model)
        if not mods:
            raise ValueError("the model has no LoRA modules: wrap it with lib.model.add_lora first")
        self.generator = generator
        self.sampling = True
        self.modules_ = {m.name: m for m in mods}
        self.log_alpha = nn.ParameterDict({
            _key(m.name): nn.Parameter(torch.full((m.A.weight.shape[0],), float(init_log_alpha), device=m.A.weight.device))
            for m in mods
        })
        self.rank_ids = {m.name: list(range(m.A.weight.shape[0])) for m in mods}
        self._hooks = [m.B.register_forward_pre_hook(self._hook(m.name)) for m in mods]

    def _hook(self, name: str):
        def gate(_module: nn.Module, args: tuple) -> tuple:
            if not self.sampling:
                return args
            h = args[0]
            return (h * self.gates(name, h.shape[0], h.ndim, h.device),)
        return gate

    def gates(self, name: str, batch: int, ndim: int, device: torch.device) -> torch.Tensor:
        """One gate draw per image: (batch, 1, …, 1, r) with ``ndim`` dims, ``1 + √α ε``."""
        la = self.log_alpha[_key(name)].clamp(max=LOG_ALPHA_MAX)
        shape = (batch,) + (1,) * (ndim - 2) + (la.shape[0],)
        eps = torch.randn(shape, generator=self.generator, device=device)
        return 1 + torch.exp(0.5 * la) * eps

    def kl(self) -> torch.Tensor:
        """Σ over modules and ranks of :func:`kl_log_uniform` (a scalar)."""
        return sum(kl_log_uniform(p).sum() for p in self.log_alpha.values())

    def ranks(self) -> dict[str, int]:
        """Current rank of every LoRA module."""
        return {n: len(ids) for n, ids in self.rank_ids.items()}

    @contextmanager
    def mode(self, sampling: bool) -> Iterator[None]:
        """Run the body with gates drawn (``True``) or at their mean 1 (``False``); restores."""
        saved = self.sampling
        self.sampling = sampling
        try:
            yield
        finally:
            self.sampling = saved

    @torch.no_grad()
    def prune(self, threshold: float, *, min_ranks: int = 1, epoch: int | None = None) -> list[dict]:
        """Remove every rank with ``log α > threshold`` (keeping at least the ``min_ranks`` of
        smallest α per module): A's rows, B's columns and log α shrink. Returns one log row per
        module: ``epoch``, ``module``, ``block``, ``kind``, ``ranks_before``, ``ranks_kept``,
        ``kept`` (the kept ranks' original indices), ``log_alpha`` (theirs, after pruning),
        ``log_alpha_before`` (every rank's, before)."""
        rows = []
        for name, m in self.modules_.items():
            key = _key(name)
            la = self.log_alpha[key].detach()
            keep = la <= threshold
            if int(keep.sum()) < min(min_ranks, la.numel()):
                keep = torch.zeros_like(keep)
                keep[la.argsort()[:min_ranks]] = True
            idx = keep.nonzero().flatten()
            before = la.numel()
            if len(idx) < before:
                _shrink(m.A, idx, dim=0)
                _shrink(m.B, idx, dim=1)
                self.log_alpha[key] = nn.Parameter(la[idx].clone())
                self.rank_ids[name] = [self.rank_ids[name][i] for i in idx.tolist()]
            rows.append({"epoch": epoch, "module": name, "block": m.block, "kind": m.kind, "ranks_before": before,
                         "ranks_kept": len(idx), "kept": list(self.rank_ids[name]),
                         "log_alpha": [float(v) for v in self.log_alpha[key].detach().cpu()],
                         "log_alpha_before": [float(v) for v in la.cpu()]})
        return rows

    def remove(self) -> None:
        """Detach the hooks: the model computes plain LoRA again (with its pruned ranks)."""
        for h in self._hooks:
            h.remove()
        self._hooks = []


def _key(name: str) -> str:
    return name.replace(".", "/")


def _shrink(lin: nn.Linear, idx: torch.Tensor, dim: int) -> None:
    w = lin.weight.detach().index_select(dim, idx).clone()
    lin.weight = nn.Parameter(w, requires_grad=lin.weight.requires_grad)
    if dim == 0:
        lin.out_features = len(idx)
    else:
        lin.in_features = len(idx)


def check_pruning_can_act(spec: FitSpec, cfg: VariationalConfig, n_train: int) -> int:
    """The steps with β > 0 before the last pruning; raises ValueError when the schedule prunes
    never, or when Adam's step bound (≈ ``log_alpha_lr`` per step) keeps log α below the threshold
    until the last pruning (module docstring)."""
    prunes = cfg.prune_epochs(spec.epochs)
    if not prunes:
        raise ValueError(f"the variational schedule never prunes in {spec.epochs} epochs (prune_every "
                         f"{cfg.prune_every}, prune_start_epoch {cfg.prune_start_epoch}); lower them or add epochs")
    per_epoch = math.ceil(n_train / spec.batch_size)
    steps = per_epoch * sum(1 for e in range(1, prunes[-1] + 1) if cfg.beta(e) > 0)
    reach = cfg.init_log_alpha + cfg.log_alpha_lr * steps
    if reach <= cfg.prune_threshold:
        raise ValueError(
            f"variational pruning cannot act: Adam moves log α by at most about log_alpha_lr = {cfg.log_alpha_lr} per "
            f"step, so in the {steps} steps with a KL term before the last pruning it rises from init_log_alpha "
            f"{cfg.init_log_alpha} to at most {reach:.2f} <= prune_threshold {cfg.prune_threshold}; raise "
            f"variational.log_alpha_lr above {(cfg.prune_threshold - cfg.init_log_alpha) / max(steps, 1):.3g} or train longer")
    return steps


def fit_variational(
    model: nn.Module,
    vlora: VariationalLoRA,
    train: Split,
    spec: FitSpec,
    cfg: VariationalConfig,
    *,
    preprocess: Preprocess,
    device: torch.device | str,
    seed: int,
) -> tuple[list[dict], list[dict]]:
    """Train the point parameters (those of ``model`` that require gradients) with the recipe of
    ``spec`` and log α on the objective of the module docstring, pruning as ``cfg`` says;
    returns (history, prune log).

    History rows: ``epoch``, ``beta``, ``sampling``, ``lr`` (of the point parameters at the end of
    the epoch), ``loss``, ``nll``, ``kl`` (means over the epoch's steps; ``kl`` is Σ KL before
    scaling), ``ranks`` (total after the epoch's pruning), ``seconds``. Shuffling and augmentation
    from :func:`lib.train.epoch_generator` of ``seed``; gate noise from ``vlora.generator``. The
    optimiser is rebuilt after a pruning (the schedule continues where it was).
    """
    if spec.decoupled_wd:
        raise ValueError("spec.decoupled_wd must be 0: the point parameters follow the MAP recipe (coupled l2)")
    device = torch.device(device)
    n = len(train)
    check_pruning_can_act(spec, cfg, n)
    prunes = set(cfg.prune_epochs(spec.epochs))
    steps_per_epoch = math.ceil(n / spec.batch_size)
    total, warmup = spec.epochs * steps_per_epoch, int(spec.warmup_epochs * steps_per_epoch)
    point = [p for p in model.parameters() if p.requires_grad]

    def optimizer(step: int) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LambdaLR]:
        opt = torch.optim.Adam([{"params": point, "lr": spec.lr, "weight_decay": spec.l2},
                                {"params": list(vlora.parameters()), "lr": cfg.log_alpha_lr, "weight_decay": 0.0}])
        sched = torch.optim.lr_scheduler.LambdaLR(opt, [lambda s: lr_factor(s + step, warmup, total), lambda s: 1.0])
        return opt, sched

    opt, sched = optimizer(0)
    history, log = [], []
    for epoch in range(1, spec.epochs + 1):
        model.train()
        beta, sampling = cfg.beta(epoch), cfg.sampling(epoch)
        sums, steps, t0 = {"loss": 0.0, "nll": 0.0, "kl": 0.0}, 0, time.perf_counter()
        g = epoch_generator(seed, epoch - 1)
        for x, y in tqdm(batches(train, spec.batch_size, preprocess=preprocess, device=device, shuffle=True,
                                 generator=g, augment=spec.augment),
                         total=steps_per_epoch, desc=f"variational LoRA epoch {epoch}/{spec.epochs}", leave=False,
                         disable=None):
            with vlora.mode(sampling), autocast(device):
                logits = model(x)
            nll = F.cross_entropy(logits.float(), y)
            kl = vlora.kl()
            loss = nll + beta * cfg.kl_scale * kl / n
            if not torch.isfinite(loss):
                raise FloatingPointError(f"variational LoRA: non-finite loss at epoch {epoch}; lower the lr")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if spec.grad_clip is not None:
                torch.nn.utils.clip_grad_norm_(point, spec.grad_clip)
            opt.step()
            sched.step()
            for k, v in (("loss", loss), ("nll", nll), ("kl", kl)):
                sums[k] += v.item()
            steps += 1
        lr = opt.param_groups[0]["lr"]
        if epoch in prunes:
            log += vlora.prune(cfg.prune_threshold, min_ranks=cfg.min_ranks, epoch=epoch)
            opt, sched = optimizer(epoch * steps_per_epoch)
        if device.type == "cuda":
            torch.cuda.synchronize()
        history.append({"epoch": epoch, "beta": beta, "sampling": sampling, "lr": lr,
                        **{k: v / steps for k, v in sums.items()}, "ranks": sum(vlora.ranks().values()),
                        "seconds": time.perf_counter() - t0})
    model.eval()
    return history, log


@torch.no_grad()
def variational_probs(model: nn.Module, vlora: VariationalLoRA, split: Split, *, samples: int, seed: int,
                      preprocess: Preprocess, device: torch.device | str, batch_size: int = 256,
                      mean: bool = False) -> torch.Tensor:
    """The predictive ``(1/K) Σ_k softmax(f(x; g_k))`` over ``split``, or with ``mean`` the network
    at the gate mean, ``softmax(f(x; 1))``: (N, C) float32 on CPU; ``vlora.generator`` is reseeded
    with ``seed`` first (deterministic)."""
    if samples < 1:
        raise ValueError(f"samples is {samples}; use at least one gate draw")
    device = torch.device(device)
    model.eval()
    vlora.generator.manual_seed(seed)
    out = []
    with vlora.mode(not mean):
        for x, _ in batches(split, batch_size, preprocess=preprocess, device=device):
            acc = 0
            for _ in range(1 if mean else samples):
                with autocast(device):
                    acc = acc + model(x).float().softmax(-1)
            out.append((acc / (1 if mean else samples)).cpu())
    return torch.cat(out)


def pruning_table(log: list[dict]) -> pd.DataFrame:
    """The pruning log per pruning epoch and block, for the chapter: ``epoch``, ``block``,
    ``ranks_before``, ``ranks_kept`` (summed over the block's LoRA maps), ``pruned``, and the
    median, minimum and maximum of log α over the block's ranks before the pruning
    (``log_alpha_median``, ``log_alpha_min``, ``log_alpha_max``)."""
    if not log:
        raise ValueError("log is empty: pass the prune log of fit_variational")
    rows = []
    frame = pd.DataFrame(log)
    for (epoch, block), g in frame.groupby(["epoch", "block"], sort=True):
        la = torch.tensor([v for vs in g.log_alpha_before for v in vs], dtype=torch.float64)
        before, kept = int(g.ranks_before.sum()), int(g.ranks_kept.sum())
        rows.append({"epoch": int(epoch), "block": int(block), "ranks_before": before, "ranks_kept": kept,
                     "pruned": before - kept, "log_alpha_median": float(la.median()),
                     "log_alpha_min": float(la.min()), "log_alpha_max": float(la.max())})
    return pd.DataFrame(rows)
