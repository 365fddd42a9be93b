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

In the study (:func:`variational_baseline`, settings ``baselines.variational`` of
:class:`lib.config.VariationalConfig`) the point parameters start from the seed's MAP adapters, so
the MAP training plays the part of the seed's deterministic warm-up (its KL-freeze and sample
warm-up epochs, 0 by default here); the fine-tune then runs the KL warm-up and the prunings.

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

import copy
import dataclasses
import json
import math
import time
from contextlib import contextmanager
from typing import Iterator

import pandas as pd
import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from lib.artifacts import cached
from lib.baselines.finetune import finetune_spec
from lib.baselines.result import BaselineResult, Row, baselines_config, forward_ms, load, ms_per_image, save, timing_batch, timing_key
from lib.config import Config, VariationalConfig
from lib.data import Preprocess, Split, batches
from lib.model import lora_modules
from lib.pipeline import MapRun, numerics
from lib.train import FitSpec, autocast, epoch_generator, lr_factor

K1, K2, K3 = 0.63576, 1.87320, 1.48695
"""Coefficients of the KL approximation of molchanov2017variational (eq. 14)."""
LOG_ALPHA_MAX = 8.0
"""log α is clamped at this value in the gates and the KL (molchanov2017variational clip α ≤ e⁸)."""


def kl_beta(cfg: VariationalConfig, epoch: int) -> float:
    """β_e of epoch ``epoch`` (1-based): 0 up to ``kl_freeze_epochs``, then a linear ramp to 1
    over ``beta_warmup_epochs``."""
    if epoch <= cfg.kl_freeze_epochs:
        return 0.0
    return min(1.0, (epoch - cfg.kl_freeze_epochs) / cfg.beta_warmup_epochs)


def sampling(cfg: VariationalConfig, epoch: int) -> bool:
    """Whether the gates are drawn in epoch ``epoch`` (1-based): after ``sample_warmup_epochs``."""
    return epoch > cfg.sample_warmup_epochs


def prune_epochs(cfg: VariationalConfig, epochs: int) -> list[int]:
    """The epochs (1-based) of ``1..epochs`` after which ranks are pruned: the multiples of
    ``prune_every`` from ``prune_start_epoch`` on (default: after the KL warm-up)."""
    start = cfg.kl_freeze_epochs + cfg.beta_warmup_epochs if cfg.prune_start_epoch is None else cfg.prune_start_epoch
    return [e for e in range(max(1, start), epochs + 1) if e % cfg.prune_every == 0]


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
    prunes = prune_epochs(cfg, spec.epochs)
    if not prunes:
        raise ValueError(f"the variational schedule never prunes in {spec.epochs} epochs (prune_every "
                         f"{cfg.prune_every}, prune_start_epoch {cfg.prune_start_epoch}); lower them or add epochs")
    per_epoch = math.ceil(n_train / spec.batch_size)
    steps = per_epoch * sum(1 for e in range(1, prunes[-1] + 1) if kl_beta(cfg, e) > 0)
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
    prunes = set(prune_epochs(cfg, spec.epochs))
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
        beta, draw = kl_beta(cfg, epoch), sampling(cfg, epoch)
        sums, steps, t0 = {"loss": 0.0, "nll": 0.0, "kl": 0.0}, 0, time.perf_counter()
        g = epoch_generator(seed, epoch - 1)
        for x, y in tqdm(batches(train, spec.batch_size, preprocess=preprocess, device=device, shuffle=True,
                                 generator=g, augment=spec.augment),
                         total=steps_per_epoch, desc=f"variational LoRA epoch {epoch}/{spec.epochs}", leave=False,
                         disable=None):
            with vlora.mode(draw), autocast(device):
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
        history.append({"epoch": epoch, "beta": beta, "sampling": draw, "lr": lr,
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


def variational_baseline(cfg: Config, run: MapRun, device: torch.device) -> BaselineResult:
    """The variational LoRA started from the MAP adapters of ``run`` with every log α at
    ``baselines.variational.init_log_alpha``, fine-tuned with the MAP recipe for
    ``baselines.finetune.epochs`` (gate noise and data order seeded by the run's seed), then two
    rows (:mod:`lib.baselines.result`): ``'variational LoRA'`` (the MC predictive of
    ``variational.samples`` gate draws) and ``'variational LoRA, mean gates'``. ``cost`` adds
    ``ranks_before`` and ``ranks`` (after pruning); ``extra_params`` is the kept log α minus the
    floats of the pruned ranks' A rows and B columns. Records: ``history.json``, ``prune_log.json``
    (per LoRA map and pruning: kept ranks, log α; :func:`pruning_table` for the chapter)."""
    bc = baselines_config(cfg)
    vc, spec = bc.variational, finetune_spec(cfg.train, bc.finetune)

    def compute(st) -> None:
        model = copy.deepcopy(run.model)
        vlora = VariationalLoRA(model, init_log_alpha=vc.init_log_alpha,
                                generator=torch.Generator(device=device).manual_seed(run.seed))
        ranks_before = sum(vlora.ranks().values())
        history, log = fit_variational(model, vlora, run.splits.train, spec, vc, preprocess=run.preprocess,
                                       device=device, seed=run.seed)
        st.file("history.json").write_text(json.dumps(history, indent=1))
        st.file("prune_log.json").write_text(json.dumps(log, indent=1))
        kw = dict(samples=vc.samples, seed=run.seed, preprocess=run.preprocess, device=device)
        x = timing_batch(run, bc, device)

        def predict():
            with torch.no_grad(), vlora.mode(True):
                for _ in range(vc.samples):
                    with autocast(device):
                        model(x)

        ms, mem = ms_per_image(predict, x, bc, device)
        with vlora.mode(False):
            mean_ms = forward_ms(model, x, bc, device)
        rows = {"variational LoRA": Row(variational_probs(model, vlora, run.splits.val, **kw),
                                        variational_probs(model, vlora, run.splits.test, **kw), ms, vc.samples),
                "variational LoRA, mean gates": Row(variational_probs(model, vlora, run.splits.val, mean=True, **kw),
                                                    variational_probs(model, vlora, run.splits.test, mean=True, **kw),
                                                    mean_ms, 1)}
        ranks = sum(vlora.ranks().values())
        saved = sum((cfg.lora.r - m.A.weight.shape[0]) * (m.A.weight.shape[1] + m.B.weight.shape[0])
                    for m in lora_modules(model))
        save(st, rows, {"train_seconds": sum(r["seconds"] for r in history), "peak_mib": mem, "extra_params": ranks - saved,
                        "map_ms_per_image": forward_ms(run.model, x, bc, device), "ranks_before": ranks_before,
                        "ranks": ranks, "training": {"kind": "fine-tuned from the MAP adapters", **dataclasses.asdict(spec)}})

    inputs = {"variational": dataclasses.asdict(vc), "finetune": dataclasses.asdict(spec), "timing": timing_key(bc),
              "numerics": numerics(device)}
    return load(cached("baseline_variational", inputs, code=__name__, compute=compute, upstream=[run.stage]),
                "variational LoRA")
