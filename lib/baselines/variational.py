"""Variational Bayesian LoRA: BayesLoRA-style variational dropout on the LoRA ranks, with rank pruning.

BayesLoRA (doyle2025bayesian; the seed document's demo: ``--local-reparam``, ``--logalpha-thresh 3``,
``--prune-every``, ``--min-ranks``) as this module implements it, without copying its code:

Model. Each LoRA map ``y = W x + s · B A x`` (A: r × d_in, B: d_out × r) gets one multiplicative
Gaussian gate per rank,

    y = W x + s · B diag(g) A x,   g_k = 1 + √α_k ε_k,  ε_k ~ N(0, 1),

i.e. the rank-k component ``b_k a_kᵀ`` carries the weight ``g_k ~ N(1, α_k)``: Gaussian dropout
with a learned rate per rank (kingma2015variational). One gate vector is drawn per image and
shared by its tokens (a draw of the weights, not per-token noise). The prior on the gate scale is
the log-uniform ``p(|θ|) ∝ 1/|θ|``, for which the KL of ``q = N(θ, α θ²)`` depends on α only; we
use the approximation of molchanov2017variational

    KL(α) ≈ k₁ − k₁ σ(k₂ + k₃ log α) + ½ log(1 + 1/α),  k₁ = 0.63576, k₂ = 1.87320, k₃ = 1.48695

(:func:`kl_log_uniform`; exact: ``−½ log α + E log|1 + √α ξ| + (γ + log 2)/2``, tested against a
numerical integral). The point parameters A, B, head and the variational parameters log α are
trained on ``(1/N) Σ_n −log p(y_n | x_n, g) + β · Σ_{modules, ranks} KL(α) / N`` (one gate draw
per image; β = 1 is the ELBO). Ranks whose ``log α`` exceeds a threshold (3: noise std ≥ 4.5×
the mean) carry no signal and are pruned (:meth:`VariationalLoRA.prune`), with a log of the
kept ranks per module. Prediction averages K gate draws: ``(1/K) Σ_k softmax(f(x; g_k))``.

Why this one and not BLoB (wang2024blob, a mean-field Gaussian on A with a learned variance per
entry): it is the variational LoRA of the seed documents this study answers (BayesLoRA), it adds
only r parameters per LoRA map (BLoB doubles A), and its learned dropout rates give a
per-block rank profile (which blocks keep uncertain ranks) to set beside ΔECE(ℓ).

The gates are forward pre-hooks on every LoRA ``B`` (its input is ``A x``, one column per rank),
so the peft model and :func:`lib.model.lora_modules` are unchanged; pruning replaces A, B and
log α by their kept rows/columns (the scaling s = α_lora/r of the unpruned rank stays).
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Iterator, Mapping

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from lib.config import _above, _at_least, _build
from lib.data import Preprocess, Split, batches
from lib.model import lora_modules
from lib.train import autocast, epoch_generator

K1, K2, K3 = 0.63576, 1.87320, 1.48695
"""Coefficients of the KL approximation of molchanov2017variational (eq. 14)."""
LOG_ALPHA_MAX = 8.0
"""log α is clamped at this value in the gates and the KL (molchanov2017variational clip α ≤ e⁸)."""


@dataclass(frozen=True)
class VariationalConfig:
    """Variational LoRA training and prediction.

    ``epochs``, ``batch_size``, ``lr`` (Adam, no weight decay): training; ``log_alpha_lr``: Adam
    step size of log α (None: ``lr``; the KL/N gradient is small, so a short run needs a larger
    one for the rates to move and pruning to act); ``init_log_alpha``: log α
    of every rank at the start (−4: gate std 0.14); ``kl_weight``: β; ``prune_threshold``: ranks
    with log α above it are pruned; ``prune_every``: prune after every that many epochs (0: only
    after the last); ``min_ranks``: ranks kept per module whatever their α; ``samples``: gate
    draws K per test image.
    """

    epochs: int = _at_least(2, 1)
    batch_size: int = _at_least(64, 1)
    lr: float = _above(1e-3, 0.0)
    log_alpha_lr: float | None = _above(None, 0.0)
    init_log_alpha: float = -4.0
    kl_weight: float = _at_least(1.0, 0.0)
    prune_threshold: float = 3.0
    prune_every: int = _at_least(0, 0)
    min_ranks: int = _at_least(1, 0)
    samples: int = _at_least(16, 1)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], source: str = "params") -> "VariationalConfig":
        """Build from a mapping, rejecting unknown keys and out-of-range values (``ParamsError``)."""
        return _build(cls, d, source, "variational.")


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
        ``kept`` (the kept ranks' original indices), ``log_alpha`` (theirs)."""
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
                         "log_alpha": [float(v) for v in self.log_alpha[key].detach().cpu()]})
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


