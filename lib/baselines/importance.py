"""Cheap per-block importance scores of a trained LoRA ViT, and their rank agreement with ΔECE(ℓ).

The question: does a score that costs a few passes of gradients, or nothing at all, predict which
blocks give the calibration gain? Three scores per transformer block ℓ, over the block's LoRA
weights θ_ℓ (every ``A`` (r × d_in) and ``B`` (d_out × r) of its ``qkv``, ``proj``, ``fc1``, ``fc2``):

* **AdaLoRA sensitivity** (zhang2023adaptive, the importance of the seed documents). Per weight
  entry w and minibatch t, the sensitivity ``I_t = |w · ∂L_t/∂w|`` is smoothed,
  ``Ī_t = β₁ Ī_{t−1} + (1 − β₁) I_t``, and so is its uncertainty,
  ``Ū_t = β₂ Ū_{t−1} + (1 − β₂) |I_t − Î_t|``, from ``Ī₀ = Ū₀ = 0`` with β₁ = β₂ = 0.85 as in
  AdaLoRA; the entry's score is ``s(w) = Î_T · Û_T``. The hats are the bias corrections of Adam
  (kingma2015adam), ``Î_t = Ī_t / (1 − β₁^t)`` and ``Û_T = Ū_T / (1 − β₂^T)``: AdaLoRA runs its
  averages over thousands of training steps, where the start at 0 has long been forgotten, but
  here they run post hoc at the trained adapters over T minibatches. Without the correction a
  constant sensitivity I (noise-free gradients) gives ``Ū_T = (1 − β₂) Σ_t β₂^{T−t} β₁^t I``,
  0.33·I at T = 8, where the truth is 0, and the score behaves like Ī²; with it, exactly 0.
  Aggregation as AdaLoRA's triplet score ``S_i = s(λ_i) + mean_j s(P_ji) + mean_j s(Q_ij)``: plain
  LoRA has no singular value λ_i, so rank i of a map scores ``mean_j s(B_ji) + mean_j s(A_ij)``
  (:func:`adalora_rank_scores`), and a block scores the sum over the ranks of its maps.
* **Empirical Fisher trace** ``F_ℓ = (1/N) Σ_n ‖∇_{θ_ℓ} log p(y_n | x_n, θ)‖²`` over N training
  examples (one backward pass per example).
* **Norm of the LoRA update** ``U_ℓ = (Σ_{maps in ℓ} ‖s · B A‖_F²)^{1/2}``: no data at all.

The **gradient norm** ``‖(1/N) Σ_n ∇_{θ_ℓ} log p‖`` that the seed documents also name is left
out, because at the MAP it carries nothing the others lack. On few examples it is the Fisher in
disguise: the squared norm of a mean of N per-example gradients has expectation
``‖ḡ_ℓ‖² + (F_ℓ − ‖ḡ_ℓ‖²)/N``, where ḡ_ℓ is the full-data gradient, and ḡ_ℓ is small at the MAP,
so the second term dominates and ranks blocks as ``F_ℓ`` does. On all the data it is exactly
``‖ḡ_ℓ‖``, and at a MAP under the coupled L2 prior (:mod:`lib.train`) stationarity gives
``ḡ_ℓ = −λ θ_ℓ``: a weight norm (what ``U_ℓ`` measures more directly) plus the optimiser's residual.

Agreement with ΔECE(ℓ) is Kendall's τ-b (kendall1938new, ties counted;
:func:`lib.stats.kendall_tau_b`) with a percentile interval (efron1993introduction,
:func:`kendall_tau_interval`). The interval resamples what the intervals of ΔECE(ℓ) resample —
its bootstrap replicates (seeds, test images, posterior samples and validation images) — with the
score held fixed, rather than the blocks. The question is about these L blocks of this network,
not about a population of blocks from which they were drawn: a block bootstrap would treat the 12
blocks as exchangeable draws (they are not: depth orders them), and with L = 12 its resamples are
mostly ties. The score's own error is left out: ``U_ℓ`` has none, and the Fisher and AdaLoRA scores
average thousands of per-example or per-batch terms.
"""

from __future__ import annotations

