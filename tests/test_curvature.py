"""lib.laplace.curvature against laplace-torch 0.3 / curvlinops and dense torch.func GGNs."""

from __future__ import annotations

import pytest
import torch
from conftest import dense_ggn, freeze_all_but_lora, lora_permutation, make_lora_vit
from laplace import Laplace
from laplace.curvature import CurvlinopsGGN

from lib.config import ModelConfig
from lib.laplace.curvature import add_gram, fit_diag, fit_kron, output_vectors
from lib.model import lora_modules, set_fused_attention, unwrap

RTOL = 1e-4  # fp32 accumulation in different orders; observed ≤ 2e-7 relative to the factor's max


def _close(a: torch.Tensor, b: torch.Tensor, rtol: float = RTOL) -> bool:
    """Max-abs difference relative to the reference's max-abs entry."""
    return bool((a.double() - b.double()).abs().max() <= rtol * b.double().abs().max())


def _batches(x, y, size=3):
    return [(x[i : i + size], y[i : i + size]) for i in range(0, len(y), size)]


def _laplace_torch(model, x, y, structure, **kw):
    params = freeze_all_but_lora(model)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=3)
    la = Laplace(model, "classification", subset_of_weights="all", hessian_structure=structure,
                 backend=CurvlinopsGGN, **kw)
    la.fit(loader)
    return la, params


@pytest.mark.parametrize("kfac", ["expand", "reduce"])
def test_kfac_factors_match_laplace_torch(tiny_lora_vit, tiny_batch, kfac):
    """laplace-torch's kron (curvlinops KFACLinearOperator, type-2 GGN) with the same K-FAC variant.

    laplace-torch defaults to 'expand' (curvlinops' default); 'reduce' is passed through
    ``asdl_fisher_kwargs={'kfac_approx': 'reduce'}``. Factors are [G, X] per weight, summed over
    batches with X rescaled by M/N: the same normalisation as ours.
    """
    x, y = tiny_batch
    curv = fit_kron(tiny_lora_vit, _batches(x, y), device="cpu", kfac=kfac)
    la, params = _laplace_torch(tiny_lora_vit, x, y, "kron", asdl_fisher_kwargs={"kfac_approx": kfac})
    pos = {id(p): i for i, p in enumerate(params)}
    for m in lora_modules(tiny_lora_vit):
        for lin, ours in zip((m.A, m.B), curv.factors[m.name]):
            G, X = la.H_facs.kfacs[pos[id(lin.weight)]]
            assert _close(ours.G, G), (m.name, kfac)
            assert _close(ours.X, X), (m.name, kfac)
    assert curv.n_data == len(y)
    assert abs(curv.loss - float(la.loss)) <= 1e-5 * float(la.loss)


def test_expand_and_reduce_differ(tiny_lora_vit, tiny_batch):
    """The two K-FAC variants are genuinely different on a multi-token model."""
    x, y = tiny_batch
    e = fit_kron(tiny_lora_vit, _batches(x, y), device="cpu", kfac="expand")
    r = fit_kron(tiny_lora_vit, _batches(x, y), device="cpu", kfac="reduce")
    name = e.names[0]
    assert not _close(e.factors[name][0].X, r.factors[name][0].X, rtol=1e-2)


def test_diag_matches_laplace_torch(tiny_lora_vit, tiny_batch):
    """laplace-torch's diag GGN (exact, from torch.func Jacobians) in our parameter order."""
    x, y = tiny_batch
    curv = fit_diag(tiny_lora_vit, _batches(x, y), device="cpu")
    la, params = _laplace_torch(tiny_lora_vit, x, y, "diag")
    ref = la.H[lora_permutation(tiny_lora_vit, params)]
    ours = torch.cat([d.reshape(-1) for n in curv.names for d in curv.diag[n]])
    assert _close(ours, ref)


SINGLE_TOKEN = ModelConfig(
    name="vit_tiny_patch16_224",
    kwargs=dict(img_size=4, patch_size=4, embed_dim=8, depth=1, num_heads=2, class_token=False, global_pool="avg"),
)


def _tiny_dense_model():
    model = make_lora_vit(SINGLE_TOKEN, num_classes=3, r=1)
    set_fused_attention(model, False)
    return model


def _weights(model):
    return [lin.weight for m in lora_modules(model) for lin in (m.A, m.B)]


