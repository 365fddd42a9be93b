"""Deployment cost of a Bayesian-block choice: the GLM predictive as it would be served.

A deployed model needs only the summed perturbation ``Σ_{ℓ∈S} J_ℓ δθ_ℓ``, not the per-block terms
of the study's bank. Forward mode: run the network without tangents up to the first Bayesian
block ``ℓ₀ = min S`` (shared by all samples), then one ``torch.func.jvp`` of the tail
``head ∘ blocks[L-1] ∘ … ∘ blocks[ℓ₀]`` w.r.t. the LoRA factors of every block in S with the K
posterior samples as batched tangents (immer2021improving); its cost grows with the depth of the
tail and linearly in K. Reverse mode: one forward pass and C backward passes from the logits to
``ℓ₀``, whose per-example Jacobians are contracted with the K samples; its cost grows with the
depth of the tail and with the number of classes C, hardly with K.
"""

from __future__ import annotations

import statistics
import time
from functools import partial
from typing import Callable, Literal

import pandas as pd
import torch
from torch import Tensor, nn
from torch.func import functional_call, jvp, vmap

from lib.laplace.predictive import (CLASS_CHUNK, BlockPosterior, block_tangents, load_forward_ad, reverse_delta, reverse_mode,
                                   reverse_samples, uses_reverse_mode)
from lib.model import fused_attention_off, vit_parts
from lib.train import amp_dtype, autocast


class GLMPredictor:
    """Serving-time linearised predictive ``p(y|x) ≈ (1/K) Σ_k softmax(f(x) + J_S(x) δθ^(k))``.

    ``blocks``: the Bayesian blocks S; samples ``δθ^(k)`` are drawn once at construction with the
    same generators as :func:`lib.laplace.predictive.perturbation_bank` (seed, block), and scaled
    by ``√scale`` (the covariance scale ``κ_S``, :mod:`lib.laplace.scale`), so the predictive
    equals the bank's :func:`~lib.laplace.predictive.subset_probs` for S at that scale.

    ``mode='forward'``: the network up to the first Bayesian block ``ℓ₀ = min S`` once, then one
    JVP of the tail per sample (batched by ``vmap``); ``'reverse'``: one forward pass and ``C``
    backward passes to ``ℓ₀`` (batched by :data:`~lib.laplace.predictive.CLASS_CHUNK`) whose
    per-example Jacobians are contracted with the samples
    (:func:`lib.laplace.predictive.reverse_delta`); ``'auto'`` takes reverse when ``C ≤ 4K``
    (:data:`~lib.laplace.predictive.REVERSE_CLASSES_PER_SAMPLE`), as the bank does.
    """

    def __init__(self, model: nn.Module, posterior: BlockPosterior, blocks: list[int], *, n_samples: int,
                 seed: int, device: torch.device, dtype: torch.dtype = torch.float32, scale: float = 1.0,
                 mode: Literal["auto", "forward", "reverse"] = "auto"):
        if not scale >= 0:
            raise ValueError(f"scale must be >= 0, got {scale}")
        self.model, self.device, self.dtype = model, device, dtype
        self.parts = vit_parts(model)
        self.blocks = sorted(blocks)
        self.reverse = uses_reverse_mode(model, n_samples, mode) and bool(self.blocks)
        if self.reverse:
            self.rs = reverse_samples(model, posterior, tuple(self.blocks), n_samples, seed, device)
            self.rs.samples = [d * scale**0.5 for d in self.rs.samples]
            return
        load_forward_ad()
        self.start = self.blocks[0] if self.blocks else len(self.parts.blocks)
        self.tail = nn.ModuleList(self.parts.blocks[self.start:])
        self.primals, self.tangents = {}, {}
        for b in self.blocks:
            for name, t in block_tangents(model, posterior, b, n_samples, seed, device).items():
                key = f"{b - self.start}.{name}"
                self.tangents[key] = t * scale**0.5
                self.primals[key] = self.tail.get_parameter(key).detach()

    def _tail(self, params: dict, h: Tensor) -> Tensor:
        for i, blk in enumerate(self.tail):
            prefix = f"{i}."
            own = {k[len(prefix):]: v for k, v in params.items() if k.startswith(prefix)}
            h = functional_call(blk, own, (h,), strict=False) if own else blk(h)
        return self.parts.head(h)

    def __call__(self, x: Tensor) -> Tensor:
        """Predictive probabilities (B, C) for images ``x`` (B, 3, H, W).

        Fused attention (no forward-mode AD, no batched backward) is switched off for the call
        and restored after it.
        """
        if self.reverse:
            with reverse_mode(self.model, self.rs) as rec:
                f, delta = reverse_delta(self.model, self.rs, rec, x, dtype=self.dtype, class_chunk=CLASS_CHUNK)
            return torch.softmax(f.unsqueeze(1) + delta.sum(0), -1).mean(1)
        with torch.no_grad(), fused_attention_off(self.model):
            return self._predict(x)

    def _predict(self, x: Tensor) -> Tensor:
        amp = torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.dtype == torch.bfloat16)
        with amp:
            h = self.parts.embed(x)
            for blk in self.parts.blocks[: self.start]:
                h = blk(h)
            if not self.blocks:
                return torch.softmax(self.parts.head(h).float(), -1)
            f = self._tail(self.primals, h).float()

            def tangent(t: dict) -> Tensor:
                return jvp(lambda p: self._tail(p, h), (self.primals,), (t,))[1]

            g = vmap(tangent)(self.tangents).float()
        return torch.softmax(f.unsqueeze(0) + g, -1).mean(0)


