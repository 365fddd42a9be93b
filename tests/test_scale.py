"""lib.laplace.scale: covariance scale κ_S tuned on validation NLL from a perturbation bank.

References: the bank of the posterior with covariance κΣ (same samples), a brute-force NLL loop,
and a simulation in which the true predictive is the bank's at a known κ.
"""

from __future__ import annotations

import math

import pytest
import torch

from lib.laplace.predictive import Bank, iter_subset_probs, perturbation_bank, subset_probs
from lib.laplace.scale import example_nll, scale_grid, tune_scales, validation_nll
from test_predictive import DenseBlockPosterior, block_sizes


def _random_bank(L=3, N=40, K=6, C=4, seed=0) -> Bank:
    g = torch.Generator().manual_seed(seed)
    return Bank(map_logits=2 * torch.randn(N, C, generator=g), labels=torch.randint(0, C, (N,), generator=g),
                delta=torch.randn(L, N, K, C, generator=g), blocks=tuple(range(L)))


@pytest.mark.parametrize("kappa", [0.01, 0.3, 4.0])
def test_scale_equals_bank_of_scaled_posterior(tiny_lora_vit, tiny_batch, kappa):
    """Predicting at scale κ from the bank of Σ = predicting from the bank of κΣ (same samples)."""
    x, y = tiny_batch
    covs = {b: torch.eye(n) / 3.0 for b, n in block_sizes(tiny_lora_vit).items()}
    bank = perturbation_bank(tiny_lora_vit, DenseBlockPosterior(tiny_lora_vit, covs), [(x, y)], n_samples=5, seed=1,
                             device="cpu")
    scaled = perturbation_bank(tiny_lora_vit, DenseBlockPosterior(tiny_lora_vit, {b: kappa * c for b, c in covs.items()}),
                               [(x, y)], n_samples=5, seed=1, device="cpu")
    masks = torch.tensor([[(s >> i) & 1 == 1 for i in range(3)] for s in range(8)])
    for method in ("mc", "probit"):
        for s in range(1, 8):
            ours = subset_probs(bank, s, method=method, scale=kappa)
            assert torch.allclose(ours, subset_probs(scaled, s, method=method), atol=1e-5)
            assert (ours - subset_probs(bank, s, method=method)).abs().max() > 1e-4
        scales = torch.full((8,), kappa)
        for rows, p in iter_subset_probs(bank, masks, method=method, scales=scales, chunk=3):
            for i, s in enumerate(range(8)[rows]):
                assert torch.allclose(p[i], subset_probs(scaled, s, method=method), atol=1e-5)


def test_validation_nll_equals_brute_force():
    bank = _random_bank()
    grid = scale_grid(1e-2, 10.0, 7)
    masks = torch.tensor([[(s >> i) & 1 == 1 for i in range(3)] for s in range(8)])
    for method in ("mc", "probit"):
        nll = validation_nll(bank, masks, grid, method=method)
        per_example = example_nll(bank, masks, grid, method=method)
        assert per_example.shape == (8, len(grid), len(bank.labels))
        for s in range(8):
            for g, k in enumerate(grid):
                p = subset_probs(bank, s, method=method, scale=float(k))
                ref = -p[torch.arange(len(bank.labels)), bank.labels].log()
                assert torch.allclose(per_example[s, g], ref, atol=1e-5)
                assert abs(float(nll[s, g]) - float(ref.mean())) < 1e-5
        kappa, again = tune_scales(bank, masks, grid, method=method)
        assert torch.equal(again, nll) and torch.equal(kappa, grid[nll.argmin(1)])
        assert kappa[0] == grid[0]  # the empty subset: flat NLL, smallest scale


def test_tuned_scale_recovers_the_true_scale_in_simulation():
    """Labels drawn from the MC predictive at κ = 0.01 of a bank: the tuned κ is within one grid step.

    Each example's label is drawn from softmax(f + √κ δ_k) with one of the bank's own samples k,
    so the bank's predictive at the true κ is the data-generating distribution and the NLL (a
    proper score) is minimised there in expectation.
    """
    g = torch.Generator().manual_seed(0)
    N, K, C, true = 6000, 32, 3, 0.01
    f = 3 * torch.randn(N, C, generator=g)
    delta = 30 * torch.randn(1, N, K, C, generator=g)
    k = torch.randint(0, K, (N,), generator=g)
    p_true = torch.softmax(f + math.sqrt(true) * delta[0, torch.arange(N), k], -1)
    y = torch.multinomial(p_true, 1, generator=g)[:, 0]
    grid = scale_grid(1e-4, 10.0, 26)
    kappa, nll = tune_scales(Bank(f, y, delta, (0,)), torch.tensor([[True]]), grid)
    step = float(grid[1] / grid[0])
    assert true / step <= float(kappa[0]) <= true * step, float(kappa[0])
    assert float(nll[0].min()) < float(nll[0, -1]) - 0.1  # a wide posterior (κ = 10) is clearly worse


def test_bad_scales():
    bank = _random_bank()
    with pytest.raises(ValueError, match="scale_range"):
        scale_grid(1.0, 0.1, 5)
    with pytest.raises(ValueError, match="scale must be"):
        subset_probs(bank, 1, scale=-1.0)
    with pytest.raises(ValueError, match="scales must be"):
        list(iter_subset_probs(bank, torch.ones(2, 3, dtype=torch.bool), scales=torch.ones(3)))
