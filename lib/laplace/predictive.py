"""Linearised (GLM) predictive of a block-diagonal LoRA Laplace posterior, for every block subset.

The GLM predictive (immer2021improving; daxberger2021laplace) replaces the network by its
first-order expansion in the LoRA parameters around the MAP ``θ*``:
``f_lin(x; θ) = f(x; θ*) + J(x)(θ − θ*)``. The posterior ``p_S(θ) = N(θ*, Σ_S)`` of a subset ``S``
of Bayesian transformer blocks is block-diagonal across blocks, so the logit perturbation is a sum
of independent per-block terms, ``J(x) δθ = Σ_{ℓ∈S} J_ℓ(x) δθ_ℓ`` with ``δθ_ℓ ~ N(0, Σ_ℓ)``.

:func:`perturbation_bank` therefore computes once, for every block ``ℓ``, every test point ``x_n``
and ``K`` parameter samples ``δθ_ℓ^(k)`` drawn once per block (shared by all points and by all
subsets: common random numbers), the Jacobian-vector products
``delta[ℓ, n, k] = J_ℓ(x_n) δθ_ℓ^(k)`` by forward-mode AD (baydin2018automatic). Only the tail of
the network after block ``ℓ`` is differentiated: the block inputs are cached from a single prefix
pass per batch. The same bank can be computed in reverse mode (one backward pass per class, then
per-example Jacobians contracted with the samples), which is cheaper when the number of classes
``C`` is not large against ``K``; ``perturbation_bank(mode='auto')`` picks it when
``C ≤ REVERSE_CLASSES_PER_SAMPLE · K`` (:data:`REVERSE_CLASSES_PER_SAMPLE`).
Any subset's predictive is then a masked sum over the bank
(:func:`subset_probs`, :func:`iter_subset_probs`), e.g. all ``2^L`` subsets for exact Shapley values.
"""

from __future__ import annotations

import math
import warnings
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable, Iterable, Iterator, Literal, Protocol

import numpy as np
import torch
from torch import Tensor, nn
from torch.func import functional_call, jvp, vmap
from tqdm import tqdm

from lib.laplace.curvature import Recorder, lora_trainable, output_grads
from lib.model import fused_attention_off, lora_modules, n_blocks, unwrap, vit_parts


class BlockPosterior(Protocol):
    """What the bank needs of a posterior that is block-diagonal across transformer blocks."""

    blocks: list[int]

    def sample_block(self, block: int, n_samples: int, generator: torch.Generator) -> dict[str, tuple[Tensor, Tensor]]:
        """Zero-mean samples ``{module name: (dA (K, r, in), dB (K, out, r))}`` from ``N(0, Σ_block)``."""


@dataclass(frozen=True)
class Bank:
    """Per-block logit perturbations of the linearised predictive.

    ``map_logits`` (N, C): ``f(x_n; θ*)``; ``labels`` (N,); ``delta`` (L, N, K, C), fp32:
    ``delta[i, n, k] = J_{blocks[i]}(x_n) δθ_{blocks[i]}^(k)``; ``blocks``: the transformer block
    index of each row of ``delta`` (subset masks index these rows).
    """

    map_logits: Tensor
    labels: Tensor
    delta: Tensor
    blocks: tuple[int, ...]

    @property
    def n_blocks(self) -> int:
        """Number of rows ``L`` of ``delta``."""
        return self.delta.shape[0]

    def to(self, device: torch.device | str) -> "Bank":
        """The same bank with its tensors on ``device``."""
        return Bank(self.map_logits.to(device), self.labels.to(device), self.delta.to(device), self.blocks)


def load_forward_ad() -> None:
    """Import torch's forward-AD decompositions now, without torch's own deprecation warning.

    torch ≥ 2.14 registers them through ``torch.jit.script`` on first use of forward AD and warns
    about its own call; importing them here first keeps that warning out of the book's outputs.
    """
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=FutureWarning, message=".*torch.jit.script.*")
        import torch._decomp.decompositions_for_jvp  # noqa: F401


