"""Cheap per-block importance scores of a trained LoRA ViT, and their rank agreement with ΔECE(ℓ).

The question (issue item 7): does a score that costs one pass of gradients, or nothing at all,
predict which blocks give the calibration gain? Three scores per transformer block ℓ, over the
block's LoRA weights θ_ℓ (every ``A`` and ``B`` of its ``qkv``, ``proj``, ``fc1``, ``fc2``):

* **AdaLoRA sensitivity** (zhang2023adaptive, the importance of the seed documents): per weight
  entry ``I_t = |w · ∂L_t/∂w|`` on minibatch t, smoothed ``Ī_t = β₁ Ī_{t−1} + (1 − β₁) I_t`` and
  its uncertainty ``Ū_t = β₂ Ū_{t−1} + (1 − β₂) |I_t − Ī_t|`` (Ī₀ = Ū₀ = 0, β₁ = β₂ = 0.85 as in
  AdaLoRA), score ``s = Ī_T · Ū_T``, summed over the block's entries. AdaLoRA accumulates it
  during training; here it is computed post hoc at the trained adapters over T minibatches of the
  training set (plain LoRA has no singular-value triplets, so the per-entry scores are summed).
* **Empirical Fisher trace** ``F_ℓ = (1/N) Σ_n ‖∇_{θ_ℓ} log p(y_n | x_n, θ)‖²`` (per-example
  gradients) and the **gradient norm** ``G_ℓ = ‖(1/N) Σ_n ∇_{θ_ℓ} log p(y_n | x_n, θ)‖``. At an
  exact MAP under the coupled L2 prior (:mod:`lib.train`) the likelihood gradient balances the
  prior's, ``G_ℓ = λ ‖θ_ℓ‖``: reported because the seeds name it, read with that in mind.
* **Norm of the LoRA update** ``U_ℓ = (Σ_{maps in ℓ} ‖s · B A‖_F²)^{1/2}``: no data at all.

Agreement with ΔECE(ℓ) is Kendall's τ-b (kendall1938new, ties counted), with a percentile
interval (efron1993introduction) over the bootstrap replicates of ΔECE(ℓ) the study already has
(:func:`kendall_tau_interval`): the interval reflects the test-set resampling of ΔECE, the score
being held fixed.
"""

from __future__ import annotations

from typing import Iterable, Mapping

import pandas as pd
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lib.model import lora_modules, n_blocks
from lib.stats import percentile_interval
from lib.train import autocast

ADALORA_BETA = 0.85
"""β₁ = β₂ of AdaLoRA's sensitivity smoothing (zhang2023adaptive, their default)."""


def _weights(model: nn.Module) -> tuple[list[nn.Parameter], list[int]]:
    mods = lora_modules(model)
    if not mods:
        raise ValueError("the model has no LoRA modules: wrap it with lib.model.add_lora first")
    ws, blocks = [], []
    for m in mods:
        for lin in (m.A, m.B):
            ws.append(lin.weight)
            blocks.append(m.block)
    return ws, blocks


def _grads(model: nn.Module, ws: list[nn.Parameter], x: Tensor, y: Tensor, reduction: str = "mean") -> list[Tensor]:
    flags = [w.requires_grad for w in ws]
    try:
        for w in ws:
            w.requires_grad_(True)
        with autocast(x.device):
            logits = model(x)
        loss = F.cross_entropy(logits.float(), y, reduction=reduction)
        return [g.float() for g in torch.autograd.grad(loss, ws)]
    finally:
        for w, f in zip(ws, flags):
            w.requires_grad_(f)


def _per_block(values: list[Tensor], blocks: list[int], L: int) -> Tensor:
    out = torch.zeros(L, dtype=torch.float64)
    for v, b in zip(values, blocks):
        out[b] += float(v)
    return out


def adalora_sensitivity(model: nn.Module, batches: Iterable[tuple[Tensor, Tensor]], *, beta1: float = ADALORA_BETA,
                        beta2: float = ADALORA_BETA) -> Tensor:
    """AdaLoRA's smoothed sensitivity × uncertainty per block, (L,) float64 on CPU, over the
    minibatches ``batches`` ((x, y) on the model's device) in order. Formula: module docstring."""
    if not (0 <= beta1 < 1 and 0 <= beta2 < 1):
        raise ValueError(f"beta1, beta2 are {beta1}, {beta2}; both must be in [0, 1)")
    model.eval()
    ws, blocks = _weights(model)
    i_bar = [torch.zeros_like(w, dtype=torch.float32) for w in ws]
    u_bar = [torch.zeros_like(w, dtype=torch.float32) for w in ws]
    steps = 0
    for x, y in batches:
        for k, (w, g) in enumerate(zip(ws, _grads(model, ws, x, y))):
            sens = (w.detach().float() * g).abs()
            i_bar[k] = beta1 * i_bar[k] + (1 - beta1) * sens
            u_bar[k] = beta2 * u_bar[k] + (1 - beta2) * (sens - i_bar[k]).abs()
        steps += 1
    if steps == 0:
        raise ValueError("batches is empty: the sensitivity needs at least one minibatch")
    return _per_block([(i * u).sum() for i, u in zip(i_bar, u_bar)], blocks, n_blocks(model))