from typing import Iterable, Mapping

import pandas as pd
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lib.artifacts import Stage, cached
from lib.baselines.result import baselines_config
from lib.config import Config
from lib.data import batches
from lib.model import lora_modules, n_blocks
from lib.pipeline import MapRun, numerics
from lib.stats import kendall_tau_b, percentile_interval
from lib.train import autocast

ADALORA_BETA = 0.85
"""β₁ = β₂ of AdaLoRA's sensitivity smoothing (zhang2023adaptive, their default)."""


def _weights(model: nn.Module) -> tuple[list, list[nn.Parameter]]:
    mods = lora_modules(model)
    if not mods:
        raise ValueError("the model has no LoRA modules: wrap it with lib.model.add_lora first")
    return mods, [lin.weight for m in mods for lin in (m.A, m.B)]


def _grads(model: nn.Module, ws: list[nn.Parameter], x: Tensor, y: Tensor) -> list[Tensor]:
    flags = [w.requires_grad for w in ws]
    try:
        for w in ws:
            w.requires_grad_(True)
        with autocast(x.device):
            logits = model(x)
        loss = F.cross_entropy(logits.float(), y)
        return [g.float() for g in torch.autograd.grad(loss, ws)]
    finally:
        for w, f in zip(ws, flags):
            w.requires_grad_(f)


def _per_block(values: Iterable[Tensor], blocks: Iterable[int], L: int) -> Tensor:
    out = torch.zeros(L, dtype=torch.float64)
    for v, b in zip(values, blocks):
        out[b] += float(v)
    return out


def adalora_rank_scores(model: nn.Module, batches: Iterable[tuple[Tensor, Tensor]], *, beta1: float = ADALORA_BETA,
                        beta2: float = ADALORA_BETA) -> dict[str, Tensor]:
    """AdaLoRA's bias-corrected sensitivity score of every rank of every LoRA map, over the
    minibatches ``batches`` ((x, y) on the model's device) in order: LoRA module name → (r,)
    float64 on CPU, ``mean_j s(B_ji) + mean_j s(A_ij)`` with ``s = Î_T Û_T`` (module docstring)."""
    if not (0 <= beta1 < 1 and 0 <= beta2 < 1):
        raise ValueError(f"beta1, beta2 are {beta1}, {beta2}; both must be in [0, 1)")
    model.eval()
    mods, ws = _weights(model)
    i_bar = [torch.zeros_like(w, dtype=torch.float32) for w in ws]
    u_bar = [torch.zeros_like(w, dtype=torch.float32) for w in ws]
    t = 0
    for x, y in batches:
        t += 1
        for k, (w, g) in enumerate(zip(ws, _grads(model, ws, x, y))):
            sens = (w.detach().float() * g).abs()
            i_bar[k] = beta1 * i_bar[k] + (1 - beta1) * sens
            u_bar[k] = beta2 * u_bar[k] + (1 - beta2) * (sens - i_bar[k] / (1 - beta1**t)).abs()
    if t == 0:
        raise ValueError("batches is empty: the sensitivity needs at least one minibatch")
    s = [(i / (1 - beta1**t)) * (u / (1 - beta2**t)) for i, u in zip(i_bar, u_bar)]
    return {m.name: (s[2 * k].double().mean(1) + s[2 * k + 1].double().mean(0)).cpu() for k, m in enumerate(mods)}


def adalora_sensitivity(model: nn.Module, batches: Iterable[tuple[Tensor, Tensor]], *, beta1: float = ADALORA_BETA,
                        beta2: float = ADALORA_BETA) -> Tensor:
    """Per block, the sum of :func:`adalora_rank_scores` over the ranks of its LoRA maps: (L,)
    float64 on CPU."""
    ranks = adalora_rank_scores(model, batches, beta1=beta1, beta2=beta2)
    mods = lora_modules(model)
    return _per_block((ranks[m.name].sum() for m in mods), (m.block for m in mods), n_blocks(model))