def time_call(fn: Callable[[], object], *, n_warmup: int, n_iters: int, device: torch.device) -> tuple[float, float | None]:
    """Median wall time (s) of ``fn()`` over ``n_iters`` calls, and peak extra CUDA memory (MiB).

    CUDA is synchronised around every call; memory is ``max_memory_allocated`` above the
    allocation before the calls (None on CPU).
    """
    for _ in range(n_warmup):
        fn()
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(n_iters):
        t0 = time.perf_counter()
        fn()
        if cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    mem = (torch.cuda.max_memory_allocated() - base) / 2**20 if cuda else None
    return statistics.median(times), mem


def latency_table(model: nn.Module, posterior: BlockPosterior, x: Tensor, subsets: dict[str, list[int]], *,
                  n_samples: int, seed: int, device: torch.device, n_warmup: int, n_iters: int) -> pd.DataFrame:
    """Latency (ms per image) and peak extra memory of the GLM predictive for each block choice.

    Row ``"deterministic"`` is the plain MAP forward pass with fused attention (the merged-weights
    cost is lower still); the Bayesian rows run the GLM predictive (:class:`GLMPredictor` in its
    ``'auto'`` mode, recorded in ``mode``) without fused attention; ``extra_ms`` is each row's
    latency minus the deterministic one.
    """
    model.eval()
    dtype = amp_dtype(device) or torch.float32
    with torch.no_grad(), autocast(device):
        sec, mem = time_call(lambda: model(x), n_warmup=n_warmup, n_iters=n_iters, device=device)
    rows = [{"posterior": "deterministic", "n_blocks": 0, "first_block": -1, "mode": "", "ms_per_image": 1e3 * sec / len(x),
             "peak_mib": mem}]
    for name, blocks in subsets.items():
        pred = GLMPredictor(model, posterior, blocks, n_samples=n_samples, seed=seed, device=device, dtype=dtype)
        sec, mem = time_call(partial(pred, x), n_warmup=n_warmup, n_iters=n_iters, device=device)
        rows.append({"posterior": name, "n_blocks": len(blocks), "first_block": min(blocks),
                     "mode": "reverse" if pred.reverse else "forward",
                     "ms_per_image": 1e3 * sec / len(x), "peak_mib": mem})
    table = pd.DataFrame(rows)
    table["extra_ms"] = table.ms_per_image - table.ms_per_image.iloc[0]
    return table
