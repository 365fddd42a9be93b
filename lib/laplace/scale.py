"""Covariance scale of a Laplace posterior tuned on validation NLL, for every block subset at once.

A Laplace posterior whose prior precision is tuned by the evidence can still be far too wide for
prediction: where the MAP fits the training data almost perfectly, ``Λ_n = diag(p_n) − p_n p_nᵀ``
vanishes, the GGN carries little curvature, and the evidence-optimal prior precision is small
(``δ = γ/‖θ‖²`` with few effective parameters ``γ``), so many directions keep their prior variance.
A common remedy scales the posterior covariance, ``Σ_S → κ_S Σ_S``, with ``κ_S`` chosen on held-out
data (ritter2018scalable tune such multipliers on validation data; daxberger2021laplace tune the
prior precision by validation NLL; ``κ < 1`` is a tempered posterior, wenzel2020good).

With the perturbation bank of the *validation* split (:func:`lib.laplace.predictive.perturbation_bank`),
scaling ``Σ_S`` by ``κ`` scales every perturbation by ``√κ``, so the validation NLL of every subset
``S`` and every ``κ`` on a log grid costs one matrix product per chunk and no new Jacobian:

    κ_S = argmin_{κ ∈ grid} −(1/N_val) Σ_n log p_S,κ(y_n | x_n).
"""

from __future__ import annotations

from typing import Iterator, Literal

import torch
from torch import Tensor

from lib.laplace.predictive import Bank, iter_subset_probs


def scale_grid(low: float, high: float, points: int) -> Tensor:
    """``points`` covariance scales log-spaced from ``low`` to ``high`` inclusive (float64, ascending)."""
    if not (0 < low < high) or points < 2:
        raise ValueError(
            f"scale grid ({low}, {high}, {points}) needs 0 < low < high and points >= 2 "
            "(PredictiveConfig.scale_range, PredictiveConfig.scale_points)"
        )
    return torch.logspace(torch.log10(torch.tensor(low)).item(), torch.log10(torch.tensor(high)).item(), points,
                          dtype=torch.float64)


EPS = 1e-12
"""Floor of the predicted probability of the true class in the validation NLL."""


def iter_grid_probs(
    bank: Bank, subsets: Tensor, grid: Tensor, *, method: Literal["mc", "probit"] = "mc"
) -> Iterator[tuple[slice, Tensor]]:
    """:func:`lib.laplace.predictive.iter_subset_probs` of every subset (bool (S, L)) at every scale
    of ``grid`` (G,): ``(rows, probs)`` over the S·G pairs in subset-major order (row ``s·G + g``
    is subset ``s`` at ``κ = grid[g]``)."""
    subsets = torch.as_tensor(subsets)
    rows = subsets.repeat_interleave(len(grid), dim=0)
    return iter_subset_probs(bank, rows, method=method, scales=grid.to(torch.float32).repeat(subsets.shape[0]))


def example_nll(
    bank: Bank, subsets: Tensor, grid: Tensor, *, method: Literal["mc", "probit"] = "mc"
) -> Tensor:
    """Per-example validation NLL (S, G, N) of every subset (bool (S, L)) at every scale of ``grid`` (G,).

    ``nll[s, g, n] = −log max(p_n[y_n], EPS)`` with ``p`` the linearised predictive of
    ``subsets[s]`` at ``κ = grid[g]`` (:func:`iter_grid_probs`); float32 on CPU.
    """
    labels = bank.labels.to(bank.delta.device)
    out = torch.empty(len(subsets) * len(grid), len(labels), dtype=torch.float32)
    for sl, p in iter_grid_probs(bank, subsets, grid, method=method):
        picked = p.gather(-1, labels.expand(p.shape[0], -1)[..., None]).squeeze(-1)
        out[sl] = -picked.clamp_min(EPS).log().float().cpu()
    return out.reshape(len(subsets), len(grid), -1)


def validation_nll(
    bank: Bank, subsets: Tensor, grid: Tensor, *, method: Literal["mc", "probit"] = "mc"
) -> Tensor:
    """Mean validation NLL (S, G) of every subset (bool (S, L)) at every covariance scale of ``grid`` (G,).

    ``nll[s, g] = −(1/N) Σ_n log max(p_n[y_n], EPS)``: the mean over examples of :func:`example_nll`
    (float64).
    """
    return example_nll(bank, subsets, grid, method=method).double().mean(-1)


def tune_scales(
    bank: Bank, subsets: Tensor, grid: Tensor, *, method: Literal["mc", "probit"] = "mc"
) -> tuple[Tensor, Tensor]:
    """Per subset the grid scale with the lowest validation NLL: ``(κ (S,), nll (S, G))``.

    Ties go to the smallest ``κ`` (the grid is ascending). The empty subset has no perturbation;
    its NLL is flat in ``κ`` and it gets ``grid[0]``.
    """
    nll = validation_nll(bank, subsets, grid, method=method)
    return grid[nll.argmin(dim=1)], nll