@pytest.mark.parametrize("kfac", ["expand", "reduce"])
def test_kfac_exact_for_one_example_one_token(kfac):
    """N = 1, T = 1: each weight's GGN block is Σ_c (g_c aᵀ)(g_c aᵀ)ᵀ = (Σ_c g_c g_cᵀ) ⊗ a aᵀ, so
    K-FAC (both variants) equals the dense GGN's diagonal blocks exactly."""
    model = _tiny_dense_model()
    x = torch.randn(1, 3, 4, 4, generator=torch.Generator().manual_seed(0))
    assert unwrap(model).patch_embed.num_patches == 1
    curv = fit_kron(model, [(x, torch.tensor([1]))], device="cpu", kfac=kfac)
    ggn = dense_ggn(model, x, _weights(model))
    o = 0
    for name in curv.names:
        for f in curv.factors[name]:
            k = f.G.shape[0] * f.X.shape[0]
            assert torch.allclose(torch.kron(f.G, f.X).double(), ggn[o : o + k, o : o + k], rtol=1e-4, atol=1e-7)
            o += k
    assert o == ggn.shape[0]


def test_diag_equals_dense_ggn_diagonal(tiny_lora_vit, tiny_batch):
    """Many examples and 17 tokens: the diagonal is exact (no Kronecker approximation)."""
    x, y = tiny_batch
    set_fused_attention(tiny_lora_vit, False)
    curv = fit_diag(tiny_lora_vit, _batches(x, y), device="cpu")
    ggn = dense_ggn(tiny_lora_vit, x, _weights(tiny_lora_vit))
    ours = torch.cat([d.reshape(-1) for n in curv.names for d in curv.diag[n]])
    assert _close(ours, ggn.diagonal())


def test_ggn_equals_hessian_where_linear():
    """The GGN drops ``Σ_c ∂L/∂f_c ∇²f_c``; it is the exact Hessian where the logits are linear in
    the parameters. With the final LayerNorm removed and class-token pooling, the logits are
    ``W_head (h + s·B_fc2 A_fc2 u) + b`` in the last block's fc2 LoRA ``B`` (``u`` does not depend on
    it), so in that weight linearised Laplace = exact Laplace; our diag matches that Hessian too."""
    cfg = ModelConfig(name="vit_tiny_patch16_224",
                      kwargs=dict(img_size=8, patch_size=4, embed_dim=8, depth=1, num_heads=2))
    model = make_lora_vit(cfg, num_classes=3, r=1)
    set_fused_attention(model, False)
    unwrap(model).norm = torch.nn.Identity()
    gen = torch.Generator().manual_seed(1)
    x, y = torch.randn(4, 3, 8, 8, generator=gen), torch.tensor([0, 1, 2, 1])
    last = lora_modules(model)[-1]
    assert last.kind == "fc2"
    w = last.B.weight
    key = next(n for n, p in model.named_parameters() if p is w)

    def loss(wb):
        out = torch.func.functional_call(model, {key: wb}, (x,))
        return torch.nn.functional.cross_entropy(out.double(), y, reduction="sum")

    hess = torch.func.hessian(loss)(w.detach()).reshape(w.numel(), w.numel())
    ggn = dense_ggn(model, x, [w])
    assert torch.allclose(ggn, hess.double(), rtol=1e-4, atol=1e-6)
    curv = fit_diag(model, [(x, y)], device="cpu")
    assert torch.allclose(curv.diag[last.name][1].reshape(-1).double(), hess.diagonal().double(), rtol=1e-4, atol=1e-6)


def test_mc_output_vectors_are_unbiased():
    """E[V Vᵀ] = diag(p) − p pᵀ for the MC vectors; the exact vectors reproduce it exactly."""
    logits = torch.tensor([[0.3, -1.0, 2.0, 0.1], [0.0, 0.5, -0.5, 1.5]])
    p = logits.softmax(-1).double()
    lam = torch.diag_embed(p) - p[:, :, None] * p[:, None, :]
    exact = output_vectors(logits, "exact", 1, None).double()
    assert exact.shape == (3, 2, 4)  # C − 1 vectors: Λ has rank C − 1
    assert torch.allclose(torch.einsum("snc,snd->ncd", exact, exact), lam, atol=1e-6)
    mc = output_vectors(logits, "mc", 200_000, torch.Generator().manual_seed(0)).double()
    assert torch.allclose(torch.einsum("snc,snd->ncd", mc, mc), lam, atol=5e-3)


