"""Exact (dense) GGN of one transformer block's LoRA parameters.

For a block ``ℓ`` with LoRA parameters ``θ_ℓ ∈ R^{P_ℓ}`` the GGN of the summed cross-entropy
(martens2020new; as :mod:`lib.laplace.curvature`) is

    G_ℓ = Σ_n J_nᵀ Λ_n J_n,   J_n = ∂f(x_n)/∂θ_ℓ ∈ R^{C × P_ℓ},   Λ_n = diag(p_n) − p_n p_nᵀ,

kept dense: it couples the ``A`` and ``B`` factors of a LoRA map and the maps of the block with
each other, which K-FAC and the diagonal GGN drop. With ``Λ_n = S_n S_nᵀ`` (the ``C − 1`` output
vectors of :func:`lib.laplace.curvature.output_vectors`), ``G_ℓ = Σ_n Σ_s r_ns r_nsᵀ`` with the
rows ``r_ns = J_nᵀ S_n[:, s]``: one vector-Jacobian product per output vector and batch, whose
pull-back to an adapted ``nn.Linear`` ``W`` (``A`` or ``B``) with inputs ``a_nt`` and output
gradients ``g_nst`` is the per-example gradient ``Σ_t g_nst a_ntᵀ`` (out × in). The rows of a
batch, ``(C − 1)·N × P_ℓ``, are multiplied into ``G_ℓ`` as one Gram product
(:func:`lib.laplace.curvature.add_gram`). Cost per block: ``N (C − 1) P_ℓ²`` multiply-adds and
``P_ℓ²`` accumulator entries (``4 P_ℓ²`` bytes in float32), which is why a dense block is limited
to :data:`lib.config.DENSE_BLOCK_MAX_PARAMS` parameters.

Parameter order of ``θ_ℓ`` (as the dense vectors of :mod:`lib.laplace.posterior`): LoRA modules of
the block by name, ``A`` then ``B``, each row-major.
"""

from __future__ import annotations

import dataclasses
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Iterable, Iterator

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm import tqdm

from lib.config import DENSE_BLOCK_MAX_PARAMS
from lib.laplace.curvature import Fisher, Recorder, _Common, _tokens, add_gram, lora_trainable, output_grads, output_vectors
from lib.model import LoraModule, fused_attention_off, lora_modules


@dataclass
class DenseCurvature(_Common):
    """Exact GGN per transformer block: ``ggn[block]`` (P_ℓ, P_ℓ), parameter order of the module docstring."""

    ggn: dict[int, Tensor]

    def scaled(self, n_data: int) -> "DenseCurvature":
        """The curvature extrapolated to ``n_data`` examples (see :meth:`KronCurvature.scaled`)."""
        s = n_data / self.n_data
        return dataclasses.replace(self, ggn={b: g * s for b, g in self.ggn.items()}, n_data=n_data,
                                   loss=self.loss * s)


def block_params(model: nn.Module) -> dict[int, int]:
    """Number of LoRA parameters ``P_ℓ`` of every transformer block (``A`` and ``B`` of its maps)."""
    out: dict[int, int] = {}
    for m in lora_modules(model):
        out[m.block] = out.get(m.block, 0) + m.A.weight.numel() + m.B.weight.numel()
    return out


def _requested_blocks(model: nn.Module, blocks: Iterable[int] | None) -> tuple[list[LoraModule], dict[int, int], list[int]]:
    """The model's LoRA modules, ``P_ℓ`` of every block, and the requested blocks (default all),
    sorted; a requested block without LoRA modules is an error."""
    mods = lora_modules(model)
    if not mods:
        raise ValueError("model has no LoRA modules; wrap it with lib.model.add_lora first")
    sizes = block_params(model)
    blocks = sorted(set(sizes) if blocks is None else set(blocks))
    bad = [b for b in blocks if b not in sizes]
    if bad:
        raise ValueError(f"blocks {bad} have no LoRA modules; the model has blocks {sorted(sizes)}")
    return mods, sizes, blocks


