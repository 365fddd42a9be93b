"""Shapley values of the blocks: exact over all 2^L coalitions, or from sampled permutations.

A coalition value table ``v`` (..., 2^L) is indexed by bitmask (bit ℓ set iff block ℓ is in S);
the study uses ``v(S) = ECE_det − ECE(S)``. Leading dimensions (bootstrap replicates) are
vectorised over.

Exact values need all 2^L coalitions. With 12 blocks and a covariance scale κ_S tuned on
validation data for every coalition, that is the cost that does not fit a CPU freeze, so a profile
can instead average the marginal contributions over sampled orderings of the blocks
:cite:`castro2009polynomial`: for an ordering π, block π_t contributes ``v(P_{t+1}) − v(P_t)`` with
``P_t`` the set of the first t blocks, and the mean over uniformly random orderings is an unbiased
estimate of the Shapley value. Orderings come in antithetic pairs (an ordering and its reverse,
:cite:`mitchell2022sampling`), which lowers the variance for set functions that grow smoothly with
|S|; the Monte Carlo standard error is estimated from the spread of the pair means, which are
independent. Every ordering's contributions sum to ``v(all) − v(∅)``, so the estimate keeps the
efficiency property exactly.
"""

from __future__ import annotations

import math

import torch
from scipy.stats import t as student_t
from torch import Tensor

PERMUTATION_SEED = 2
"""Seed of the sampled block orderings: the same for every training seed and every replicate, so
that the seeds' contributions are averaged ordering by ordering."""


def _players(v: Tensor) -> int:
    size = v.shape[-1]
    n = size.bit_length() - 1
    if size < 2 or 1 << n != size:
        raise ValueError(f"v must have last dimension 2^L (indexed by bitmask); got {size}")
    if n > 20:
        raise ValueError(f"v has L={n} players; coalition tables are supported for L <= 20")
    return n


def shapley_values(v: Tensor) -> Tensor:
    """Exact Shapley values (..., L) of L players from coalition values v (..., 2^L) :cite:`shapley1953value`.

    ``φ_ℓ = Σ_{S ∌ ℓ} |S|! (L − |S| − 1)! / L! · (v(S ∪ {ℓ}) − v(S))``, written as one matmul
    ``v @ A`` with ``A[S, ℓ] = w(|S| − 1)`` if ℓ ∈ S else ``−w(|S|)``, ``w(s) = s! (L − s − 1)! / L!``.
    The values sum to ``v(all) − v(∅)``.
    """
    n = _players(v)
    masks = torch.arange(1 << n, device=v.device)
    member = ((masks[:, None] >> torch.arange(n, device=v.device)) & 1).bool()  # (2^L, L)
    size = member.sum(1)
    lw = torch.tensor([math.lgamma(s + 1) + math.lgamma(n - s) - math.lgamma(n + 1) for s in range(n)],
                      dtype=torch.float64, device=v.device).exp()
    a = torch.where(member, lw[(size - 1).clamp(min=0)][:, None], -lw[size.clamp(max=n - 1)][:, None]).to(v.dtype)
    return v @ a


def antithetic_permutations(n_players: int, n: int, seed: int = PERMUTATION_SEED) -> Tensor:
    """``n`` orderings (n, L) of ``n_players`` blocks: n/2 uniformly random permutations, each
    followed by its reverse (rows 2i and 2i + 1). ``n`` must be even and ≥ 4 (two pairs, so that
    the Monte Carlo error can be estimated)."""
    if n < 4 or n % 2:
        raise ValueError(f"the number of sampled orderings must be even and >= 4 (stats.shapley_permutations); got {n}")
    if n_players < 1:
        raise ValueError(f"need at least one player; got {n_players}")
    g = torch.Generator().manual_seed(seed)
    first = torch.stack([torch.randperm(n_players, generator=g) for _ in range(n // 2)])
    return torch.stack([first, first.flip(1)], 1).reshape(n, n_players)


def prefix_masks(perms: Tensor) -> Tensor:
    """Bitmasks (n, L + 1) of the prefixes of every ordering (n, L): column t is the set of its
    first t blocks (column 0 the empty set, column L all blocks)."""
    bits = torch.ones_like(perms) << perms
    return torch.cat([torch.zeros_like(perms[:, :1]), bits.cumsum(1)], 1)


def coalitions(perms: Tensor) -> Tensor:
    """The distinct bitmasks (sorted) whose values :func:`permutation_contributions` reads."""
    return prefix_masks(perms).unique()


def permutation_contributions(v: Tensor, perms: Tensor) -> Tensor:
    """Marginal contributions (..., n, L) of every block in every ordering (n, L): entry
    ``[..., m, ℓ] = v(P ∪ {ℓ}) − v(P)`` with P the blocks before ℓ in ordering m. ``v`` (..., 2^L)
    needs values only at :func:`coalitions` (others may be NaN); a NaN read is an error."""
    n_players = _players(v)
    if perms.ndim != 2 or perms.shape[1] != n_players:
        raise ValueError(f"perms must be (n, {n_players}) orderings of the blocks of v; got {tuple(perms.shape)}")
    prefixes = prefix_masks(perms).to(v.device)  # (n, L + 1)
    pv = v[..., prefixes]  # (..., n, L + 1)
    if torch.isnan(pv).any():
        raise ValueError("v is NaN at a coalition that the orderings visit; evaluate every coalition of "
                         "lib.shapley.coalitions(perms)")
    steps = pv[..., 1:] - pv[..., :-1]  # (..., n, L): contribution of the block at position t
    out = torch.empty_like(steps)
    return out.scatter_(-1, perms.to(v.device).expand_as(steps), steps)


def antithetic_standard_error(contributions: Tensor) -> Tensor:
    """Monte Carlo standard error (L,) of the mean of contributions (n, L) over antithetic
    orderings (rows 2i, 2i + 1 a pair): ``sd(pair means) / sqrt(n/2)``."""
    if contributions.ndim != 2 or contributions.shape[0] < 4 or contributions.shape[0] % 2:
        raise ValueError(f"contributions must be (n, L) with n even and >= 4; got {tuple(contributions.shape)}")
    pairs = contributions.reshape(-1, 2, contributions.shape[1]).mean(1)
    return pairs.std(0) / math.sqrt(pairs.shape[0])


def widen(estimate: Tensor, lower: Tensor, upper: Tensor, se: Tensor, alpha: float, df: int) -> tuple[Tensor, Tensor]:
    """An interval for the exact value from an interval for the sampled one and the independent
    Monte Carlo error ``se`` (estimated with ``df`` degrees of freedom, n/2 − 1 for n antithetic
    orderings): each half-width h becomes ``sqrt(h² + (t_{1−α/2, df} se)²)``."""
    if df < 1:
        raise ValueError(f"df must be >= 1; got {df}")
    q = float(student_t.ppf(1 - alpha / 2, df))
    return (estimate - torch.hypot(estimate - lower, q * se), estimate + torch.hypot(upper - estimate, q * se))