def test_exact_output_vectors_factor_lambda_with_rank_c_minus_one():
    """Σ_s V Vᵀ = diag(p) − p pᵀ in float64 for many classes, saturated and uniform softmaxes and
    two classes; the vectors are orthogonal to 1 like Λ's range."""
    g = torch.Generator().manual_seed(1)
    for logits in (torch.randn(6, 100, generator=g, dtype=torch.float64) * 4,
                   torch.tensor([[30.0, 0.0, -30.0], [0.0, 0.0, 0.0]], dtype=torch.float64),
                   torch.tensor([[2.0, -1.0], [-40.0, 40.0]], dtype=torch.float64)):
        p = logits.softmax(-1)
        lam = torch.diag_embed(p) - p[:, :, None] * p[:, None, :]
        v = output_vectors(logits.double(), "exact", 1, None).double()
        assert v.shape == (p.shape[1] - 1, *p.shape)
        assert torch.allclose(torch.einsum("snc,snd->ncd", v, v), lam, atol=1e-6)
        assert v.sum(-1).abs().max() < 1e-6


def test_mc_fisher_converges_to_ggn(tiny_batch):
    """fisher='mc' with many samples approaches the exact GGN (Monte-Carlo error ~ M^-1/2) and is seeded."""
    model = _tiny_dense_model()
    x = torch.randn(4, 3, 4, 4, generator=torch.Generator().manual_seed(2))
    y = torch.tensor([0, 1, 2, 0])
    exact = fit_diag(model, [(x, y)], device="cpu")
    mc = fit_diag(model, [(x, y)], device="cpu", fisher="mc", mc_samples=300, generator=torch.Generator().manual_seed(0))
    flat = lambda c: torch.cat([d.reshape(-1) for n in c.names for d in c.diag[n]])  # noqa: E731
    assert _close(flat(mc), flat(exact), rtol=0.15)  # observed ≤ 0.05 over 5 seeds
    once = fit_kron(model, [(x, y)], device="cpu", fisher="mc", mc_samples=3, generator=torch.Generator().manual_seed(0))
    again = fit_kron(model, [(x, y)], device="cpu", fisher="mc", mc_samples=3, generator=torch.Generator().manual_seed(0))
    name = once.names[0]
    assert torch.equal(once.factors[name][1].G, again.factors[name][1].G)


@pytest.mark.parametrize("structure,kfac,fisher", [
    ("kron", "expand", "exact"), ("kron", "reduce", "exact"), ("diag", "expand", "exact"), ("kron", "reduce", "mc"),
])
@pytest.mark.parametrize("chunk", [2, 64])
def test_batched_backward_equals_one_pass_per_class(tiny_lora_vit, tiny_batch, structure, kfac, fisher, chunk):
    """class_chunk > 1 (one vmapped backward for several output vectors, fused attention off) gives
    the factors of one backward pass per vector; 2 leaves a remainder chunk, 64 > C takes them all."""
    x, y = tiny_batch
    kw = dict(device="cpu", fisher=fisher, mc_samples=3)
    fit = (lambda **k: fit_kron(tiny_lora_vit, _batches(x, y), kfac=kfac, **kw, **k)) if structure == "kron" else (
        lambda **k: fit_diag(tiny_lora_vit, _batches(x, y), **kw, **k))
    attn = [m for m in unwrap(tiny_lora_vit).modules() if hasattr(m, "fused_attn")]
    fused = [m.fused_attn for m in attn]
    one = fit(class_chunk=1, generator=torch.Generator().manual_seed(0))
    many = fit(class_chunk=chunk, generator=torch.Generator().manual_seed(0))
    for name in one.names:
        if structure == "kron":
            for a, b in zip(many.factors[name], one.factors[name]):
                assert _close(a.G, b.G, rtol=1e-5) and _close(a.X, b.X, rtol=1e-6), name
        else:
            for a, b in zip(many.diag[name], one.diag[name]):
                assert _close(a, b, rtol=1e-5), name
    assert abs(many.loss - one.loss) <= 1e-6 * one.loss
    assert attn and [m.fused_attn for m in attn] == fused  # restored after the batched fit


