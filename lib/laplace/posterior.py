"""Gaussian Laplace posteriors ``N(θ_MAP, Σ)`` over the LoRA weights (K-FAC or diagonal).

Posterior precision per weight ``W`` of block ``ℓ``: ``GGN_W + δ_ℓ I`` with ``GGN_W`` from
:mod:`lib.laplace.curvature` (mackay1992practical, daxberger2021laplace; over LoRA weights as in
Laplace-LoRA, yang2024bayesian). Different weights are independent (block-diagonal precision),
except in the dense-block posterior, where only different transformer blocks are.

* K-FAC, ``GGN_W ≈ G ⊗ X`` with eigendecompositions ``G = U_G diag(λ_G) U_Gᵀ``,
  ``X = U_X diag(λ_X) U_Xᵀ``: ``Σ_W = (U_G ⊗ U_X) diag(1/(λ_G λ_Xᵀ + δ)) (U_G ⊗ U_X)ᵀ`` in
  row-major ``vec(W)``. With ``rank=k`` only the top-``k`` eigenpairs of each factor larger than
  ``k`` are kept and the rest of the spectrum is taken as zero curvature, so
  ``Σ_W = (I − P)/δ + (U_G ⊗ U_X) diag(1/(λ_G λ_Xᵀ + δ)) (U_G ⊗ U_X)ᵀ``, ``P`` the projector on
  ``span(U_G ⊗ U_X)``. A sample is ``ΔW = E/√δ + U_G [(U_Gᵀ E U_X) ⊙ (1/√(λ_G λ_Xᵀ + δ) − 1/√δ)] U_Xᵀ``
  with ``E ~ N(0, I)`` (``out × in``); untruncated it is ``U_G (Z ⊙ (λ_G λ_Xᵀ + δ)^{-1/2}) U_Xᵀ``.
* Diagonal: ``Σ_W = diag(1/(diag GGN_W + δ))``.
* Dense block (:class:`DenseBlockPosterior`): the exact GGN of all LoRA weights of a block,
  ``Σ_ℓ = (G_ℓ + δ_ℓ I)⁻¹`` through its eigendecomposition; weights of one block are coupled,
  different blocks independent.

The prior precision is one ``δ_ℓ`` per transformer block (``prior_precision`` has shape (L,);
a scalar prior is the same value in every block) and can be tuned by the Laplace marginal
likelihood (:mod:`lib.laplace.marglik`), per block or shared. ``restrict(S)`` gives the study's
``p_S(θ) = N(θ_MAP, Σ_S)``: covariance only for the blocks in ``S``, the rest at the MAP.

Parameter order of dense vectors (``dense_covariance``, ``mean_vector``): blocks ascending, LoRA
modules by name within a block (as :func:`lib.model.lora_modules`), ``A`` then ``B``, each row-major.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterable, Literal

import torch

from lib.laplace.curvature import DiagCurvature, KronCurvature
from lib.laplace.exact import DenseCurvature
from lib.laplace.marglik import log_evidence_terms, optimal_prior

Sample = dict[str, tuple[torch.Tensor, torch.Tensor]]


class LaplacePosterior:
    """Common interface of :class:`KronPosterior` and :class:`DiagPosterior` (do not instantiate).

    ``entries``: one dict per LoRA weight with ``name``, ``which`` (``'A'``/``'B'``), ``block``,
    ``mean`` (the MAP weight) and the structure's curvature tensors.
    """

    kind = ""

    def __init__(self, entries: list[dict], n_blocks: int, loss: float, n_data: int,
                 prior_precision: float | torch.Tensor, blocks: Iterable[int] | None = None):
        self.entries = entries
        self.n_blocks = n_blocks
        self.loss = float(loss)
        self.n_data = int(n_data)
        self.blocks = sorted(set(range(n_blocks) if blocks is None else blocks))
        self._check_blocks(self.blocks)
        self.per_block = not (isinstance(prior_precision, (int, float)) or torch.as_tensor(prior_precision).numel() == 1)
        self.prior_precision = self._expand_prior(prior_precision)

    @property
    def device(self) -> torch.device:
        """Device of the posterior's tensors (samples are drawn there)."""
        return self.entries[0]["mean"].device

    @property
    def names(self) -> list[str]:
        """LoRA module names in parameter order."""
        return list(dict.fromkeys(e["name"] for e in self.entries))

    def block_entries(self, block: int) -> list[dict]:
        """The entries of one block (``A`` and ``B`` of each of its LoRA modules)."""
        return [e for e in self.entries if e["block"] == block]

    # -- prior precision -------------------------------------------------------------------
    def _expand_prior(self, prior_precision: float | torch.Tensor) -> torch.Tensor:
        p = torch.as_tensor(prior_precision, dtype=torch.float32).reshape(-1).to(self.device)
        if p.numel() == 1:
            p = p.expand(self.n_blocks).clone()
        if p.shape != (self.n_blocks,):
            raise ValueError(
                f"prior_precision has {p.numel()} values; give a scalar or one per block ({self.n_blocks})"
            )
        if not bool((p > 0).all()):
            raise ValueError(f"prior_precision must be positive, got {p.tolist()}")
        return p

    def _check_blocks(self, blocks: Iterable[int]) -> None:
        bad = [b for b in blocks if not 0 <= b < self.n_blocks]
        if bad:
            raise ValueError(f"blocks {bad} out of range; the model has blocks 0..{self.n_blocks - 1}")

    def _block_eigs(self, block: int) -> torch.Tensor:
        """Eigenvalues of block ``block``'s GGN (P_ℓ,), in any order."""
        return torch.cat([self._eigs(e).reshape(-1) for e in self.block_entries(block)])

    def _groups(self, blocks: list[int]) -> tuple[list[torch.Tensor], torch.Tensor]:
        eigs = [self._block_eigs(b) for b in blocks]
        sq = torch.stack([sum(e["mean"].double().square().sum() for e in self.block_entries(b)) for b in blocks])
        return eigs, sq

    def marglik_terms(self, prior_precision: float | torch.Tensor | None = None) -> torch.Tensor:
        """Per-block δ-dependent evidence ``f_ℓ(δ_ℓ)`` (L,) float64, zero outside ``blocks`` (see marglik)."""
        delta = self.prior_precision if prior_precision is None else self._expand_prior(prior_precision)
        eigs, sq = self._groups(self.blocks)
        out = torch.zeros(self.n_blocks, dtype=torch.float64, device=self.device)
        out[self.blocks] = log_evidence_terms(eigs, sq, delta[self.blocks])
        return out

    def log_marginal_likelihood(self, prior_precision: float | torch.Tensor | None = None) -> torch.Tensor:
        """Laplace evidence ``log p(D|θ*) − ½ Σ_ℓ [δ_ℓ‖θ*_ℓ‖² − P_ℓ log δ_ℓ + log det(GGN_ℓ + δ_ℓ I)]`` over ``blocks``."""
        return -self.loss + self.marglik_terms(prior_precision).sum()

    def tune_prior(self, per_block: bool = True) -> torch.Tensor:
        """Set ``prior_precision`` to the evidence maximiser over ``blocks`` (one per block or shared).

        Per block, the evidence separates into one concave 1-D problem per block, each solved
        exactly (:func:`lib.laplace.marglik.optimal_prior`). Returns the new ``prior_precision``.
        """
        eigs, sq = self._groups(self.blocks)
        delta = self.prior_precision.clone()
        if per_block:
            delta[self.blocks] = optimal_prior(eigs, sq).float()
        else:
            delta[:] = optimal_prior([torch.cat(eigs)], sq.sum()[None]).float()
        self.prior_precision, self.per_block = delta, per_block
        return delta

    def restrict(self, blocks: Iterable[int],
                 restricted_prior: Literal["inherit", "retune"] = "inherit") -> "LaplacePosterior":
        """``p_S``: covariance only for ``blocks`` (``S``), all other LoRA weights at the MAP.

        ``'inherit'`` keeps the prior precision tuned on the full model; ``'retune'`` maximises the
        evidence of the Laplace over ``S`` alone (shared δ if this posterior's is, per block
        otherwise; per block both give the same δ because the evidence separates over blocks).
        Curvature tensors are shared with ``self``, not copied.
        """
        if restricted_prior not in ("inherit", "retune"):
            raise ValueError(f"restricted_prior is {restricted_prior!r}; use 'inherit' or 'retune'")
        blocks = sorted(set(blocks))
        self._check_blocks(blocks)
        new = object.__new__(type(self))
        new.__dict__.update(self.__dict__)
        new.blocks, new.prior_precision = blocks, self.prior_precision.clone()
        if restricted_prior == "retune" and blocks:
            new.tune_prior(per_block=self.per_block)
        return new

    # -- sampling and moments ----------------------------------------------------------------
    def sample_block(self, block: int, n_samples: int, generator: torch.Generator) -> Sample:
        """``n_samples`` zero-mean draws from ``N(0, Σ_block)``: name → (dA (K, r, in), dB (K, out, r)).

        Zeros for a block outside ``blocks``. ``generator`` must live on :attr:`device`.
        """
        self._check_blocks([block])
        delta = self.prior_precision[block]
        out: dict[str, list[torch.Tensor]] = {}
        for e in self.block_entries(block):
            if block in self.blocks:
                s = self._sample(e, delta, n_samples, generator)
            else:
                s = torch.zeros(n_samples, *e["mean"].shape, device=self.device)
            out.setdefault(e["name"], []).append(s)
        return {k: tuple(v) for k, v in out.items()}

    def variance_block(self, block: int) -> Sample:
        """Marginal posterior variances: name → (var A (r, in), var B (out, r)); zeros outside ``blocks``."""
        self._check_blocks([block])
        out: dict[str, list[torch.Tensor]] = {}
        for e in self.block_entries(block):
            v = self._variance(e, self.prior_precision[block]) if block in self.blocks else torch.zeros_like(e["mean"])
            out.setdefault(e["name"], []).append(v)
        return {k: tuple(v) for k, v in out.items()}

    def mean_vector(self, blocks: Iterable[int] | None = None) -> torch.Tensor:
        """``θ_MAP`` of ``blocks`` (default :attr:`blocks`) as one vector in parameter order."""
        blocks = self.blocks if blocks is None else sorted(set(blocks))
        return torch.cat([e["mean"].reshape(-1) for b in blocks for e in self.block_entries(b)])

    def dense_covariance(self, blocks: Iterable[int] | None = None) -> torch.Tensor:
        """Dense ``Σ`` (P × P) over ``blocks`` (default :attr:`blocks`), float64; tiny models only."""
        return self._dense(blocks, covariance=True)

    def dense_precision(self, blocks: Iterable[int] | None = None) -> torch.Tensor:
        """Dense posterior precision (P × P) over ``blocks``, float64; tiny models only."""
        return self._dense(blocks, covariance=False)

    def _dense(self, blocks, covariance: bool) -> torch.Tensor:
        blocks = self.blocks if blocks is None else sorted(set(blocks))
        self._check_blocks(blocks)
        mats = [self._dense_entry(e, self.prior_precision[b].double(), covariance)
                for b in blocks for e in self.block_entries(b)]
        if not mats:
            return torch.zeros(0, 0, dtype=torch.float64, device=self.device)
        return torch.block_diag(*mats)

    def summary(self) -> list[dict]:
        """Per block: ``block``, ``in_posterior``, ``n_params``, ``prior_precision``,
        ``curvature_trace`` (tr GGN), ``variance_trace`` (Σ of posterior variances, 0 outside
        ``blocks``) and ``effective_params`` ``γ = Σ_i λ_i/(λ_i + δ)``."""
        rows = []
        for b in range(self.n_blocks):
            es = self.block_entries(b)
            d = float(self.prior_precision[b])
            lam = self._block_eigs(b).double()
            rows.append({
                "block": b,
                "in_posterior": b in self.blocks,
                "n_params": sum(e["mean"].numel() for e in es),
                "prior_precision": d,
                "curvature_trace": float(lam.sum()),
                "variance_trace": float(sum(v.double().sum() for pair in self.variance_block(b).values() for v in pair)),
                "effective_params": float((lam / (lam + d)).sum()),
            })
        return rows

    # -- persistence -------------------------------------------------------------------------
    def state_dict(self) -> dict:
        """Everything needed to rebuild the posterior (tensors and plain metadata)."""
        return {
            "kind": self.kind, "entries": self.entries, "n_blocks": self.n_blocks, "loss": self.loss,
            "n_data": self.n_data, "blocks": list(self.blocks), "per_block": self.per_block,
            "prior_precision": self.prior_precision,
        }

    def load_state_dict(self, state: dict) -> None:
        """Replace this posterior's content by ``state`` (from :meth:`state_dict` of the same kind)."""
        if state.get("kind") != self.kind:
            raise ValueError(f"state is of kind {state.get('kind')!r}, this posterior is {self.kind!r}")
        for k in ("entries", "n_blocks", "loss", "n_data", "blocks", "per_block", "prior_precision"):
            setattr(self, k, state[k])

    def save(self, path: str | Path) -> None:
        """``torch.save`` of :meth:`state_dict`."""
        torch.save(self.state_dict(), path)

    @staticmethod
    def load(path: str | Path, map_location: torch.device | str | None = None) -> "LaplacePosterior":
        """Rebuild a saved :class:`KronPosterior`, :class:`DiagPosterior` or :class:`DenseBlockPosterior`."""
        state = torch.load(path, map_location=map_location, weights_only=True)
        cls = {"kron": KronPosterior, "diag": DiagPosterior, "dense_block": DenseBlockPosterior}.get(state.get("kind"))
        if cls is None:
            raise ValueError(f"{path}: not a saved Laplace posterior")
        post = object.__new__(cls)
        post.load_state_dict(state)
        return post

    def to(self, device: torch.device | str) -> "LaplacePosterior":
        """A copy on ``device``."""
        new = object.__new__(type(self))
        new.__dict__.update(self.__dict__)
        new.entries = [{k: v.to(device) if torch.is_tensor(v) else v for k, v in e.items()} for e in self.entries]
        new.prior_precision = self.prior_precision.to(device)
        return new

    # -- structure-specific --------------------------------------------------------------------
    def _eigs(self, e: dict) -> torch.Tensor:
        raise NotImplementedError

    def _sample(self, e: dict, delta: torch.Tensor, k: int, gen: torch.Generator) -> torch.Tensor:
        raise NotImplementedError

    def _variance(self, e: dict, delta: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def _dense_entry(self, e: dict, delta: torch.Tensor, covariance: bool) -> torch.Tensor:
        raise NotImplementedError


class KronPosterior(LaplacePosterior):
    """K-FAC Laplace posterior from a :class:`KronCurvature` (see the module docstring).

    ``rank``: keep at most this many eigenpairs per Kronecker factor (``None``: all).
    """

    kind = "kron"

    def __init__(self, curvature: KronCurvature, prior_precision: float | torch.Tensor = 1.0,
                 rank: int | None = None, blocks: Iterable[int] | None = None):
        if not isinstance(curvature, KronCurvature):
            raise ValueError("KronPosterior needs a KronCurvature (lib.laplace.curvature.fit_kron)")
        if rank is not None and rank < 1:
            raise ValueError(f"rank is {rank}; use a positive integer or None")
        entries = []
        for name in curvature.names:
            for which, f, mean in zip("AB", curvature.factors[name], curvature.mean[name]):
                lg, ug = _eigh(f.G, rank)
                lx, ux = _eigh(f.X, rank)
                entries.append({"name": name, "which": which, "block": curvature.blocks[name],
                                "mean": mean, "lG": lg, "UG": ug, "lX": lx, "UX": ux})
        super().__init__(entries, curvature.n_blocks, curvature.loss, curvature.n_data, prior_precision, blocks)

    def _eigs(self, e):
        return torch.outer(e["lG"], e["lX"])

    @staticmethod
    def _full(e) -> bool:
        return e["UG"].shape[0] == e["UG"].shape[1] and e["UX"].shape[0] == e["UX"].shape[1]

    def _sample(self, e, delta, k, gen):
        ug, ux = e["UG"], e["UX"]
        scale = torch.rsqrt(torch.outer(e["lG"], e["lX"]) + delta)
        if self._full(e):
            z = torch.randn(k, ug.shape[1], ux.shape[1], generator=gen, device=self.device)
            return ug @ (z * scale) @ ux.T
        eps = torch.randn(k, *e["mean"].shape, generator=gen, device=self.device)
        inner = (ug.T @ eps @ ux) * (scale - torch.rsqrt(delta))
        return eps * torch.rsqrt(delta) + ug @ inner @ ux.T

    def _variance(self, e, delta):
        d = 1.0 / (torch.outer(e["lG"], e["lX"]) + delta) - 1.0 / delta
        return 1.0 / delta + e["UG"].square() @ d @ e["UX"].square().T

    def _dense_entry(self, e, delta, covariance):
        u = torch.kron(e["UG"].double(), e["UX"].double())
        lam = torch.outer(e["lG"], e["lX"]).reshape(-1).double()
        eye = torch.eye(u.shape[0], dtype=torch.float64, device=u.device)
        if covariance:
            return (eye - u @ u.T) / delta + (u / (lam + delta)) @ u.T
        return (u * lam) @ u.T + delta * eye


class DiagPosterior(LaplacePosterior):
    """Diagonal Laplace posterior from a :class:`DiagCurvature`: ``Σ = diag(1/(d + δ_ℓ))``."""

    kind = "diag"

    def __init__(self, curvature: DiagCurvature, prior_precision: float | torch.Tensor = 1.0,
                 blocks: Iterable[int] | None = None):
        if not isinstance(curvature, DiagCurvature):
            raise ValueError("DiagPosterior needs a DiagCurvature (lib.laplace.curvature.fit_diag)")
        entries = [
            {"name": name, "which": which, "block": curvature.blocks[name], "mean": mean, "d": d.clamp_min(0)}
            for name in curvature.names
            for which, d, mean in zip("AB", curvature.diag[name], curvature.mean[name])
        ]
        super().__init__(entries, curvature.n_blocks, curvature.loss, curvature.n_data, prior_precision, blocks)

    def _eigs(self, e):
        return e["d"]

    def _sample(self, e, delta, k, gen):
        z = torch.randn(k, *e["d"].shape, generator=gen, device=self.device)
        return z * torch.rsqrt(e["d"] + delta)

    def _variance(self, e, delta):
        return 1.0 / (e["d"] + delta)

    def _dense_entry(self, e, delta, covariance):
        d = e["d"].reshape(-1).double() + delta
        return torch.diag(1.0 / d if covariance else d)


class DenseBlockPosterior(LaplacePosterior):
    """Laplace posterior with the exact GGN of each transformer block kept dense (:mod:`lib.laplace.exact`).

    Precision of block ``ℓ``: ``G_ℓ + δ_ℓ I`` (P_ℓ × P_ℓ) with ``G_ℓ = U_ℓ diag(λ_ℓ) U_ℓᵀ``
    (eigendecomposition in float64, stored float32), so ``Σ_ℓ = U_ℓ diag(1/(λ_ℓ + δ_ℓ)) U_ℓᵀ``, a
    sample is ``δθ_ℓ = U_ℓ (z ⊙ (λ_ℓ + δ_ℓ)^{-1/2})`` with ``z ~ N(0, I_{P_ℓ})``, the marginal
    variances are ``(U_ℓ ⊙ U_ℓ)(1/(λ_ℓ + δ_ℓ))`` and the evidence of :mod:`lib.laplace.marglik`
    takes the eigenvalues ``λ_ℓ`` (the full-covariance Laplace of mackay1992practical and
    daxberger2021laplace, restricted to one block's LoRA weights). Within a block every LoRA
    weight is coupled with every other; *across* blocks the precision is block-diagonal (the
    GGN's cross-block terms are dropped), so a subset ``S`` (``restrict``) is the product of its
    blocks' Gaussians, as the per-block perturbation bank requires. Memory: ``P_ℓ²`` float32 per block.
    """

    kind = "dense_block"

    def __init__(self, curvature: DenseCurvature, prior_precision: float | torch.Tensor = 1.0,
                 blocks: Iterable[int] | None = None):
        if not isinstance(curvature, DenseCurvature):
            raise ValueError("DenseBlockPosterior needs a DenseCurvature (lib.laplace.exact.fit_block_ggn)")
        missing = sorted(set(curvature.blocks.values()) - set(curvature.ggn))
        if missing:
            raise ValueError(f"the DenseCurvature has no GGN for blocks {missing}; fit every block (blocks=None)")
        entries = [{"name": name, "which": which, "block": curvature.blocks[name], "mean": mean}
                   for name in curvature.names for which, mean in zip("AB", curvature.mean[name])]
        self.eig = {}
        for b, g in curvature.ggn.items():
            lam, u = _eigh(g, None)
            self.eig[b] = {"lam": lam, "U": u}
        super().__init__(entries, curvature.n_blocks, curvature.loss, curvature.n_data, prior_precision, blocks)

    def _block_eigs(self, block):
        return self.eig[block]["lam"]

    def sample_block(self, block, n_samples, generator):
        """``n_samples`` zero-mean draws from ``N(0, Σ_block)`` (see :meth:`LaplacePosterior.sample_block`)."""
        self._check_blocks([block])
        if block not in self.blocks:
            return self._split(block, torch.zeros(n_samples, self._size(block), device=self.device))
        e = self.eig[block]
        z = torch.randn(n_samples, e["lam"].numel(), generator=generator, device=self.device)
        return self._split(block, (z * torch.rsqrt(e["lam"] + self.prior_precision[block])) @ e["U"].T)

    def variance_block(self, block):
        """Marginal posterior variances (see :meth:`LaplacePosterior.variance_block`)."""
        self._check_blocks([block])
        if block not in self.blocks:
            return self._split(block, torch.zeros(1, self._size(block), device=self.device), squeeze=True)
        e = self.eig[block]
        var = e["U"].square() @ (1.0 / (e["lam"] + self.prior_precision[block]))
        return self._split(block, var[None], squeeze=True)

    def _dense(self, blocks, covariance):
        blocks = self.blocks if blocks is None else sorted(set(blocks))
        self._check_blocks(blocks)
        mats = []
        for b in blocks:
            u, lam = self.eig[b]["U"].double(), self.eig[b]["lam"].double()
            d = self.prior_precision[b].double()
            mats.append((u / (lam + d)) @ u.T if covariance else (u * (lam + d)) @ u.T)
        if not mats:
            return torch.zeros(0, 0, dtype=torch.float64, device=self.device)
        return torch.block_diag(*mats)

    def _size(self, block: int) -> int:
        return sum(e["mean"].numel() for e in self.block_entries(block))

    def _split(self, block: int, flat: torch.Tensor, squeeze: bool = False) -> Sample:
        """(K, P_ℓ) in parameter order → name → (A (K, r, in), B (K, out, r)) (``squeeze``: drop K)."""
        out: dict[str, list[torch.Tensor]] = {}
        o = 0
        for e in self.block_entries(block):
            n = e["mean"].numel()
            t = flat[:, o : o + n].reshape(len(flat), *e["mean"].shape)
            out.setdefault(e["name"], []).append(t[0] if squeeze else t)
            o += n
        return {k: tuple(v) for k, v in out.items()}

    def state_dict(self) -> dict:
        """:meth:`LaplacePosterior.state_dict` plus the per-block eigendecompositions (``eig``)."""
        return {**super().state_dict(), "eig": self.eig}

    def load_state_dict(self, state: dict) -> None:
        """See :meth:`LaplacePosterior.load_state_dict`."""
        super().load_state_dict(state)
        self.eig = state["eig"]

    def to(self, device):
        """A copy on ``device``."""
        new = super().to(device)
        new.eig = {b: {k: v.to(device) for k, v in e.items()} for b, e in self.eig.items()}
        return new


def build_posterior(
    curvature: KronCurvature | DiagCurvature | DenseCurvature,
    *,
    prior_precision: float | torch.Tensor = 1.0,
    prior_tuning: Literal["marglik", "none"] = "marglik",
    prior_per_block: bool = True,
    rank: int | None = None,
) -> LaplacePosterior:
    """Posterior over all blocks (``LaplaceConfig``: ``prior_init``, ``prior_tuning``, ``prior_per_block``).

    ``prior_tuning='marglik'`` replaces ``prior_precision`` by the evidence maximiser (per block or
    shared); ``'none'`` keeps it. ``prior_per_block`` is also what ``restrict(…, 'retune')`` uses.
    ``rank`` truncates the K-FAC factors (:class:`KronPosterior`); a diagonal or dense-block
    posterior (:class:`DiagPosterior`, :class:`DenseBlockPosterior`) rejects it.
    """
    if isinstance(curvature, KronCurvature):
        post = KronPosterior(curvature, prior_precision, rank=rank)
    elif rank is not None:
        raise ValueError("rank truncation applies to K-FAC only; set rank=None for a diagonal or dense-block posterior")
    elif isinstance(curvature, DiagCurvature):
        post = DiagPosterior(curvature, prior_precision)
    else:
        post = DenseBlockPosterior(curvature, prior_precision)
    if prior_tuning not in ("marglik", "none"):
        raise ValueError(f"prior_tuning is {prior_tuning!r}; use 'marglik' or 'none'")
    if prior_tuning == "marglik":
        post.tune_prior(per_block=prior_per_block)
    post.per_block = prior_per_block
    return post


def _eigh(m: torch.Tensor, rank: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Eigenpairs of a symmetric PSD factor in float64 (returned float32), descending, clamped ≥ 0, top ``rank``."""
    lam, u = torch.linalg.eigh(m.double())
    lam, u = lam.flip(0).clamp_min(0), u.flip(1)
    if rank is not None and rank < lam.numel():
        lam, u = lam[:rank], u[:, :rank]
    return lam.float().contiguous(), u.float().contiguous()