def block_generator(seed: int, block: int, device: torch.device | str = "cpu") -> torch.Generator:
    """The generator from which block ``block``'s parameter samples are drawn.

    Derived from ``(seed, block)`` by numpy's ``SeedSequence`` so a block's samples do not depend
    on which other blocks are in the bank (common random numbers across banks and subsets).
    ``device``: where the generator lives (the posterior's device).
    """
    state = np.random.SeedSequence([int(seed), int(block)]).generate_state(1, dtype=np.uint64)[0]
    return torch.Generator(device=device).manual_seed(int(state & 0x7FFF_FFFF_FFFF_FFFF))


def block_samples(posterior: BlockPosterior, block: int, n_samples: int, seed: int) -> dict[str, tuple[Tensor, Tensor]]:
    """The ``n_samples`` samples of block ``block`` that :func:`perturbation_bank` uses.

    Drawn with :func:`block_generator` on ``posterior.device`` (CPU if it has none).
    """
    device = getattr(posterior, "device", "cpu")
    return posterior.sample_block(block, n_samples, block_generator(seed, block, device))


class StackedPosterior:
    """Several posteriors over the same blocks, drawn as one so that one bank pass serves them all
    (:func:`perturbation_banks`).

    :meth:`sample_block` ``(block, M·K, g)`` concatenates along the sample axis the ``K`` draws of
    each of the ``M`` members, every member drawing from a copy of ``g`` in the state it was handed
    over in: member ``i``'s samples are exactly those :func:`block_samples` gives it alone.
    """

    def __init__(self, members: list[BlockPosterior]):
        if not members:
            raise ValueError("StackedPosterior needs at least one member posterior")
        blocks = [sorted(m.blocks) for m in members]
        if any(b != blocks[0] for b in blocks):
            raise ValueError(f"the stacked posteriors must cover the same blocks; got {blocks}")
        self.members = list(members)
        self.blocks = list(members[0].blocks)
        self.device = getattr(members[0], "device", "cpu")

    def sample_block(self, block: int, n_samples: int, generator: torch.Generator) -> dict[str, tuple[Tensor, Tensor]]:
        """``{module name: (dA (M·K, r, in), dB (M·K, out, r))}``, member by member, ``K = n_samples / M``."""
        m = len(self.members)
        if n_samples % m:
            raise ValueError(f"n_samples {n_samples} must be a multiple of the {m} stacked posteriors")
        state = generator.get_state()
        draws = []
        for member in self.members:
            g = torch.Generator(device=generator.device)
            g.set_state(state)
            draws.append(member.sample_block(block, n_samples // m, g))
        names = [sorted(d) for d in draws]
        if any(n != names[0] for n in names):
            raise ValueError(f"the stacked posteriors sample different modules for block {block}: {names}")
        return {name: (torch.cat([d[name][0] for d in draws]), torch.cat([d[name][1] for d in draws]))
                for name in draws[0]}


def perturbation_banks(model: nn.Module, posteriors: list[BlockPosterior], batches: Iterable, *, n_samples: int,
                       **kwargs) -> list[Bank]:
    """:func:`perturbation_bank` of each of ``posteriors`` (same blocks), from one pass over ``batches``.

    The members' ``n_samples`` samples are stacked along the sample axis (:class:`StackedPosterior`),
    so each returned bank holds the samples, and up to rounding the numbers, that its posterior's own
    bank would (``delta[:, :, i·K:(i+1)·K]`` is member ``i``'s). In reverse mode the backward
    passes, the bank's main cost, are shared: measured on the 2-core CPU with the 12-block
    ``cifar10-cpu`` ViT, 5.46 s per batch of 256 images for ``K = 128`` against 5.08 s for ``K = 64``.
    ``kwargs``: those of :func:`perturbation_bank`; ``mode='auto'`` decides as for one member's ``K``.
    """
    # the mode each member's own bank would take (``'auto'`` decides on its K, not on M·K)
    kwargs["mode"] = "reverse" if uses_reverse_mode(model, n_samples, kwargs.get("mode", "auto")) else "forward"
    stacked = perturbation_bank(model, StackedPosterior(posteriors), batches, n_samples=n_samples * len(posteriors),
                                **kwargs)
    return [Bank(stacked.map_logits, stacked.labels, part.contiguous(), stacked.blocks)
            for part in stacked.delta.split(n_samples, dim=2)]


CLASS_CHUNK = 10
"""Output vectors per batched backward pass in reverse mode (a speed knob: same numbers; memory
grows with it)."""


def perturbation_bank(
    model: nn.Module,
    posterior: BlockPosterior,
    batches: Iterable,
    *,
    n_samples: int,
    seed: int,
    device: torch.device | str,
    dtype: torch.dtype = torch.float32,
    blocks: Iterable[int] | None = None,
    k_chunk: int | None = None,
    tangent_batching: Literal["shared", "folded"] = "shared",
    store_device: torch.device | str = "cpu",
    mode: Literal["auto", "forward", "reverse"] = "auto",
    class_chunk: int = CLASS_CHUNK,
) -> Bank:
    """Per-block GLM logit perturbations ``J_ℓ(x_n) δθ_ℓ^(k)`` of every test point (see :class:`Bank`).

    ``model``: a peft LoRA ViT (see :mod:`lib.model`) at the MAP; ``batches``: iterable of
    ``(x (B, 3, H, W), y (B,))``; ``blocks``: the Bayesian blocks (default ``posterior.blocks``);
    ``seed``: block ``ℓ``'s ``n_samples`` samples come from :func:`block_generator` ``(seed, ℓ)``.

    For each batch the prefix ``embed, blocks[0..L-1]`` runs once (giving the MAP logits and every
    block's input ``h_ℓ``); then for every ``ℓ`` one ``torch.func.jvp`` of the tail
    ``head ∘ blocks[L-1] ∘ … ∘ blocks[ℓ]`` at ``h_ℓ`` w.r.t. block ``ℓ``'s LoRA factors, whose
    tangent ``(dA, dB)`` enters each adapted map ``y = W x + s·B A x`` as ``s·(dB A x + B dA x)``.
    The ``K`` tangents are batched by ``vmap`` in chunks of ``k_chunk``: ``"shared"`` keeps one
    primal for all tangents, ``"folded"`` repeats the primal per tangent (as if the samples were
    folded into the batch). ``dtype=torch.bfloat16`` runs primal and tangents under autocast (the study: on CUDA);
    the bank is accumulated in fp32 on ``store_device``. Fused attention is switched off during
    the bank (it has no forward-mode AD) and restored afterwards.

    ``mode='reverse'`` computes the same numbers (same samples) from the other side: one forward
    pass and ``C`` vector-Jacobian products (``class_chunk`` per batched backward,
    :func:`lib.laplace.curvature.output_grads`) give every adapted map's output gradients
    ``g_nct``; with its inputs ``a_nt``, ``J_W(x_n)_c δW = Σ_t g_nctᵀ δW a_nt``, so
    ``delta[ℓ, n, k, c] = Σ_{W∈ℓ} ⟨Σ_t g_nct a_ntᵀ, δW^(k)⟩``. Its cost grows with ``C`` instead of
    with ``K`` times the tail depth; ``'auto'`` takes it when ``C ≤ REVERSE_CLASSES_PER_SAMPLE · K``.
    """
    if n_samples < 1:
        raise ValueError(f"n_samples must be >= 1, got {n_samples}")
    if tangent_batching not in ("shared", "folded"):
        raise ValueError(f"tangent_batching must be 'shared' or 'folded', got {tangent_batching!r}")
    device = torch.device(device)
    if dtype not in (torch.float32, torch.bfloat16):
        raise ValueError(f"dtype must be torch.float32 or torch.bfloat16, got {dtype}")
    blocks = tuple(sorted(set(posterior.blocks if blocks is None else (int(b) for b in blocks))))
    n_layers = n_blocks(model)
    unknown = [b for b in blocks if b not in posterior.blocks or not 0 <= b < n_layers]
    if not blocks or unknown:
        raise ValueError(f"blocks {list(blocks)} must be a non-empty subset of posterior.blocks {posterior.blocks}")
    k_chunk = n_samples if k_chunk is None else int(k_chunk)
    if k_chunk < 1:
        raise ValueError(f"k_chunk must be >= 1 or None, got {k_chunk}")
    if uses_reverse_mode(model, n_samples, mode):
        return _reverse_bank(model, posterior, batches, blocks, n_samples=n_samples, seed=seed, device=device,
                             dtype=dtype, class_chunk=class_chunk, store_device=store_device)

    load_forward_ad()
    parts = vit_parts(model)
    tangents = {b: block_tangents(model, posterior, b, n_samples, seed, device) for b in blocks}
    primals = {}
    for b in blocks:
        params = dict(parts.blocks[b].named_parameters())
        primals[b] = {n: params[n].detach() for n in tangents[b]}

    was_training = model.training
    map_logits, labels, deltas = [], [], []
    try:
        with fused_attention_off(model):
            model.eval()
            total = len(batches) if hasattr(batches, "__len__") else None
            for x, y in tqdm(batches, total=total, desc="perturbation bank", disable=None):
                x = x.to(device)
                with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
                    h = parts.embed(x)
                    inputs = {}
                    for i, block in enumerate(parts.blocks):
                        if i in tangents:
                            inputs[i] = h
                        h = block(h)
                    map_logits.append(parts.head(h).float().to(store_device))
                    labels.append(y.to(store_device))
                    rows = []
                    for b in blocks:
                        out = _tail_jvp(parts, b, inputs[b], primals[b], tangents[b], k_chunk, tangent_batching)
                        rows.append(out.float().transpose(0, 1).to(store_device))  # (B, K, C)
                    deltas.append(torch.stack(rows))
    finally:
        model.train(was_training)
    if not map_logits:
        raise ValueError("batches is empty; pass an iterable of (x, y) batches")
    return Bank(
        map_logits=torch.cat(map_logits),
        labels=torch.cat(labels),
        delta=torch.cat(deltas, dim=1),
        blocks=blocks,
    )


@dataclass
class ReverseSamples:
    """Posterior samples laid out for the reverse-mode bank: for every adapted ``nn.Linear``
    (``linears``, the LoRA ``A`` and ``B`` of the blocks), its samples ``δW`` (K, out, in) fp32 and
    the row of its block in the bank (``rows``)."""

    linears: list[nn.Module]
    samples: list[Tensor]
    rows: list[int]
    blocks: tuple[int, ...]
    n_samples: int


REVERSE_CLASSES_PER_SAMPLE = 4
"""``mode='auto'`` takes reverse mode when ``C ≤ REVERSE_CLASSES_PER_SAMPLE · K``. Forward mode
costs about one tail JVP per sample ``K``, reverse mode one backward pass per class ``C``; measured
at ``C/K = 100/32 ≈ 3.1``, reverse mode was faster on both machines the bank has run on: 4.39 s vs
8.76 s for 64 ViT-B/16 images at 224 px on an H200 (bf16, commit bcbb6b4, issue 19), and 2.13 s vs
6.9 s on the 2-core CPU with the tiny 12-block ViT (``benchmarks/README.md``). Its price is memory
(29.0 vs 11.0 GiB peak in that H200 run)."""


def uses_reverse_mode(model: nn.Module, n_samples: int, mode: Literal["auto", "forward", "reverse"]) -> bool:
    """Whether ``mode`` means reverse mode for ``model``: ``'auto'`` takes it when
    ``C ≤ REVERSE_CLASSES_PER_SAMPLE · K`` (``C`` classes, ``K = n_samples``)."""
    if mode not in ("auto", "forward", "reverse"):
        raise ValueError(f"mode must be 'auto', 'forward' or 'reverse', got {mode!r}")
    return mode == "reverse" or (
        mode == "auto" and unwrap(model).num_classes <= REVERSE_CLASSES_PER_SAMPLE * n_samples)


def _checked_samples(
    model: nn.Module, posterior: BlockPosterior, block: int, n_samples: int, seed: int
) -> list[tuple[nn.Module, Tensor]]:
    """Block ``block``'s samples (:func:`block_samples`) as ``(LoRA nn.Linear, δW (K, out, in))``
    pairs, ``A`` then ``B`` of each module, after checking modules and shapes against the model."""
    mods = {m.name: m for m in lora_modules(model) if m.block == block}
    drawn = block_samples(posterior, block, n_samples, seed)
    if set(drawn) != set(mods):
        raise ValueError(
            f"posterior.sample_block({block}) returned modules {sorted(drawn)}; "
            f"expected the LoRA modules of block {block}: {sorted(mods)}"
        )
    out = []
    for name, (dA, dB) in drawn.items():
        for lin, d in ((mods[name].A, dA), (mods[name].B, dB)):
            if tuple(d.shape) != (n_samples, *lin.weight.shape):
                raise ValueError(
                    f"posterior sample for '{name}' has shape {tuple(d.shape)}; expected {(n_samples, *lin.weight.shape)}"
                )
            out.append((lin, d))
    return out


def reverse_samples(
    model: nn.Module, posterior: BlockPosterior, blocks: tuple[int, ...], n_samples: int, seed: int,
    device: torch.device,
) -> ReverseSamples:
    """Draw block ``ℓ``'s samples with :func:`block_samples` ``(seed, ℓ)`` (the forward mode's samples)."""
    linears, samples, rows = [], [], []
    for row, b in enumerate(blocks):
        for lin, d in _checked_samples(model, posterior, b, n_samples, seed):
            linears.append(lin)
            samples.append(d.to(device=device, dtype=torch.float32))
            rows.append(row)
    return ReverseSamples(linears, samples, rows, tuple(blocks), n_samples)


def reverse_delta(
    model: nn.Module, rs: ReverseSamples, rec: Recorder, x: Tensor, *, dtype: torch.dtype, class_chunk: int
) -> tuple[Tensor, Tensor]:
    """MAP logits (B, C) and per-block perturbations (L_S, B, K, C) of one batch ``x`` in reverse mode.

    Needs the model in eval mode with the LoRA weights of ``rs`` requiring grad and ``rec``
    recording ``rs.linears`` (see :func:`_reverse_bank`): ``C`` one-hot output vectors are pulled
    back to every recorded output (``class_chunk`` per batched backward), and
    ``delta[ℓ, n, k, c] = Σ_{W∈ℓ} ⟨Σ_t g_nct a_ntᵀ, δW^(k)⟩``.
    """
    rec.clear()
    device = x.device
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
        logits = model(x)
    logits = logits.float()
    n, c = logits.shape
    vecs = torch.eye(c, device=device)[:, None, :].expand(c, n, c)
    delta = torch.zeros(len(rs.blocks), n, rs.n_samples, c, device=device)
    for k0 in range(0, c, class_chunk):
        grads = output_grads(logits, rec.outputs, vecs[k0 : k0 + class_chunk], retain=k0 + class_chunk < c)
        for row, d, a, g in zip(rs.rows, rs.samples, rec.inputs, grads):
            g = g.float().reshape(g.shape[0], n, -1, g.shape[-1])
            jac = torch.einsum("knto,nti->knoi", g, a.float().reshape(n, -1, a.shape[-1]))
            delta[row, :, :, k0 : k0 + g.shape[0]] += torch.einsum("knoi,soi->nsk", jac, d)
    rec.clear()
    return logits.detach(), delta


@contextmanager
def reverse_mode(model: nn.Module, rs: ReverseSamples) -> Iterator[Recorder]:
    """Fused attention off, eval mode, LoRA weights of ``rs`` requiring grad and their maps recorded
    for :func:`reverse_delta`; everything is restored on exit."""
    mods = [m for m in lora_modules(model) if m.block in rs.blocks]
    with fused_attention_off(model), lora_trainable(model, mods), Recorder(rs.linears) as rec:
        yield rec


def _reverse_bank(model, posterior, batches, blocks, *, n_samples, seed, device, dtype, class_chunk,
                  store_device) -> Bank:
    """:func:`perturbation_bank` in reverse mode (see there): output gradients, not tangents."""
    if class_chunk < 1:
        raise ValueError(f"class_chunk must be >= 1, got {class_chunk}")
    rs = reverse_samples(model, posterior, blocks, n_samples, seed, device)
    map_logits, labels, deltas = [], [], []
    with reverse_mode(model, rs) as rec:
        total = len(batches) if hasattr(batches, "__len__") else None
        for x, y in tqdm(batches, total=total, desc="perturbation bank (reverse)", disable=None):
            logits, delta = reverse_delta(model, rs, rec, x.to(device), dtype=dtype, class_chunk=class_chunk)
            map_logits.append(logits.to(store_device))
            labels.append(y.to(store_device))
            deltas.append(delta.to(store_device))
    if not map_logits:
        raise ValueError("batches is empty; pass an iterable of (x, y) batches")
    return Bank(map_logits=torch.cat(map_logits), labels=torch.cat(labels), delta=torch.cat(deltas, dim=1),
                blocks=blocks)


def block_tangents(
    model: nn.Module, posterior: BlockPosterior, block: int, n_samples: int, seed: int, device: torch.device
) -> dict[str, Tensor]:
    """Block-relative LoRA parameter names → (K, *param.shape) tangents on ``device``."""
    rel = {id(p): n for n, p in vit_parts(model).blocks[block].named_parameters()}
    return {rel[id(lin.weight)]: d.to(device=device, dtype=lin.weight.dtype)
            for lin, d in _checked_samples(model, posterior, block, n_samples, seed)}


def _tail_jvp(parts, block: int, h: Tensor, primals: dict, tangents: dict, k_chunk: int, batching: str) -> Tensor:
    """``(K, B, C)`` tangents of the logits: JVP of the tail from block ``block`` at input ``h``."""
    module = parts.blocks[block]
    tail = parts.blocks[block + 1 :]

    def logits(params: dict, z: Tensor) -> Tensor:
        z = functional_call(module, params, (z,), strict=False)
        for b in tail:
            z = b(z)
        return parts.head(z)

    def tangent_out(t: dict, z: Tensor) -> Tensor:
        return jvp(lambda p: logits(p, z), (primals,), (t,))[1]

    k_total = next(iter(tangents.values())).shape[0]
    outs = []
    for start in range(0, k_total, k_chunk):
        chunk = {n: t[start : start + k_chunk] for n, t in tangents.items()}
        if batching == "shared":
            outs.append(vmap(tangent_out, in_dims=(0, None))(chunk, h))
        else:
            k = next(iter(chunk.values())).shape[0]
            outs.append(vmap(tangent_out, in_dims=(0, 0))(chunk, h.expand(k, *h.shape)))
    return torch.cat(outs)


def _mask(bank: Bank, subset: Tensor | int | Iterable[bool]) -> Tensor:
    """A bool mask (L,) over the bank's rows from a bool mask or an int bitmask (bit i = row i)."""
    L = bank.n_blocks
    if isinstance(subset, (int, np.integer)) and not isinstance(subset, bool):
        if not 0 <= int(subset) < 2**L:
            raise ValueError(f"subset bitmask {subset} out of range [0, 2**{L})")
        return torch.tensor([(int(subset) >> i) & 1 == 1 for i in range(L)])
    mask = torch.as_tensor(subset)
    if mask.dtype != torch.bool or mask.shape != (L,):
        raise ValueError(
            f"subset must be a bool mask of shape ({L},) over bank.blocks {bank.blocks} or an int bitmask; "
            f"got dtype {mask.dtype}, shape {tuple(mask.shape)}"
        )
    return mask


def _link(map_logits: Tensor, pert: Tensor, method: str) -> Tensor:
    """Predictive probabilities from MAP logits (..., N, C) and perturbations (..., N, K, C)."""
    if method == "mc":
        return torch.softmax(map_logits.unsqueeze(-2) + pert, dim=-1).mean(dim=-2)
    if method == "probit":
        return _probit(map_logits, pert.square().mean(dim=-2))
    raise ValueError(f"method must be 'mc' or 'probit', got {method!r}")


def _probit(map_logits: Tensor, var: Tensor) -> Tensor:
    """Extended probit: ``softmax(f / sqrt(1 + π/8 · v))`` for logit variances ``v`` like ``f``."""
    return torch.softmax(map_logits / torch.sqrt(1.0 + math.pi / 8.0 * var), dim=-1)


def _sample_terms(map_logits: Tensor, pert: Tensor, method: str) -> Tensor:
    """The per-sample terms that the predictive averages, from MAP logits (N, C) and perturbations
    (..., N, K, C): ``softmax(f_n + g_k[n])`` for ``"mc"``, ``g_k[n]²`` for ``"probit"``; returned as
    (..., K, N·C), ready to be weighted by a matrix product with weights (R, K)."""
    if method == "mc":
        terms = torch.softmax(map_logits.unsqueeze(-2) + pert, dim=-1)
    elif method == "probit":
        terms = pert.square()
    else:
        raise ValueError(f"method must be 'mc' or 'probit', got {method!r}")
    n, k, c = pert.shape[-3:]
    return terms.transpose(-3, -2).reshape(*pert.shape[:-3], k, n * c)


def _weighted_link(map_logits: Tensor, terms: Tensor, weights: Tensor, method: str) -> Tensor:
    """Predictive probabilities (..., R, N, C) from :func:`_sample_terms` (..., K, N·C) and sample
    weights (R, K): the weighted softmax average (``"mc"``) or the probit of the weighted variance."""
    out = (weights @ terms).reshape(*terms.shape[:-2], weights.shape[0], *map_logits.shape)
    return out if method == "mc" else _probit(map_logits, out)


def _subset_pert(bank: Bank, subset: Tensor | int, scale: float) -> Tensor:
    """``g_nk = √κ Σ_{i∈S} delta[i, n, k]`` (N, K, C) of ``subset`` at covariance scale ``κ``."""
    if not scale >= 0:
        raise ValueError(f"scale must be >= 0, got {scale}")
    mask = _mask(bank, subset).to(bank.delta.device)
    return torch.einsum("l,lnkc->nkc", mask.to(bank.delta.dtype) * math.sqrt(scale), bank.delta)


def subset_probs(
    bank: Bank, subset: Tensor | int, *, method: Literal["mc", "probit"] = "mc", scale: float = 1.0
) -> Tensor:
    """Linearised predictive probabilities (N, C) of the posterior keeping the blocks in ``subset``.

    ``subset``: bool mask (L,) over ``bank.blocks`` or an int bitmask (bit ``i`` ↔ ``bank.blocks[i]``).
    ``scale`` ``κ`` multiplies the covariance, ``Σ_S → κ Σ_S``, i.e. the perturbations by ``√κ``
    (:mod:`lib.laplace.scale`). With ``g_nk = √κ Σ_{i∈S} delta[i, n, k]`` and ``f_n`` the MAP logits:

    - ``"mc"``: ``p_n = (1/K) Σ_k softmax(f_n + g_nk)`` — probabilities are averaged, not logits
      (immer2021improving);
    - ``"probit"`` (extended probit, mackay1992evidence; daxberger2021laplace):
      ``p_n = softmax(f_n / sqrt(1 + π/8 · v_n))`` with ``v_nc = (1/K) Σ_k g_nkc²``, an unbiased MC
      estimate of ``diag(J Σ_S Jᵀ)`` (the samples are exactly zero-mean, so no mean is subtracted).

    The empty subset gives ``softmax(f_n)``.
    """
    pert = _subset_pert(bank, subset, scale)
    return _link(bank.map_logits.to(pert), pert, method)


def sample_mixture(
    bank: Bank, subset: Tensor | int, *, method: Literal["mc", "probit"] = "mc", scale: float = 1.0
) -> Callable[[Tensor], Tensor]:
    """The predictive of ``subset`` as a function of weights on the bank's K posterior samples.

    Returns ``mix``: weights (R, K), rows summing to 1, ↦ probabilities (R, N, C). With
    ``g_k[n] = √κ Σ_{i∈S} delta[i, n, k]`` and ``f_n`` the MAP logits:

    - ``"mc"``: ``p_n = Σ_k w_k softmax(f_n + g_k[n])``;
    - ``"probit"``: ``p_n = softmax(f_n / sqrt(1 + π/8 · Σ_k w_k g_k[n]²))``.

    Uniform weights ``1/K`` give :func:`subset_probs`; bootstrap multiplicities divided by K give
    the predictive of a resampled set of posterior samples, from which the Monte Carlo error of a
    statistic of the predictive is estimated (:func:`lib.stats.mc_error_delta_ece`). The per-sample
    softmaxes (or squared perturbations) are computed once, (K, N, C) floats.
    """
    pert = _subset_pert(bank, subset, scale)  # (N, K, C)
    f = bank.map_logits.to(pert)
    terms = _sample_terms(f, pert, method)  # (K, N·C)
    k = terms.shape[0]

    def mix(weights: Tensor) -> Tensor:
        if weights.ndim != 2 or weights.shape[1] != k:
            raise ValueError(f"weights must be (R, {k}) over the bank's samples; got {tuple(weights.shape)}")
        return _weighted_link(f, terms, weights.to(terms), method)

    return mix


def _iter_perts(bank: Bank, subsets: Tensor, scales: Tensor | None, chunk: int | None,
                max_elements: int) -> Iterator[tuple[slice, Tensor]]:
    """Yield ``(rows, pert)``: perturbations (s, N, K, C) of ``subsets[rows]`` at scales ``κ``,
    one matrix product ``(s, L) @ (L, N·K·C)`` of the masks weighted by ``√κ`` per chunk."""
    subsets = torch.as_tensor(subsets)
    L, N, K, C = bank.delta.shape
    if subsets.dtype != torch.bool or subsets.ndim != 2 or subsets.shape[1] != L:
        raise ValueError(f"subsets must be a bool tensor (S, {L}); got dtype {subsets.dtype}, shape {tuple(subsets.shape)}")
    if chunk is None:
        chunk = max(1, max_elements // (N * K * C))
    if chunk < 1:
        raise ValueError(f"chunk must be >= 1 or None, got {chunk}")
    flat = bank.delta.reshape(L, N * K * C)
    masks = subsets.to(device=flat.device, dtype=flat.dtype)
    if scales is not None:
        scales = torch.as_tensor(scales)
        if scales.shape != (subsets.shape[0],) or not bool((scales >= 0).all()):
            raise ValueError(f"scales must be non-negative, shape ({subsets.shape[0]},); got shape {tuple(scales.shape)}")
        masks = masks * scales.to(masks).sqrt()[:, None]
    for start in range(0, subsets.shape[0], chunk):
        rows = slice(start, min(start + chunk, subsets.shape[0]))
        yield rows, (masks[rows] @ flat).reshape(-1, N, K, C)


def iter_subset_probs(
    bank: Bank,
    subsets: Tensor,
    *,
    method: Literal["mc", "probit"] = "mc",
    scales: Tensor | None = None,
    chunk: int | None = None,
    max_elements: int = 2**27,
) -> Iterator[tuple[slice, Tensor]]:
    """Yield ``(rows, probs)`` with ``probs`` (s, N, C) = :func:`subset_probs` of ``subsets[rows]``.

    ``subsets``: bool (S, L); ``scales``: covariance scales ``κ`` (S,) (None: all 1). Each chunk of
    ``s`` subsets is one matrix product ``(s, L) @ (L, N·K·C)`` of the masks weighted by ``√κ``,
    followed by the link on the device of ``bank.delta``; ``chunk``
    defaults to the most subsets whose perturbations fit in ``max_elements`` floats. Consume chunk
    by chunk (e.g. an ECE per subset) to keep memory bounded for all ``2^L`` subsets.
    """
    f = bank.map_logits.to(bank.delta)
    for rows, pert in _iter_perts(bank, subsets, scales, chunk, max_elements):
        yield rows, _link(f, pert, method)


def standard_subsets(L: int) -> dict[str, Tensor]:
    """The named posteriors of the study as bool masks (L,).

    ``"none"`` (MAP), ``"single ℓ"``, ``"all"``, ``"all but ℓ"`` (leave-one-out) for
    ``ℓ = 0..L-1``, and ``"first k"``, ``"last k"`` for ``k = 1..L``.
    """
    if L < 1:
        raise ValueError(f"L must be >= 1, got {L}")
    eye = torch.eye(L, dtype=torch.bool)
    out = {"none": torch.zeros(L, dtype=torch.bool), "all": torch.ones(L, dtype=torch.bool)}
    out.update({f"single {i}": eye[i] for i in range(L)})
    out.update({f"all but {i}": ~eye[i] for i in range(L)})
    idx = torch.arange(L)
    out.update({f"first {k}": idx < k for k in range(1, L + 1)})
    out.update({f"last {k}": idx >= L - k for k in range(1, L + 1)})
    return out
