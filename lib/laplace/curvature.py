"""GGN / Fisher curvature of the softmax cross-entropy restricted to the LoRA parameters.

The curvature is that of the *summed* negative log-likelihood ``L(θ) = Σ_n CE(f(x_n; θ), y_n)``
(as laplace-torch uses, daxberger2021laplace): the generalised Gauss-Newton
``GGN = Σ_n J_nᵀ Λ_n J_n`` with ``Λ_n = diag(p_n) − p_n p_nᵀ`` the Hessian of the cross-entropy in
the logits (martens2020new). Only the LoRA ``A`` (``r × in``) and ``B`` (``out × r``) weights of
every adapted linear map are covered; the head and the backbone stay at the MAP.

Output gradients (``fisher``):

* ``'exact'``: with ``Λ_n = S_n S_nᵀ`` for a ``C × (C − 1)`` factor ``S_n`` (:func:`output_vectors`),
  the GGN is ``Σ_n Σ_s (J_nᵀ S_n[:, s])(J_nᵀ S_n[:, s])ᵀ``: ``C − 1`` vector-Jacobian products per
  batch, each backpropagating the column ``s`` of every example's ``S_n`` at once. ``class_chunk`` of them
  run as one batched backward pass (``torch.autograd.grad(..., is_grads_batched=True)``, a
  ``vmap`` over the cotangents: ``class_chunk×`` larger matrix products, one pass over the graph
  instead of ``class_chunk``); timm's fused attention is switched off for it, since the fused
  SDPA backward kernels have no batching rule on every device. The LayerNorm, GELU and softmax
  backward kernels have none either (torch 2.14) and run once per vector through PyTorch's
  vmap fallback; the matrix products, most of the work, are batched.
* ``'mc'``: the Monte-Carlo Fisher, ``mc_samples`` labels ``ỹ ~ Cat(p_n)`` per example and
  backward passes of ``(p_n − e_ỹ)/√M`` (unbiased for the GGN; needed when ``C`` is large).

Structures, both built from forward hooks on the LoRA ``A`` and ``B`` ``nn.Linear`` modules that
keep their input ``a`` (``N × T × in``) and output (whose gradients ``g``, ``N × T × out``, are asked
for directly with :func:`torch.autograd.grad`; no parameter gradient is formed):

* K-FAC (martens2015optimizing): ``GGN_W ≈ G ⊗ X`` for the row-major ``vec(W)`` of each of ``A``
  and ``B`` separately. Tokens share the weight, so the Kronecker factorisation needs a choice
  (eschenhagen2023kronecker; normalisation as in curvlinops' ``KFACLinearOperator``):

  - ``'expand'`` (tokens as extra examples): ``X = Σ_n Σ_t a_nt a_ntᵀ / (N T)``,
    ``G = Σ_n Σ_t g_nt g_ntᵀ``;
  - ``'reduce'`` (tokens aggregated first): ``X = Σ_n ā_n ā_nᵀ / N`` with ``ā_n`` the token mean,
    ``G = Σ_n ĝ_n ĝ_nᵀ`` with ``ĝ_n = Σ_t g_nt`` the token sum.

  The study uses ``'reduce'`` by default (``LaplaceConfig.kfac``): the ViT classifies from a single
  pooled (class) token, one loss term per image, which is the *reduce* setting of
  eschenhagen2023kronecker, where K-FAC-reduce is exact for deep linear networks with weight
  sharing; it also needs ``T×`` less compute for the factor accumulation.
  laplace-torch 0.3 (through curvlinops' ``KFACLinearOperator``) defaults to ``'expand'``.
* Diagonal: ``diag GGN_W = Σ_n Σ_c (Σ_t g_ntc a_ntᵀ)²``, the per-example gradients of one module
  at a time (``N × out × in``, never the whole model's).

Everything is accumulated in float32 on ``device``. The forward may run under autocast
(``autocast_dtype``; the study uses bfloat16 on CUDA and none on CPU, :func:`lib.train.amp_dtype`),
whose half-precision gradients and inputs enter the factors through TF32 tensor-core products
that are exact for them (:func:`add_gram`).
"""

from __future__ import annotations