def fit_block_ggn(
    model: nn.Module,
    batches: Iterable[tuple[Tensor, Tensor]],
    *,
    device: torch.device | str,
    blocks: Iterable[int] | None = None,
    fisher: Fisher = "exact",
    mc_samples: int = 1,
    generator: torch.Generator | None = None,
    autocast_dtype: torch.dtype | None = None,
    class_chunk: int = 1,
    dtype: torch.dtype = torch.float32,
    max_params: int = DENSE_BLOCK_MAX_PARAMS,
    progress: bool | None = None,
) -> DenseCurvature:
    """Dense GGN ``G_ℓ`` (P_ℓ × P_ℓ) of every block in ``blocks`` (default all) over ``batches``.

    ``batches``: (images ``(N, 3, H, W)``, labels ``(N,)``); the labels enter only the loss.
    ``fisher``, ``mc_samples``, ``generator``, ``autocast_dtype``, ``class_chunk`` as in
    :func:`lib.laplace.curvature.fit_kron`; ``dtype``: accumulation dtype of ``G_ℓ`` (float32 or
    float64). Blocks with more than ``max_params`` parameters are refused. One pass over the data
    serves all requested blocks.
    """
    if dtype not in (torch.float32, torch.float64):
        raise ValueError(f"dtype is {dtype}; use torch.float32 or torch.float64")
    mods, sizes, blocks = _requested_blocks(model, blocks)
    big = {b: sizes[b] for b in blocks if sizes[b] > max_params}
    if big:
        raise ValueError(
            f"blocks {sorted(big)} have {max(big.values())} LoRA parameters, more than the dense limit "
            f"{max_params} (lib.config.DENSE_BLOCK_MAX_PARAMS); use laplace.structure: kron or diag"
        )
    device = torch.device(device)
    ggn = {b: torch.zeros(sizes[b], sizes[b], device=device, dtype=dtype) for b in blocks}
    loss, n_data = 0.0, 0
    for logits, y, rows in block_rows(model, batches, blocks, device=device, fisher=fisher, mc_samples=mc_samples,
                                      generator=generator, autocast_dtype=autocast_dtype, class_chunk=class_chunk,
                                      progress=progress):
        if logits is not None:
            loss += float(F.cross_entropy(logits, y, reduction="sum"))
            n_data += len(y)
        for b, r in rows.items():
            r = r.reshape(-1, r.shape[-1])
            if dtype == torch.float64:
                ggn[b].addmm_(r.T.double(), r.double())
            else:
                add_gram(ggn[b], r)
    return DenseCurvature(
        blocks={m.name: m.block for m in mods},
        mean={m.name: (m.A.weight.detach().float().clone(), m.B.weight.detach().float().clone()) for m in mods},
        n_data=n_data, loss=loss, fisher=fisher, ggn=ggn,
    )


@dataclass
class BlockRows(_Common):
    """The pulled-back rows of every requested block, stacked: ``rows[block]`` (N (C − 1), P_ℓ)
    float64, so that the block's GGN is ``rowsᵀ rows`` (module docstring)."""

    rows: dict[int, Tensor]


def fit_block_rows(
    model: nn.Module,
    batches: Iterable[tuple[Tensor, Tensor]],
    *,
    device: torch.device | str,
    blocks: Iterable[int] | None = None,
    fisher: Fisher = "exact",
    mc_samples: int = 1,
    generator: torch.Generator | None = None,
    class_chunk: int = 1,
    progress: bool | None = None,
) -> BlockRows:
    """The rows ``r_ns`` of :func:`fit_block_ggn` kept instead of their Gram product (float64), for
    few images: ``N (C − 1) P_ℓ`` numbers per block instead of ``P_ℓ²``, and the spectrum of
    ``G_ℓ`` from the smaller Gram matrix (:func:`gram_eigenvalues`). Arguments as :func:`fit_block_ggn`."""
    mods, _, blocks = _requested_blocks(model, blocks)
    device = torch.device(device)
    parts: dict[int, list[Tensor]] = {b: [] for b in blocks}
    loss, n_data = 0.0, 0
    for logits, y, rows in block_rows(model, batches, blocks, device=device, fisher=fisher, mc_samples=mc_samples,
                                      generator=generator, class_chunk=class_chunk, progress=progress):
        if logits is not None:
            loss += float(F.cross_entropy(logits, y, reduction="sum"))
            n_data += len(y)
        for b, r in rows.items():
            parts[b].append(r.reshape(-1, r.shape[-1]).double())
    return BlockRows(
        blocks={m.name: m.block for m in mods},
        mean={m.name: (m.A.weight.detach().float().clone(), m.B.weight.detach().float().clone()) for m in mods},
        n_data=n_data, loss=loss, fisher=fisher, rows={b: torch.cat(p) for b, p in parts.items()},
    )


