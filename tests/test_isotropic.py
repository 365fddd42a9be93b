"""lib.laplace.isotropic: the shape-free control N(0, σ² I) against the Laplace posterior it replaces."""

from __future__ import annotations

import pytest
import torch

from lib.laplace.curvature import fit_curvature
from lib.laplace.isotropic import IsotropicPosterior
from lib.laplace.posterior import DiagPosterior, build_posterior
from lib.laplace.predictive import block_samples, perturbation_bank, perturbation_banks, subset_probs


def _posterior(model, batch, structure):
    x, y = batch
    curv = fit_curvature(model, [(x, y)], structure=structure, device="cpu")
    return build_posterior(curv, prior_precision=3.0, prior_tuning="none")


def test_samples_have_the_laplace_shapes_and_identity_covariance(tiny_lora_vit, tiny_batch):
    """Same modules and shapes as the K-FAC posterior's samples of every block; over K = 20,000
    draws the empirical covariance of a block's flattened noise is I (diagonal within 0.04, largest
    off-diagonal entry within 0.05: a few standard errors 1/√K ≈ 0.007) and its mean is 0."""
    lap = _posterior(tiny_lora_vit, tiny_batch, "kron")
    iso = IsotropicPosterior.like(lap)
    assert iso.blocks == lap.blocks and iso.device == lap.device
    for b in lap.blocks:
        ref = lap.sample_block(b, 2, torch.Generator().manual_seed(0))
        got = iso.sample_block(b, 2, torch.Generator().manual_seed(0))
        assert list(got) == list(ref)
        assert all(g.shape == r.shape for name in ref for g, r in zip(got[name], ref[name]))
    k = 20_000
    draws = iso.sample_block(1, k, torch.Generator().manual_seed(1))
    flat = torch.cat([torch.cat([a.flatten(1), b.flatten(1)], 1) for a, b in draws.values()], 1).double()
    cov = flat.T @ flat / k
    eye = torch.eye(cov.shape[0], dtype=torch.float64)
    assert cov.shape[0] == sum(e["mean"].numel() for e in lap.block_entries(1))
    assert (cov.diagonal() - 1).abs().max() < 0.04
    assert (cov - eye).abs().max() < 0.05
    assert flat.mean(0).abs().max() < 0.04


def test_bank_equals_a_diagonal_laplace_bank_with_equal_variances(tiny_lora_vit, tiny_batch):
    """A diagonal posterior with zero curvature and prior precision δ has Σ = I/δ: the control's
    bank scaled by σ = 1/√δ is that posterior's bank (same seed: the same standard normals), and its
    predictive at scale σ² = 1/δ is the diagonal posterior's predictive at κ = 1."""
    x, y = tiny_batch
    diag = _posterior(tiny_lora_vit, tiny_batch, "diag")
    assert isinstance(diag, DiagPosterior)
    for e in diag.entries:
        e["d"] = torch.zeros_like(e["d"])
    delta = 4.0
    diag.prior_precision = torch.full_like(diag.prior_precision, delta)
    iso = IsotropicPosterior.like(diag)
    kw = dict(n_samples=5, seed=13, device="cpu", mode="forward")
    lap_bank = perturbation_bank(tiny_lora_vit, diag, [(x, y)], **kw)
    iso_bank = perturbation_bank(tiny_lora_vit, iso, [(x, y)], **kw)
    assert lap_bank.delta.abs().max() > 1e-3  # a non-trivial perturbation
    assert torch.allclose(iso_bank.delta / delta**0.5, lap_bank.delta, atol=1e-6, rtol=1e-5)
    for mask in (torch.tensor([True, False, True]), torch.ones(3, dtype=torch.bool)):
        assert torch.allclose(subset_probs(iso_bank, mask, scale=1 / delta), subset_probs(lap_bank, mask), atol=1e-6)
    a = block_samples(iso, 0, 5, seed=13)
    b = block_samples(diag, 0, 5, seed=13)
    assert all(torch.allclose(u / delta**0.5, v, atol=1e-7) for n in a for u, v in zip(a[n], b[n]))


def test_rejects_unknown_blocks(tiny_lora_vit, tiny_batch):
    iso = IsotropicPosterior.like(_posterior(tiny_lora_vit, tiny_batch, "diag"))
    with pytest.raises(ValueError, match="block 7"):
        iso.sample_block(7, 2, torch.Generator())
    with pytest.raises(ValueError, match="blocks"):
        IsotropicPosterior(iso.shapes, [0, 9])


@pytest.mark.parametrize("mode", ["forward", "reverse"])
def test_one_pass_banks_equal_each_posteriors_own_bank(tiny_lora_vit, tiny_batch, mode):
    """:func:`perturbation_banks` of the Laplace posterior and its control gives each the bank it
    gets alone (same samples; equal up to rounding), in both modes; mismatched members are refused."""
    x, y = tiny_batch
    lap = _posterior(tiny_lora_vit, tiny_batch, "diag")
    iso = IsotropicPosterior.like(lap)
    kw = dict(n_samples=5, seed=13, device="cpu", mode=mode)
    both = perturbation_banks(tiny_lora_vit, [lap, iso], batches_of(x, y, 4), **kw)
    for post, bank in zip((lap, iso), both):
        alone = perturbation_bank(tiny_lora_vit, post, batches_of(x, y, 4), **kw)
        assert bank.delta.shape == alone.delta.shape and bank.blocks == alone.blocks
        assert torch.allclose(bank.delta, alone.delta, atol=1e-6, rtol=1e-5)
        assert torch.equal(bank.labels, alone.labels)
    assert not torch.allclose(both[0].delta, both[1].delta, atol=1e-3)  # two different posteriors
    with pytest.raises(ValueError, match="same blocks"):
        perturbation_banks(tiny_lora_vit, [lap, iso.__class__(iso.shapes, [0], iso.device)], [(x, y)], **kw)


def batches_of(x, y, size):
    return [(x[i : i + size], y[i : i + size]) for i in range(0, len(x), size)]