import math
from contextlib import contextmanager, nullcontext
import dataclasses
from dataclasses import dataclass
from typing import Iterable, Iterator, Literal

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from lib.model import LoraModule, fused_attention_off, lora_modules

Fisher = Literal["exact", "mc"]
KfacApprox = Literal["expand", "reduce"]


@dataclass
class KronFactor:
    """K-FAC of one weight ``W`` (``out × in``): ``GGN ≈ G ⊗ X`` in row-major ``vec(W)``.

    ``G``: (out, out) output-gradient factor; ``X``: (in, in) input factor.
    """

    G: torch.Tensor
    X: torch.Tensor


@dataclass
class _Common:
    """Fields shared by both curvature structures.

    ``blocks``: LoRA module name → transformer block; ``mean``: name → (``A``, ``B``) MAP weights
    (``r × in``, ``out × r``); ``n_data``: examples seen; ``loss``: ``Σ_n CE`` at the MAP
    (``−log p(D | θ_MAP)``); ``fisher``: ``'exact'`` or ``'mc'``.
    """

    blocks: dict[str, int]
    mean: dict[str, tuple[torch.Tensor, torch.Tensor]]
    n_data: int
    loss: float
    fisher: str

    @property
    def names(self) -> list[str]:
        """LoRA module names, ordered by block then name (as :func:`lib.model.lora_modules`)."""
        return list(self.blocks)

    @property
    def n_blocks(self) -> int:
        """Number of transformer blocks (highest LoRA block index + 1)."""
        return max(self.blocks.values()) + 1


@dataclass
class KronCurvature(_Common):
    """K-FAC GGN: ``factors[name] = (KronFactor of A, KronFactor of B)``; ``kfac`` the variant."""

    factors: dict[str, tuple[KronFactor, KronFactor]]
    kfac: str

    def scaled(self, n_data: int) -> "KronCurvature":
        """The curvature extrapolated from the ``self.n_data`` examples seen to ``n_data``.

        The GGN and the loss are sums over the data, so both are multiplied by
        ``s = n_data / self.n_data`` (``G`` carries the factor; ``X`` is left as is).
        """
        s = n_data / self.n_data
        factors = {n: tuple(KronFactor(f.G * s, f.X) for f in pair) for n, pair in self.factors.items()}
        return dataclasses.replace(self, factors=factors, n_data=n_data, loss=self.loss * s)


@dataclass
class DiagCurvature(_Common):
    """Diagonal GGN: ``diag[name] = (diag for A (r, in), diag for B (out, r))``."""

    diag: dict[str, tuple[torch.Tensor, torch.Tensor]]

    def scaled(self, n_data: int) -> "DiagCurvature":
        """The curvature extrapolated to ``n_data`` examples (see :meth:`KronCurvature.scaled`)."""
        s = n_data / self.n_data
        diag = {n: tuple(d * s for d in pair) for n, pair in self.diag.items()}
        return dataclasses.replace(self, diag=diag, n_data=n_data, loss=self.loss * s)


def fit_kron(
    model: nn.Module,
    batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
    *,
    device: torch.device | str,
    kfac: KfacApprox = "reduce",
    fisher: Fisher = "exact",
    mc_samples: int = 1,
    generator: torch.Generator | None = None,
    autocast_dtype: torch.dtype | None = None,
    class_chunk: int = 1,
    progress: bool | None = None,
) -> KronCurvature:
    """K-FAC GGN of the summed cross-entropy over ``batches`` of (images ``(N, 3, H, W)``, labels ``(N,)``).

    See the module docstring for the factors of ``kfac='expand' | 'reduce'``, the output
    gradients of ``fisher='exact' | 'mc'`` (``generator`` on ``device`` seeds the MC labels) and
    ``class_chunk`` (output vectors per batched backward pass; peak memory grows with it).
    """
    if kfac not in ("expand", "reduce"):
        raise ValueError(f"kfac is {kfac!r}; use 'expand' or 'reduce' (LaplaceConfig.kfac)")
    acc = _accumulate(model, batches, device, "kron", kfac, fisher, mc_samples, generator, autocast_dtype,
                      class_chunk, progress)
    factors = {}
    for name in acc["blocks"]:
        pair = []
        for s in acc["stats"][name]:
            pair.append(KronFactor(G=s["G"], X=s["X"] / s["rows"]))
        factors[name] = tuple(pair)
    return KronCurvature(
        blocks=acc["blocks"], mean=acc["mean"], n_data=acc["n_data"], loss=acc["loss"], fisher=fisher,
        factors=factors, kfac=kfac,
    )


