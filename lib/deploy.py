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

import time
from dataclasses import dataclass
from functools import partial
from typing import Callable, Literal

import numpy as np
import pandas as pd
import torch
from torch import Tensor, nn
from torch.func import functional_call, jvp, vmap

from lib.artifacts import Stage, cached
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


@dataclass(frozen=True)
class Timing:
    """Wall time of repeated calls: ``median``, ``q25``, ``q75`` (s; the inter-quartile range gives the
    noise) over ``n`` timed calls, and the peak extra CUDA memory (MiB; None on CPU)."""

    median: float
    q25: float
    q75: float
    n: int
    peak_mib: float | None


def time_call(fn: Callable[[], object], *, n_warmup: int, n_iters: int, device: torch.device) -> Timing:
    """Time ``n_iters`` calls of ``fn()`` after ``n_warmup`` untimed ones.

    On CUDA each call is timed on the GPU by a pair of ``torch.cuda.Event(enable_timing=True)``
    recorded around it on the current stream (the host waits for the end event after every
    call, so calls do not overlap); on the CPU by ``time.perf_counter``. Memory is
    ``max_memory_allocated`` above the allocation before the timed calls (None on CPU).
    """
    if n_iters < 1:
        raise ValueError(f"n_iters must be >= 1, got {n_iters}")
    for _ in range(n_warmup):
        fn()
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.synchronize(device)
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
    times = []
    for _ in range(n_iters):
        if cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        else:
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
    mem = (torch.cuda.max_memory_allocated(device) - base) / 2**20 if cuda else None
    q25, med, q75 = (float(v) for v in np.quantile(np.asarray(times), [0.25, 0.5, 0.75]))
    return Timing(median=med, q25=q25, q75=q75, n=n_iters, peak_mib=mem)


def latency_table(model: nn.Module, posterior: BlockPosterior, x: Tensor, subsets: dict[str, list[int]], *,
                  n_samples: int, seed: int, device: torch.device, n_warmup: int, n_iters: int) -> pd.DataFrame:
    """Latency (ms per image: median and quartiles over ``n_iters`` timed batches, :func:`time_call`)
    and peak extra memory of the GLM predictive for each block choice.

    Row ``"deterministic"`` is the plain MAP forward pass with fused attention (the merged-weights
    cost is lower still); the Bayesian rows run the GLM predictive (:class:`GLMPredictor` in its
    ``'auto'`` mode, recorded in ``mode``) without fused attention; ``blocks`` lists each choice's
    Bayesian blocks (space-separated); ``extra_ms`` is each row's median latency minus the
    deterministic one.
    """
    model.eval()
    dtype = amp_dtype(device) or torch.float32
    with torch.no_grad(), autocast(device):
        t = time_call(lambda: model(x), n_warmup=n_warmup, n_iters=n_iters, device=device)
    rows = [{"posterior": "deterministic", "n_blocks": 0, "first_block": -1, "blocks": "", "mode": "", **_ms(t, len(x))}]
    for name, blocks in subsets.items():
        pred = GLMPredictor(model, posterior, blocks, n_samples=n_samples, seed=seed, device=device, dtype=dtype)
        t = time_call(partial(pred, x), n_warmup=n_warmup, n_iters=n_iters, device=device)
        rows.append({"posterior": name, "n_blocks": len(blocks), "first_block": min(blocks),
                     "blocks": " ".join(map(str, sorted(blocks))), "mode": "reverse" if pred.reverse else "forward",
                     **_ms(t, len(x))})
    table = pd.DataFrame(rows)
    table["extra_ms"] = table.ms_per_image - table.ms_per_image.iloc[0]
    return table


def _ms(t: Timing, batch: int) -> dict[str, float | int | None]:
    scale = 1e3 / batch
    return {"ms_per_image": scale * t.median, "ms_q25": scale * t.q25, "ms_q75": scale * t.q75, "n_iters": t.n,
            "peak_mib": t.peak_mib}


def cost_model_violations(latency: pd.DataFrame) -> pd.DataFrame:
    """Pairs of priced choices that contradict the cost model: a superset of Bayesian blocks costs at
    least as much as its subset (the tail from its first Bayesian block is at least as deep and it
    has at least as many Bayesian blocks; ``all`` is a superset of every choice).

    ``latency``: :func:`latency_table` rows (``posterior``, ``blocks``, ``ms_per_image``,
    ``ms_q25``, ``ms_q75``). A pair (subset ``A``, superset ``B``) is a violation only when the
    difference exceeds the measurement noise: ``B``'s upper quartile lies below ``A``'s lower
    quartile (their inter-quartile ranges do not overlap). Returns one row per violation
    (``subset``, ``superset`` and both medians and quartiles), empty when the measurements are
    consistent with the model; rows of equal block sets are not compared. The ``deterministic`` row
    is the empty set: every linearised predictive includes the MAP forward pass, so a choice timed
    below the deterministic model is a violation too.
    """
    need = ["posterior", "blocks", "ms_per_image", "ms_q25", "ms_q75"]
    missing = [c for c in need if c not in latency.columns]
    if missing:
        raise ValueError(f"cost_model_violations: latency table lacks columns {missing}; use lib.deploy.latency_table")
    sets = {r.posterior: frozenset() if r.posterior == "deterministic" else frozenset(int(b) for b in str(r.blocks).split())
            for r in latency.itertuples()}
    by = latency.set_index("posterior")
    out = []
    for a, sa in sets.items():
        for b, sb in sets.items():
            if sa < sb and by.loc[b, "ms_q75"] < by.loc[a, "ms_q25"]:
                out.append({"subset": a, "superset": b,
                            "subset_ms": by.loc[a, "ms_per_image"], "subset_q25": by.loc[a, "ms_q25"],
                            "superset_ms": by.loc[b, "ms_per_image"], "superset_q75": by.loc[b, "ms_q75"]})
    cols = ["subset", "superset", "subset_ms", "subset_q25", "superset_ms", "superset_q75"]
    return pd.DataFrame(out, columns=cols)


def cached_latency(model: nn.Module, posterior: BlockPosterior, x: Tensor, subsets: dict[str, list[int]], *,
                   n_samples: int, seed: int, device: torch.device, n_warmup: int, n_iters: int,
                   upstream: list[Stage]) -> pd.DataFrame:
    """:func:`latency_table` measured once and kept as the cached stage ``latency`` (file
    ``latency.csv``), so that every chapter that prices block choices reads the same measurement.
    Keyed by the subsets, the batch size, K, the seed, the timing settings and the device's name;
    ``upstream``: the stages of ``model`` and ``posterior`` (MAP and Laplace)."""
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"

    def compute(st: Stage) -> None:
        latency_table(model, posterior, x, subsets, n_samples=n_samples, seed=seed, device=device,
                      n_warmup=n_warmup, n_iters=n_iters).to_csv(st.file("latency.csv"), index=False)

    inputs = {"subsets": {k: sorted(v) for k, v in subsets.items()}, "batch": len(x), "n_samples": n_samples,
              "seed": seed, "n_warmup": n_warmup, "n_iters": n_iters, "device": name}
    st = cached("latency", inputs, code=__name__, compute=compute, upstream=upstream)
    return pd.read_csv(st.file("latency.csv"), dtype={"posterior": str, "blocks": str, "mode": str},
                       keep_default_na=False, na_values={"peak_mib": [""]})
