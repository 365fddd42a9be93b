"""Isotropic Gaussian noise on one block's LoRA weights: the control for the posterior's shape.

The Laplace posterior of block ``ℓ`` perturbs its LoRA weights along the directions and with the
relative sizes that its curvature prescribes, ``δθ_ℓ ~ N(0, κ Σ_ℓ)``. The control perturbs them
by noise of the same kind but without shape, ``δθ_ℓ ~ N(0, σ² I)``, with one size ``σ²`` per
block tuned exactly as ``κ_S`` is (lowest validation NLL over a log grid,
:mod:`lib.laplace.scale`). It is the Laplace posterior with the curvature taken out: with a zero
GGN, ``Σ_ℓ = (GGN_ℓ + δ_ℓ I)⁻¹`` is the prior covariance ``I/δ_ℓ`` (mackay1992practical;
daxberger2021laplace), here at a validation-tuned size. If the control calibrates as well as the
Laplace block, the gain comes from the amount of noise, not from the curvature's directions.

:class:`IsotropicPosterior` satisfies :class:`lib.laplace.predictive.BlockPosterior` with unit
variance, ``sample_block`` returning ``N(0, I)`` draws in the shapes of the Laplace samples; the
perturbation bank is linear in the samples, so the size ``σ²`` enters the predictive as the
covariance scale of :func:`lib.laplace.predictive.subset_probs` (``scale = σ²``) and one bank
serves every ``σ²`` of the grid.
"""

from __future__ import annotations

import torch
from torch import Tensor

from lib.laplace.posterior import LaplacePosterior


class IsotropicPosterior:
    """``N(0, I)`` over the LoRA weights of every block of a Laplace posterior, in its shapes.

    ``shapes``: one ``(name, block, A shape (r, in), B shape (out, r))`` per LoRA module, in the
    order of the posterior's entries; ``blocks``: the blocks that carry noise.
    """

    def __init__(self, shapes: list[tuple[str, int, tuple[int, ...], tuple[int, ...]]], blocks: list[int],
                 device: torch.device | str = "cpu"):
        self.shapes = shapes
        self.blocks = sorted(set(blocks))
        self.device = torch.device(device)
        known = {b for _, b, _, _ in shapes}
        if not set(self.blocks) <= known:
            raise ValueError(f"blocks {self.blocks} must be among the blocks of the LoRA modules {sorted(known)}")

    @classmethod
    def like(cls, posterior: LaplacePosterior) -> "IsotropicPosterior":
        """The control of ``posterior``: same modules, shapes, blocks, device and sampling order."""
        shapes: dict[str, list] = {}
        for e in posterior.entries:
            shapes.setdefault(e["name"], [e["name"], e["block"]]).append(tuple(e["mean"].shape))
        return cls([tuple(v) for v in shapes.values()], list(posterior.blocks), posterior.device)

    def sample_block(self, block: int, n_samples: int, generator: torch.Generator) -> dict[str, tuple[Tensor, Tensor]]:
        """``n_samples`` draws from ``N(0, I)``: name → (dA (K, r, in), dB (K, out, r)).

        Drawn module by module, ``A`` then ``B``, one ``torch.randn`` each, the order in which a
        :class:`lib.laplace.posterior.DiagPosterior` draws its standard normals, so that with the same
        generator ``σ ·`` these samples equal that posterior's samples when all its variances are ``σ²``.
        ``generator`` must live on :attr:`device`.
        """
        if block not in self.blocks:
            raise ValueError(f"block {block} is not among this control's blocks {self.blocks}")
        if n_samples < 1:
            raise ValueError(f"n_samples must be >= 1, got {n_samples}")
        return {name: tuple(torch.randn(n_samples, *s, generator=generator, device=self.device) for s in (sa, sb))
                for name, b, sa, sb in self.shapes if b == block}