def fit_diag(
    model: nn.Module,
    batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
    *,
    device: torch.device | str,
    fisher: Fisher = "exact",
    mc_samples: int = 1,
    generator: torch.Generator | None = None,
    autocast_dtype: torch.dtype | None = None,
    class_chunk: int = 1,
    progress: bool | None = None,
) -> DiagCurvature:
    """Diagonal GGN of the summed cross-entropy over ``batches`` (see :func:`fit_kron`)."""
    acc = _accumulate(model, batches, device, "diag", "expand", fisher, mc_samples, generator, autocast_dtype,
                      class_chunk, progress)
    diag = {name: tuple(s["D"] for s in acc["stats"][name]) for name in acc["blocks"]}
    return DiagCurvature(
        blocks=acc["blocks"], mean=acc["mean"], n_data=acc["n_data"], loss=acc["loss"], fisher=fisher, diag=diag
    )


def fit_curvature(
    model: nn.Module,
    batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
    *,
    structure: Literal["kron", "diag"],
    device: torch.device | str,
    kfac: KfacApprox = "reduce",
    fisher: Fisher = "exact",
    mc_samples: int = 1,
    generator: torch.Generator | None = None,
    autocast_dtype: torch.dtype | None = None,
    class_chunk: int = 1,
    progress: bool | None = None,
) -> KronCurvature | DiagCurvature:
    """:func:`fit_kron` or :func:`fit_diag` by ``structure`` (``LaplaceConfig.structure``)."""
    kw = dict(device=device, fisher=fisher, mc_samples=mc_samples, generator=generator,
              autocast_dtype=autocast_dtype, class_chunk=class_chunk, progress=progress)
    if structure == "kron":
        return fit_kron(model, batches, kfac=kfac, **kw)
    if structure == "diag":
        return fit_diag(model, batches, **kw)
    raise ValueError(f"structure is {structure!r}; use 'kron' or 'diag' (LaplaceConfig.structure)")


def output_vectors(
    logits: torch.Tensor, fisher: Fisher, mc_samples: int, generator: torch.Generator | None
) -> torch.Tensor:
    """Logit-space vectors ``V`` (S, N, C) with ``Σ_s V[s, n] V[s, n]ᵀ = Λ_n`` (exact) or its MC estimate.

    exact: ``Λ_n = diag(p_n) − p_n p_nᵀ`` has rank ``C − 1`` (``Λ_n 1 = 0``), so ``S = C − 1``
    vectors suffice, one backward pass fewer per batch than the ``C`` columns
    ``u_c = √p_c (e_c − p)`` of the symmetric square root. The columns of ``[u_1 … u_C]`` satisfy
    ``Σ_c √p_c u_c = 0``; rotating them by the Householder reflection ``H`` that maps ``e_r`` to
    ``q = √p`` makes column ``r`` vanish and leaves ``Σ u uᵀ`` unchanged, giving, for ``c ≠ r``,
    ``v_c = u_c + u_r q_c / (1 − q_r)``. The pivot ``r`` is each example's least likely class, so
    ``1 − q_r ≥ 1 − 1/√2`` and the division is well conditioned. (``C = 1``: ``Λ = 0``, one zero vector.)
    mc: ``V[m, n] = (p_n − e_ỹ)/√M``, ``ỹ ~ Cat(p_n)`` (``S = M``).
    """
    p = logits.detach().float().softmax(-1)
    n, c = p.shape
    if fisher == "exact":
        eye = torch.eye(c, device=p.device, dtype=p.dtype)
        q = p.sqrt()
        u = q.T[:, :, None] * (eye[:, None, :] - p[None])  # (C, N, C): u[c, n] = √p_nc (e_c − p_n)
        if c == 1:
            return u
        r = p.argmin(-1)
        u_r = u[r, torch.arange(n, device=p.device)]  # (N, C)
        v = u + (q / (1 - q.gather(1, r[:, None]))).T[:, :, None] * u_r[None]
        keep = torch.arange(c, device=p.device)[None].expand(n, c)
        keep = keep[keep != r[:, None]].reshape(n, c - 1)  # (N, C − 1): the classes other than r
        return v.gather(0, keep.T[:, :, None].expand(c - 1, n, c))
    if fisher == "mc":
        if mc_samples < 1:
            raise ValueError(f"mc_samples is {mc_samples}; use a positive integer (LaplaceConfig.mc_samples)")
        y = torch.multinomial(p, mc_samples, replacement=True, generator=generator).T
        return (p[None] - F.one_hot(y, c).to(p.dtype)) / math.sqrt(mc_samples)
    raise ValueError(f"fisher is {fisher!r}; use 'exact' or 'mc' (LaplaceConfig.fisher)")