def fisher_trace(model: nn.Module, batches: Iterable[tuple[Tensor, Tensor]]) -> Tensor:
    """Per block, the empirical Fisher trace ``(1/N) Σ_n ‖∇_{θ_ℓ} log p(y_n | x_n)‖²`` over the
    N examples of ``batches`` (one backward pass per example): (L,) float64 on CPU."""
    model.eval()
    mods, ws = _weights(model)
    blocks = [m.block for m in mods for _ in (0, 1)]
    sq = [torch.zeros((), dtype=torch.float64) for _ in ws]
    n = 0
    for x, y in batches:
        for i in range(len(y)):
            for k, g in enumerate(_grads(model, ws, x[i : i + 1], y[i : i + 1])):
                sq[k] += (g.double() ** 2).sum().cpu()
            n += 1
    if n == 0:
        raise ValueError("batches is empty: the Fisher trace needs at least one example")
    return _per_block([s / n for s in sq], blocks, n_blocks(model))


@torch.no_grad()
def update_norm(model: nn.Module) -> Tensor:
    """``U_ℓ = (Σ_{maps in ℓ} ‖s · B A‖_F²)^{1/2}`` per block, (L,) float64 on CPU."""
    mods = lora_modules(model)
    if not mods:
        raise ValueError("the model has no LoRA modules: wrap it with lib.model.add_lora first")
    sq = [((m.scaling * m.B.weight.double() @ m.A.weight.double()) ** 2).sum() for m in mods]
    return _per_block(sq, [m.block for m in mods], n_blocks(model)).sqrt()


SCORES = ("AdaLoRA sensitivity", "Fisher trace", "LoRA update norm")
"""The names of the scores of :func:`importance_scores`, in order."""


def importance_scores(cfg: Config, run: MapRun, device: torch.device) -> tuple[Stage, dict[str, Tensor]]:
    """The scores of :data:`SCORES` for the MAP model of ``run``, each (L,) float64, as a cached
    stage (file ``scores.pt``). AdaLoRA's score runs over the first ``baselines.importance_batches``
    training minibatches of ``importance_batch_size`` images (in order, no augmentation), the
    Fisher trace over the first ``fisher_examples`` of their images."""
    bc = baselines_config(cfg)

    def compute(st: Stage) -> None:
        data = []
        for x, y in batches(run.splits.train, bc.importance_batch_size, preprocess=run.preprocess, device=device):
            if len(data) == bc.importance_batches:
                break
            data.append((x, y))
        fisher_data, left = [], bc.fisher_examples
        for x, y in data:
            if left <= 0:
                break
            fisher_data.append((x[:left], y[:left]))
            left -= len(y)
        scores = (adalora_sensitivity(run.model, data), fisher_trace(run.model, fisher_data), update_norm(run.model))
        torch.save(dict(zip(SCORES, scores)), st.file("scores.pt"))

    inputs = {"batches": bc.importance_batches, "batch_size": bc.importance_batch_size,
              "fisher_examples": bc.fisher_examples, "numerics": numerics(device)}
    st = cached("baseline_importance", inputs, code=__name__, compute=compute, upstream=[run.stage])
    return st, torch.load(st.file("scores.pt"), weights_only=True)


def kendall_tau_interval(score: Tensor, delta_estimate: Tensor, delta_samples: Tensor,
                         alpha: float = 0.05) -> tuple[float, float, float]:
    """τ-b of ``score`` (L,) against ΔECE ``delta_estimate`` (L,), and the percentile interval of
    τ over the bootstrap replicates ``delta_samples`` (R, L) of ΔECE (e.g.
    ``Attribution.single_samples()``), the score held fixed (module docstring): (τ, lower, upper)."""
    if score.ndim != 1 or delta_estimate.shape != score.shape or delta_samples.ndim != 2 \
            or delta_samples.shape[1] != score.shape[0]:
        raise ValueError(f"score and delta_estimate must be (L,), delta_samples (R, L); got "
                         f"{tuple(score.shape)}, {tuple(delta_estimate.shape)}, {tuple(delta_samples.shape)}")
    score = score.double()
    tau = kendall_tau_b(score, delta_estimate.double())
    reps = kendall_tau_b(score.expand(delta_samples.shape[0], -1), delta_samples.double())
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
