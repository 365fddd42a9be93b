"""Laplace log marginal likelihood of an isotropic Gaussian prior and its exact maximisation.

For parameters ``θ ∈ R^P`` at the MAP ``θ*``, a curvature with eigenvalues ``λ_1..λ_P ≥ 0`` and the
prior ``N(0, δ⁻¹ I)``, the Laplace evidence (mackay1992practical, immer2021scalable) is

    log p(D) ≈ log p(D | θ*) − ½ δ ‖θ*‖² + (P/2) log δ − ½ Σ_i log(λ_i + δ)
             = log p(D | θ*) − ½ δ ‖θ*‖² − ½ Σ_i log(1 + λ_i / δ)

(the ``2π`` terms cancel). With K-FAC the eigenvalues of ``G ⊗ X`` are the products ``λ_G λ_X``,
so the log-determinant is exact in that basis (daxberger2021laplace). Zero eigenvalues (truncated
directions) contribute nothing.

The δ-dependent part ``f(δ) = −½ δ ‖θ*‖² − ½ Σ_i log(1 + λ_i/δ)`` is strictly concave in ``δ``
(``f'' = −½ Σ_i λ_i(λ_i + 2δ) / (δ²(λ_i + δ)²) < 0``) and its stationarity condition is MacKay's
``δ ‖θ*‖² = γ(δ) = Σ_i λ_i / (λ_i + δ)``, i.e. ``ψ(t) = Σ_i λ_i / (e^t (λ_i + e^t)) − ‖θ*‖² = 0``
in ``t = log δ`` with ``ψ`` strictly decreasing from ``+∞`` to ``−‖θ*‖²``. :func:`optimal_prior`
solves it by bisection on ``t`` (exact to float64 resolution), vectorised over independent groups:
with one δ per transformer block the evidence is a sum of such terms, one per block, so the
blocks are maximised separately and exactly.
"""

from __future__ import annotations

import torch

_LOG_LO, _LOG_HI, _ITERS = -60.0, 60.0, 200


def log_evidence_terms(eigs: list[torch.Tensor], sqnorms: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
    """``f_g(δ_g) = −½ δ_g s_g − ½ Σ_i log(1 + λ_gi/δ_g)`` for every group ``g`` (G,), float64.

    ``eigs[g]``: the nonnegative curvature eigenvalues of group ``g`` (any shape); ``sqnorms`` (G,):
    ``s_g = ‖θ*_g‖²``; ``delta`` (G,): prior precisions.
    """
    delta = delta.to(torch.float64)
    out = []
    for g, lam in enumerate(eigs):
        lam = lam.reshape(-1).to(torch.float64).clamp_min(0)
        out.append(-0.5 * delta[g] * sqnorms[g].double() - 0.5 * torch.log1p(lam / delta[g]).sum())
    return torch.stack(out)


def optimal_prior(eigs: list[torch.Tensor], sqnorms: torch.Tensor) -> torch.Tensor:
    """Maximiser ``δ_g`` of :func:`log_evidence_terms` for every group (G,), float64.

    Raises ``ValueError`` when a group has ``‖θ*‖² = 0`` or no positive eigenvalue (no finite
    optimum), or when the optimum lies outside ``[e^-60, e^60]``.
    """
    out = []
    for g, lam in enumerate(eigs):
        lam = lam.reshape(-1).to(torch.float64).clamp_min(0)
        lam = lam[lam > 0]
        s = float(sqnorms[g])
        if s <= 0 or lam.numel() == 0:
            raise ValueError(
                f"prior group {g} has ‖θ‖²={s:.3g} and {lam.numel()} positive curvature eigenvalues; "
                "the marginal likelihood has no finite optimum (use prior_tuning: none)"
            )
        lo = torch.tensor(_LOG_LO, dtype=torch.float64, device=lam.device)
        hi = torch.tensor(_LOG_HI, dtype=torch.float64, device=lam.device)
        if _psi(lam, s, lo) <= 0 or _psi(lam, s, hi) >= 0:
            raise ValueError(f"prior group {g}: optimal prior precision outside [e^{_LOG_LO}, e^{_LOG_HI}]")
        for _ in range(_ITERS):
            mid = 0.5 * (lo + hi)
            up = _psi(lam, s, mid) > 0
            lo, hi = torch.where(up, mid, lo), torch.where(up, hi, mid)
        out.append(torch.exp(0.5 * (lo + hi)))
    return torch.stack(out)


def _psi(lam: torch.Tensor, s: float, t: torch.Tensor) -> torch.Tensor:
    d = torch.exp(t)
    return (lam / (d * (lam + d))).sum() - s