def _accumulate(model, batches, device, structure, kfac, fisher, mc_samples, generator, autocast_dtype,
                class_chunk, progress):
    if fisher not in ("exact", "mc"):
        raise ValueError(f"fisher is {fisher!r}; use 'exact' or 'mc' (LaplaceConfig.fisher)")
    if not isinstance(class_chunk, int) or class_chunk < 1:
        raise ValueError(f"class_chunk is {class_chunk!r}; use a positive integer (LaplaceConfig.class_chunk)")
    device = torch.device(device)
    mods = lora_modules(model)
    if not mods:
        raise ValueError("model has no LoRA modules; wrap it with lib.model.add_lora first")
    linears = [lin for m in mods for lin in (m.A, m.B)]
    stats = [_new_stats(lin, structure, device) for lin in linears]
    use_autocast = autocast_dtype is not None
    attention = fused_attention_off(model) if class_chunk > 1 else nullcontext()
    loss, n_data = 0.0, 0
    with lora_trainable(model, mods), Recorder(linears) as rec, attention:
        for x, y in tqdm(batches, desc=f"{structure} GGN", disable=None if progress is None else not progress):
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            rec.clear()
            ctx = torch.autocast(device.type, dtype=autocast_dtype) if use_autocast else nullcontext()
            with ctx:
                logits = model(x)
            logits = logits.float()
            loss += float(F.cross_entropy(logits.detach(), y, reduction="sum"))
            n_data += len(y)
            vecs = output_vectors(logits, fisher, mc_samples, generator)
            if structure == "kron":
                for s, a in zip(stats, rec.inputs):
                    _add_input_factor(s, _tokens(a), kfac)
            for k0 in range(0, len(vecs), class_chunk):
                grads = output_grads(logits, rec.outputs, vecs[k0 : k0 + class_chunk],
                                      retain=k0 + class_chunk < len(vecs))
                for s, a, g in zip(stats, rec.inputs, grads):
                    g = g.reshape(g.shape[0], g.shape[1], -1, g.shape[-1])
                    if structure == "kron":
                        g = g.reshape(-1, g.shape[-1]) if kfac == "expand" else g.float().sum(2).flatten(0, 1)
                        add_gram(s["G"], g)
                    else:
                        s["D"].add_(torch.einsum("knto,nti->knoi", g.float(), _tokens(a.float())).square().sum((0, 1)))
            del logits, grads, vecs
            rec.clear()
    return {
        "blocks": {m.name: m.block for m in mods},
        "mean": {m.name: (m.A.weight.detach().float().clone(), m.B.weight.detach().float().clone()) for m in mods},
        "stats": {m.name: (stats[2 * i], stats[2 * i + 1]) for i, m in enumerate(mods)},
        "n_data": n_data,
        "loss": loss,
    }


