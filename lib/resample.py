"""Bootstrap multiplicities: how often each item is drawn in a resample with replacement.

A leaf module, shared by the statistics (:mod:`lib.stats`, :mod:`lib.ood`, :mod:`lib.shift`) and
by the ``subsets`` stage (:mod:`lib.stages.subsets`), whose bootstrap rows are drawn with it; the
stage's code closure thereby stays clear of :mod:`lib.stats`.
"""

from __future__ import annotations

import torch
from torch import Tensor


def bootstrap_counts(n: int, rows: int, generator: torch.Generator, dtype: torch.dtype, device) -> Tensor:
    """(rows, n) counts of n draws with replacement from n items (bootstrap multiplicities
    :cite:`davison1997bootstrap`); every row sums to n.

    Row r is ``w_r[i] = #{j : u_rj = i}`` for n uniform draws ``u_rj`` in 0..n−1 from
    ``generator`` (one ``torch.randint`` of shape (rows, n), so a row is the same whatever ``dtype``).
    """
    idx = torch.randint(0, n, (rows, n), generator=generator, device=device)
    w = torch.zeros(rows, n, dtype=dtype, device=device)
    return w.scatter_add_(1, idx, torch.ones(rows, n, dtype=dtype, device=device))
