"""lib.resample.bootstrap_counts against the multiplicities counted by hand from the same draws."""

import torch

from lib.resample import bootstrap_counts


def test_counts_are_the_multiplicities_of_the_generators_draws():
    idx = torch.randint(0, 7, (5, 7), generator=torch.Generator().manual_seed(3))
    ref = torch.stack([torch.bincount(row, minlength=7) for row in idx])
    w = bootstrap_counts(7, 5, torch.Generator().manual_seed(3), torch.float64, "cpu")
    assert w.dtype == torch.float64 and w.shape == (5, 7)
    assert torch.equal(w, ref.double()) and (w.sum(1) == 7).all()
    as_int = bootstrap_counts(7, 5, torch.Generator().manual_seed(3), torch.int64, "cpu")
    assert torch.equal(as_int, ref)  # the same rows whatever the dtype