def fit_variational(
    model: nn.Module,
    vlora: VariationalLoRA,
    train: Split,
    cfg: VariationalConfig,
    *,
    preprocess: Preprocess,
    device: torch.device | str,
    seed: int,
) -> tuple[list[dict], list[dict]]:
    """Train A, B, head (the parameters of ``model`` that require gradients) and log α on the
    loss of the module docstring, pruning as ``cfg`` says; returns (history, prune log).

    History rows: ``epoch``, ``loss``, ``nll``, ``kl`` (means over the epoch's steps), ``ranks``
    (total after the epoch's pruning). Shuffling from :func:`lib.train.epoch_generator` of
    ``seed``; gate noise from ``vlora.generator``. The optimiser is rebuilt after a pruning.
    """
    device = torch.device(device)
    n = len(train)

    def optimizer() -> torch.optim.Optimizer:
        params = [p for p in model.parameters() if p.requires_grad]
        alpha_lr = cfg.lr if cfg.log_alpha_lr is None else cfg.log_alpha_lr
        return torch.optim.Adam([{"params": params}, {"params": list(vlora.parameters()), "lr": alpha_lr}], lr=cfg.lr)

    opt = optimizer()
    history, log = [], []
    for epoch in range(cfg.epochs):
        model.train()
        sums, steps = {"loss": 0.0, "nll": 0.0, "kl": 0.0}, 0
        g = epoch_generator(seed, epoch)
        for x, y in tqdm(batches(train, cfg.batch_size, preprocess=preprocess, device=device, shuffle=True, generator=g),
                         desc=f"variational LoRA epoch {epoch + 1}/{cfg.epochs}", leave=False, disable=None):
            with vlora.mode(True), autocast(device):
                logits = model(x)
            nll = F.cross_entropy(logits.float(), y)
            kl = vlora.kl()
            loss = nll + cfg.kl_weight * kl / n
            if not torch.isfinite(loss):
                raise FloatingPointError(f"variational LoRA: non-finite loss at epoch {epoch + 1}; lower lr")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            for k, v in (("loss", loss), ("nll", nll), ("kl", kl)):
                sums[k] += v.item()
            steps += 1
        last = epoch + 1 == cfg.epochs
        if last or (cfg.prune_every and (epoch + 1) % cfg.prune_every == 0):
            log += vlora.prune(cfg.prune_threshold, min_ranks=cfg.min_ranks, epoch=epoch + 1)
            opt = optimizer()
        history.append({"epoch": epoch + 1, **{k: v / steps for k, v in sums.items()},
                        "ranks": sum(vlora.ranks().values())})
    model.eval()
    return history, log


@torch.no_grad()
def variational_probs(model: nn.Module, vlora: VariationalLoRA, split: Split, *, samples: int, seed: int,
                      preprocess: Preprocess, device: torch.device | str, batch_size: int = 256) -> torch.Tensor:
    """The predictive ``(1/K) Σ_k softmax(f(x; g_k))`` over ``split``: (N, C) float32 on CPU;
    ``vlora.generator`` is reseeded with ``seed`` first (deterministic)."""
    if samples < 1:
        raise ValueError(f"samples is {samples}; use at least one gate draw")
    device = torch.device(device)
    model.eval()
    vlora.generator.manual_seed(seed)
    out = []
    with vlora.mode(True):
        for x, _ in batches(split, batch_size, preprocess=preprocess, device=device):
            acc = 0
            for _ in range(samples):
                with autocast(device):
                    acc = acc + model(x).float().softmax(-1)
            out.append((acc / samples).cpu())
    return torch.cat(out)