def test_bad_arguments(tiny_lora_vit, tiny_batch):
    x, y = tiny_batch
    with pytest.raises(ValueError, match="class_chunk"):
        fit_kron(tiny_lora_vit, [(x, y)], device="cpu", class_chunk=0)
    with pytest.raises(ValueError, match="kfac"):
        fit_kron(tiny_lora_vit, [(x, y)], device="cpu", kfac="mean")
    with pytest.raises(ValueError, match="fisher"):
        fit_diag(tiny_lora_vit, [(x, y)], device="cpu", fisher="empirical")


def _round_to_tf32(x: torch.Tensor) -> torch.Tensor:
    """float32 → nearest TF32 value (10 mantissa bits; ties to even), as float32."""
    bits = x.view(torch.int32).to(torch.int64)
    lsb = (bits >> 13) & 1
    rounded = ((bits + 0xFFF + lsb) >> 13) << 13
    return rounded.to(torch.int32).view(torch.float32)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_values_are_exact_in_tf32(dtype):
    """The premise of add_gram: bf16 / fp16 values survive TF32 rounding, generic float32 values do not."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(100_000, generator=gen) * torch.logspace(-6, 4, 100_000)
    half = x.to(dtype).float()
    half = half[torch.isfinite(half)]
    assert torch.equal(_round_to_tf32(half), half)
    assert (_round_to_tf32(x) != x).float().mean() > 0.99  # the negative control


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_add_gram_matches_float64_and_restores_precision(dtype):
    gen = torch.Generator().manual_seed(1)
    rows = torch.randn(500, 24, generator=gen).to(dtype)
    acc = torch.eye(24)
    torch.set_float32_matmul_precision("highest")
    add_gram(acc, rows)
    assert torch.get_float32_matmul_precision() == "highest"
    r = rows.double()
    assert torch.allclose(acc.double(), torch.eye(24, dtype=torch.float64) + r.T @ r, rtol=1e-5, atol=1e-4)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="TF32 tensor cores need CUDA")
def test_add_gram_on_cuda_is_exact_for_bf16_rows():
    """On the GPU the TF32 product of bf16 rows is float32-exact; generic float32 rows under TF32
    would not be (the control shows TF32 is really on for them)."""
    gen = torch.Generator().manual_seed(2)
    rows = torch.randn(4096, 512, generator=gen)
    half = rows.bfloat16()
    acc = torch.zeros(512, 512, device="cuda")
    add_gram(acc, half.cuda())
    ref = half.double().T @ half.double()
    assert (acc.double().cpu() - ref).abs().max() <= 1e-5 * ref.abs().max()
    torch.set_float32_matmul_precision("high")
    try:
        tf32 = (rows.cuda().T @ rows.cuda()).double().cpu()
    finally:
        torch.set_float32_matmul_precision("highest")
    generic = rows.double().T @ rows.double()
    assert (tf32 - generic).abs().max() > 1e-5 * generic.abs().max()


@pytest.mark.parametrize("structure,kfac,chunk", [("kron", "expand", 1), ("kron", "expand", 3), ("kron", "reduce", 3),
                                                  ("diag", "expand", 3)])
def test_bf16_autocast_fit_agrees_with_float32(tiny_lora_vit, tiny_batch, structure, kfac, chunk):
    """The half-precision path of the GPU fit (bf16 gradients and inputs into add_gram), run under
    CPU autocast: within bf16 rounding of the float32 factors (observed ≤ 3.4e-2 relative)."""
    x, y = tiny_batch
    kw = dict(device="cpu", class_chunk=chunk, progress=False)
    if structure == "kron":
        ref = fit_kron(tiny_lora_vit, _batches(x, y), kfac=kfac, **kw)
        half = fit_kron(tiny_lora_vit, _batches(x, y), kfac=kfac, autocast_dtype=torch.bfloat16, **kw)
        pairs = [(a, b) for n in ref.factors for fr, fh in zip(ref.factors[n], half.factors[n])
                 for a, b in ((fh.G, fr.G), (fh.X, fr.X))]
    else:
        ref = fit_diag(tiny_lora_vit, _batches(x, y), **kw)
        half = fit_diag(tiny_lora_vit, _batches(x, y), autocast_dtype=torch.bfloat16, **kw)
        pairs = [(a, b) for n in ref.diag for a, b in zip(half.diag[n], ref.diag[n])]
    assert all(a.dtype == torch.float32 for a, _ in pairs)
    assert all(_close(a, b, rtol=0.1) for a, b in pairs)
    assert not all(_close(a, b, rtol=1e-4) for a, b in pairs)  # bf16 really ran