def output_grads(
    logits: torch.Tensor, outputs: list[torch.Tensor], vecs: torch.Tensor, *, retain: bool
) -> tuple[torch.Tensor, ...]:
    """``vecs`` (k, N, C) pulled back to every recorded output: tensors (k, *output.shape).

    ``k = 1`` is a plain backward pass; ``k > 1`` one batched pass (``is_grads_batched``).
    """
    if len(vecs) == 1:
        grads = torch.autograd.grad(logits, outputs, grad_outputs=vecs[0], retain_graph=retain)
        return tuple(g[None] for g in grads)
    return torch.autograd.grad(logits, outputs, grad_outputs=vecs, retain_graph=retain, is_grads_batched=True)


def _new_stats(lin: nn.Linear, structure: str, device: torch.device) -> dict:
    out, inp = lin.weight.shape
    z = lambda *s: torch.zeros(*s, device=device, dtype=torch.float32)  # noqa: E731
    if structure == "kron":
        return {"G": z(out, out), "X": z(inp, inp), "rows": 0}
    return {"D": z(out, inp)}


def _add_input_factor(s: dict, a: torch.Tensor, kfac: str) -> None:
    a = a.reshape(-1, a.shape[-1]) if kfac == "expand" else a.float().mean(1)
    add_gram(s["X"], a)
    s["rows"] += a.shape[0]


HALF = (torch.bfloat16, torch.float16)


def add_gram(acc: torch.Tensor, rows: torch.Tensor) -> None:
    """``acc += rowsᵀ rows`` in float32: ``acc`` (d, d) float32, ``rows`` (n, d) of any float dtype.

    Rows in bfloat16 or float16 (the output gradients and some layer inputs of a bf16 autocast
    pass) are exactly representable in TF32 (nvidia2020a100: 8-bit exponent, 10-bit mantissa; bf16 has 7
    mantissa bits, fp16 10 bits and a 5-bit exponent), and the product of two TF32 numbers is
    exact in float32. Their Gram matrix is therefore formed with ``float32_matmul_precision``
    ``'high'`` (TF32 tensor cores on CUDA): the same products accumulated in float32, only in
    another order, at several times the float32 rate. It is the largest cost of the K-FAC-expand
    fit of an exact GGN (``C − 1`` output vectors × tokens × ``out²`` per example and module).
    Float32 rows use full float32 precision. The global precision setting is restored.
    """
    if rows.dtype not in HALF:
        acc.addmm_(rows.T.float(), rows.float())
        return
    rows = rows.float()
    previous = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("high")
    try:
        acc.addmm_(rows.T, rows)
    finally:
        torch.set_float32_matmul_precision(previous)


def _tokens(t: torch.Tensor) -> torch.Tensor:
    """(N, d) → (N, 1, d); (N, T, d) unchanged; (N, …, d) → (N, T, d)."""
    return t.reshape(t.shape[0], -1, t.shape[-1])


@contextmanager
def lora_trainable(model: nn.Module, mods: list[LoraModule]) -> Iterator[None]:
    """Eval mode and ``requires_grad`` on every LoRA weight for the duration; restores both."""
    params = [lin.weight for m in mods for lin in (m.A, m.B)]
    flags = [p.requires_grad for p in params]
    was_training = model.training
    model.eval()
    for p in params:
        p.requires_grad_(True)
    try:
        yield
    finally:
        for p, f in zip(params, flags):
            p.requires_grad_(f)
        model.train(was_training)


class Recorder:
    """Forward hooks keeping each module's input (detached) and output (in the graph)."""

    def __init__(self, modules: list[nn.Module]):
        self.modules = modules
        self.index = {id(m): i for i, m in enumerate(modules)}
        self.clear()

    def clear(self) -> None:
        self.inputs: list[torch.Tensor | None] = [None] * len(self.modules)
        self.outputs: list[torch.Tensor | None] = [None] * len(self.modules)

    def _hook(self, module: nn.Module, args: tuple, output: torch.Tensor) -> None:
        i = self.index[id(module)]
        if self.outputs[i] is not None:
            raise ValueError(f"LoRA module {module} was called twice in one forward; not supported")
        self.inputs[i] = args[0].detach()
        self.outputs[i] = output

    def __enter__(self) -> "Recorder":
        self.handles = [m.register_forward_hook(self._hook) for m in self.modules]
        return self

    def __exit__(self, *exc) -> None:
        for h in self.handles:
            h.remove()
        self.clear()
