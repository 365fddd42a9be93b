"""lib.laplace.exact: the dense block GGN against torch.func Jacobians (jacrev over functional_call)."""

from __future__ import annotations

import pytest
import torch
from conftest import dense_ggn

from lib.laplace.curvature import fit_diag
from lib.laplace.exact import block_params, block_slices, fit_block_ggn, fit_block_rows, gram_eigenvalues, weight_slices
from lib.model import lora_modules

RTOL = 1e-5  # float32 per-example gradients, sums in another order; observed ≤ 1e-6


def _batches(x, y):
    return [(x[:3], y[:3]), (x[3:], y[3:])]


def _block_weights(model, block):
    return [lin.weight for m in lora_modules(model) if m.block == block for lin in (m.A, m.B)]


def _rel(a, b):
    return float((a.double() - b.double()).abs().max() / b.double().abs().max())


@pytest.mark.parametrize("dtype,chunk", [(torch.float64, 1), (torch.float32, 3)])
def test_block_ggn_equals_torch_func(tiny_lora_vit, tiny_batch, one_thread, dtype, chunk):
    """Every block's G_ℓ = Σ_n J_nᵀ Λ_n J_n equals the dense reference from the full torch.func
    Jacobian of the logits w.r.t. that block's LoRA weights (in our parameter order), for both
    accumulation dtypes and with the output vectors batched three per backward pass."""
    x, y = tiny_batch
    curv = fit_block_ggn(tiny_lora_vit, _batches(x, y), device="cpu", dtype=dtype, class_chunk=chunk)
    assert sorted(curv.ggn) == [0, 1, 2] and curv.n_data == len(y)
    for b in range(3):
        ref = dense_ggn(tiny_lora_vit, x, _block_weights(tiny_lora_vit, b))
        assert curv.ggn[b].dtype == dtype
        assert _rel(curv.ggn[b], ref) < RTOL, b
    ref_loss = float(torch.nn.functional.cross_entropy(tiny_lora_vit(x), y, reduction="sum"))
    assert abs(curv.loss - ref_loss) < 1e-5 * ref_loss


def test_one_block_diagonal_and_scaling(tiny_lora_vit, tiny_batch, one_thread):
    """blocks=[1] fits block 1 only, its diagonal equals the diagonal GGN of fit_diag, and
    ``scaled`` multiplies GGN and loss by N'/N."""
    x, y = tiny_batch
    curv = fit_block_ggn(tiny_lora_vit, _batches(x, y), device="cpu", blocks=[1], dtype=torch.float64)
    assert list(curv.ggn) == [1] and curv.ggn[1].shape == (block_params(tiny_lora_vit)[1],) * 2
    diag = fit_diag(tiny_lora_vit, _batches(x, y), device="cpu")
    ref = torch.cat([d.reshape(-1) for n in diag.names if diag.blocks[n] == 1 for d in diag.diag[n]])
    assert _rel(curv.ggn[1].diagonal(), ref) < RTOL
    big = curv.scaled(60)
    assert big.n_data == 60 and torch.allclose(big.ggn[1], curv.ggn[1] * 10) and abs(big.loss - 10 * curv.loss) < 1e-9


def test_block_slices_follow_parameter_order(tiny_lora_vit):
    """Module slices tile 0..P_ℓ in lora_modules order, each A.numel() + B.numel() long."""
    slices = block_slices(tiny_lora_vit, 2)
    mods = [m for m in lora_modules(tiny_lora_vit) if m.block == 2]
    assert list(slices) == [m.name for m in mods]
    stops = [0] + [s.stop for s in slices.values()]
    assert [s.start for s in slices.values()] == stops[:-1]
    assert [s.stop - s.start for s in slices.values()] == [m.A.weight.numel() + m.B.weight.numel() for m in mods]
    assert stops[-1] == block_params(tiny_lora_vit)[2] == 1024


def test_bad_arguments(tiny_lora_vit, tiny_batch):
    x, y = tiny_batch
    with pytest.raises(ValueError, match="dense limit"):
        fit_block_ggn(tiny_lora_vit, _batches(x, y), device="cpu", max_params=1000)
    with pytest.raises(ValueError, match="blocks \\[7\\]"):
        fit_block_ggn(tiny_lora_vit, _batches(x, y), device="cpu", blocks=[7])
    with pytest.raises(ValueError, match="dtype"):
        fit_block_ggn(tiny_lora_vit, _batches(x, y), device="cpu", dtype=torch.float16)
    with pytest.raises(ValueError, match="class_chunk"):
        fit_block_ggn(tiny_lora_vit, _batches(x, y), device="cpu", class_chunk=0)


def test_weight_slices_tile_the_modules(tiny_lora_vit):
    """Weight slices: A then B of each module, inside its module slice, tiling 0..P_ℓ."""
    parts = weight_slices(tiny_lora_vit, 1)
    mods = [m for m in lora_modules(tiny_lora_vit) if m.block == 1]
    assert [s.stop - s.start for s in parts] == [lin.weight.numel() for m in mods for lin in (m.A, m.B)]
    assert [s.start for s in parts[1:]] == [s.stop for s in parts[:-1]] and parts[0].start == 0
    modules = list(block_slices(tiny_lora_vit, 1).values())
    assert [(a.start, b.stop) for a, b in zip(parts[::2], parts[1::2])] == [(s.start, s.stop) for s in modules]


def test_block_rows_give_the_ggn_and_its_spectrum(tiny_lora_vit, tiny_batch, one_thread):
    """The kept rows' Gram product is the dense GGN, and the spectrum from the small Gram matrix
    (R = N (C − 1) rows < P parameters) equals eigvalsh of the dense GGN (zeros included)."""
    x, y = tiny_batch
    ggn = fit_block_ggn(tiny_lora_vit, _batches(x, y), device="cpu", dtype=torch.float64)
    rows = fit_block_rows(tiny_lora_vit, _batches(x, y), device="cpu", blocks=[1, 2])
    assert sorted(rows.rows) == [1, 2] and rows.n_data == ggn.n_data and abs(rows.loss - ggn.loss) < 1e-9 * abs(ggn.loss)
    for b in (1, 2):
        r = rows.rows[b]
        assert r.dtype == torch.float64 and r.shape == (len(y) * 3, block_params(tiny_lora_vit)[b])  # C − 1 = 3
        assert r.shape[0] < r.shape[1]
        assert _rel(r.T @ r, ggn.ggn[b]) < 1e-12
        eigs, ref = gram_eigenvalues(r), torch.linalg.eigvalsh(ggn.ggn[b]).clamp_min(0)
        assert eigs.shape == ref.shape
        assert torch.allclose(eigs, ref, rtol=0, atol=1e-9 * float(ref.max()))


def test_gram_eigenvalues_tall_and_wide_hand_case():
    rows = torch.tensor([[3.0, 0.0, 0.0], [0.0, 4.0, 0.0]], dtype=torch.float64)  # G = diag(9, 16, 0)
    assert torch.allclose(gram_eigenvalues(rows), torch.tensor([0.0, 9.0, 16.0], dtype=torch.float64), atol=1e-12)
    tall = torch.cat([rows, torch.tensor([[0.0, 0.0, 2.0], [0.0, 0.0, 0.0]], dtype=torch.float64)])
    assert torch.allclose(gram_eigenvalues(tall), torch.tensor([4.0, 9.0, 16.0], dtype=torch.float64), atol=1e-12)