def fisher_and_gradient(model: nn.Module, batches: Iterable[tuple[Tensor, Tensor]]) -> tuple[Tensor, Tensor]:
    """Per block: empirical Fisher trace ``(1/N) Σ_n ‖g_n,ℓ‖²`` and gradient norm
    ``‖(1/N) Σ_n g_n,ℓ‖`` with ``g_n = ∇ −log p(y_n | x_n)`` (one backward pass per example);
    two (L,) float64 tensors on CPU."""
    model.eval()
    ws, blocks = _weights(model)
    sq = [torch.zeros((), dtype=torch.float64) for _ in ws]
    mean = [torch.zeros_like(w, dtype=torch.float64) for w in ws]
    n = 0
    for x, y in batches:
        for i in range(len(y)):
            for k, g in enumerate(_grads(model, ws, x[i : i + 1], y[i : i + 1])):
                g = g.double()
                sq[k] += (g * g).sum().cpu()
                mean[k] += g
            n += 1
    if n == 0:
        raise ValueError("batches is empty: the Fisher trace needs at least one example")
    L = n_blocks(model)
    fisher = _per_block([s / n for s in sq], blocks, L)
    grad_sq = _per_block([((m / n) ** 2).sum() for m in mean], blocks, L)
    return fisher, grad_sq.sqrt()


@torch.no_grad()
def update_norm(model: nn.Module) -> Tensor:
    """``U_ℓ = (Σ_{maps in ℓ} ‖s · B A‖_F²)^{1/2}`` per block, (L,) float64 on CPU."""
    mods = lora_modules(model)
    if not mods:
        raise ValueError("the model has no LoRA modules: wrap it with lib.model.add_lora first")
    sq = [((m.scaling * m.B.weight.double() @ m.A.weight.double()) ** 2).sum() for m in mods]
    return _per_block(sq, [m.block for m in mods], n_blocks(model)).sqrt()


def kendall_tau(x: Tensor, y: Tensor) -> Tensor:
    """Kendall's τ-b of each row pair (kendall1938new): x, y (..., L) → (...,) float64.

    ``τ_b = (C − D) / √((n₀ − n_x)(n₀ − n_y))`` with C, D the concordant and discordant pairs,
    n₀ = L(L−1)/2 and n_x, n_y the pairs tied in x, in y; NaN when either is constant.
    """
    if x.shape != y.shape or x.shape[-1] < 2:
        raise ValueError(f"x and y need the same shape (..., L ≥ 2); got {tuple(x.shape)} and {tuple(y.shape)}")
    x, y = x.double(), y.double()
    sx = torch.sign(x[..., :, None] - x[..., None, :])
    sy = torch.sign(y[..., :, None] - y[..., None, :])
    L = x.shape[-1]
    upper = torch.triu(torch.ones(L, L, dtype=torch.bool, device=x.device), diagonal=1)
    s = (sx * sy)[..., upper].sum(-1)
    n0 = L * (L - 1) / 2
    tx = (sx[..., upper] == 0).sum(-1)
    ty = (sy[..., upper] == 0).sum(-1)
    return s / torch.sqrt((n0 - tx) * (n0 - ty))


def kendall_tau_interval(score: Tensor, delta_estimate: Tensor, delta_samples: Tensor,
                         alpha: float = 0.05) -> tuple[float, float, float]:
    """τ-b of ``score`` (L,) against ΔECE ``delta_estimate`` (L,), and the percentile interval of
    τ over the bootstrap replicates ``delta_samples`` (R, L) of ΔECE: (τ, lower, upper)."""
    if score.ndim != 1 or delta_estimate.shape != score.shape or delta_samples.ndim != 2 \
            or delta_samples.shape[1] != score.shape[0]:
        raise ValueError(f"score and delta_estimate must be (L,), delta_samples (R, L); got "
                         f"{tuple(score.shape)}, {tuple(delta_estimate.shape)}, {tuple(delta_samples.shape)}")
    tau = kendall_tau(score, delta_estimate)
    reps = kendall_tau(score.double().expand(delta_samples.shape[0], -1), delta_samples)
    lo, hi = percentile_interval(reps[:, None], alpha)
    return float(tau), float(lo[0]), float(hi[0])


def importance_table(scores: Mapping[str, Tensor], delta_estimate: Tensor, delta_samples: Tensor,
                     alpha: float = 0.05) -> pd.DataFrame:
    """One row per score: ``score``, ``kendall_tau``, ``lower``, ``upper`` (:func:`kendall_tau_interval`)."""
    rows = []
    for name, s in scores.items():
        tau, lo, hi = kendall_tau_interval(s, delta_estimate, delta_samples, alpha)
        rows.append({"score": name, "kendall_tau": tau, "lower": lo, "upper": hi})
    return pd.DataFrame(rows, columns=["score", "kendall_tau", "lower", "upper"])