def gram_eigenvalues(rows: Tensor) -> Tensor:
    """Eigenvalues (ascending, (P,)) of ``G = rowsᵀ rows`` for ``rows`` (R, P).

    With ``R < P`` they are those of the ``R × R`` matrix ``rows rowsᵀ`` (same non-zero spectrum)
    followed by ``P − R`` zeros: ``O(R² P + R³)`` instead of ``O(P³)``, e.g. 2,000 rows against a
    24,576-parameter block. Negative round-off is clipped to 0 (``G`` is positive semi-definite).
    """
    n_rows, p = rows.shape
    if n_rows >= p:
        return torch.linalg.eigvalsh(rows.T @ rows).clamp_min(0)
    small = torch.linalg.eigvalsh(rows @ rows.T).clamp_min(0)
    return torch.cat([torch.zeros(p - n_rows, dtype=small.dtype, device=small.device), small])


def block_rows(
    model: nn.Module,
    batches: Iterable[tuple[Tensor, Tensor]],
    blocks: list[int],
    *,
    device: torch.device,
    fisher: Fisher | None,
    mc_samples: int = 1,
    generator: torch.Generator | None = None,
    autocast_dtype: torch.dtype | None = None,
    class_chunk: int = 1,
    progress: bool | None = None,
) -> Iterator[tuple[Tensor | None, Tensor | None, dict[int, Tensor]]]:
    """Pulled-back rows ``V[s, n]ᵀ J_n`` per block, ``class_chunk`` output vectors at a time.

    Yields ``(logits (N, C) or None, labels (N,) or None, {block: rows (k, N, P_ℓ) float32})``;
    logits and labels only with the first chunk of each batch. ``fisher``: the output vectors
    ``V`` (S, N, C) of :func:`lib.laplace.curvature.output_vectors`, or ``None`` for the ``C``
    unit vectors ``e_c``, whose rows are the Jacobian ``J_n`` itself (row ``c`` = ``∂f_c/∂θ_ℓ``).
    """
    if not isinstance(class_chunk, int) or class_chunk < 1:
        raise ValueError(f"class_chunk is {class_chunk!r}; use a positive integer (LaplaceConfig.class_chunk)")
    mods = [m for m in lora_modules(model) if m.block in blocks]
    linears = [lin for m in mods for lin in (m.A, m.B)]
    owner = [m.block for m in mods for _ in (0, 1)]
    attention = fused_attention_off(model) if class_chunk > 1 else nullcontext()
    with lora_trainable(model, mods), Recorder(linears) as rec, attention:
        for x, y in tqdm(batches, desc="dense block GGN", disable=None if progress is None else not progress):
            x = x.to(device, non_blocking=True)
            rec.clear()
            ctx = torch.autocast(device.type, dtype=autocast_dtype) if autocast_dtype is not None else nullcontext()
            with ctx:
                logits = model(x)
            logits = logits.float()
            if fisher is None:
                vecs = torch.eye(logits.shape[1], device=device)[:, None, :].expand(-1, len(x), -1)
            else:
                vecs = output_vectors(logits, fisher, mc_samples, generator)
            first = True
            for k0 in range(0, len(vecs), class_chunk):
                grads = output_grads(logits, rec.outputs, vecs[k0 : k0 + class_chunk],
                                     retain=k0 + class_chunk < len(vecs))
                per_block: dict[int, list[Tensor]] = {b: [] for b in blocks}
                for b, a, g in zip(owner, rec.inputs, grads):
                    g = g.reshape(g.shape[0], g.shape[1], -1, g.shape[-1]).float()
                    per_block[b].append(torch.einsum("knto,nti->knoi", g, _tokens(a.float())).flatten(2))
                rows = {b: torch.cat(r, dim=-1) for b, r in per_block.items()}
                yield (logits.detach(), y.to(device), rows) if first else (None, None, rows)
                first = False
            del logits, grads, vecs
            rec.clear()


def block_slices(model: nn.Module, block: int) -> dict[str, slice]:
    """Positions of each LoRA module of ``block`` (its ``A`` then ``B``) in ``θ_ℓ``: name → slice."""
    out, o = {}, 0
    for m in _block_modules(model, block):
        n = m.A.weight.numel() + m.B.weight.numel()
        out[m.name] = slice(o, o + n)
        o += n
    return out


def weight_slices(model: nn.Module, block: int) -> list[slice]:
    """Positions of each LoRA weight of ``block`` (``A`` then ``B`` of every module) in ``θ_ℓ``."""
    out, o = [], 0
    for m in _block_modules(model, block):
        for lin in (m.A, m.B):
            out.append(slice(o, o + lin.weight.numel()))
            o += lin.weight.numel()
    return out


def _block_modules(model: nn.Module, block: int) -> list[LoraModule]:
    return [m for m in lora_modules(model) if m.block == block]
