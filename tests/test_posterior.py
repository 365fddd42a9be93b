"""lib.laplace.posterior / marglik against laplace-torch 0.3 and exact dense linear algebra."""

from __future__ import annotations

import pytest
import torch
from conftest import dense_ggn, freeze_all_but_lora, lora_permutation
from laplace import Laplace
from laplace.curvature import CurvlinopsGGN

from lib.laplace import DiagPosterior, KronPosterior, LaplacePosterior, build_posterior, fit_diag, fit_kron
from lib.laplace.exact import fit_block_ggn
from lib.laplace.posterior import DenseBlockPosterior
from lib.laplace.marglik import log_evidence_terms, optimal_prior
from lib.model import lora_modules, set_fused_attention

DELTA = torch.tensor([0.5, 2.0, 7.0])  # one prior precision per block of the tiny ViT


def _batches(x, y):
    return [(x[:3], y[:3]), (x[3:], y[3:])]


def _curvature(model, x, y, structure):
    if structure == "kron":
        return fit_kron(model, _batches(x, y), device="cpu", kfac="expand")
    return fit_diag(model, _batches(x, y), device="cpu")


def _laplace_torch(model, x, y, structure, blocks=None):
    """laplace-torch over the LoRA weights of ``blocks`` (others frozen), δ per weight from DELTA.

    ``structure='full'``: the dense GGN (laplace-torch forms it with forward-mode AD, so timm's
    fused attention is switched off for it)."""
    if structure == "full":
        set_fused_attention(model, False)
    params = freeze_all_but_lora(model, blocks)
    block_of = {id(lin.weight): m.block for m in lora_modules(model) for lin in (m.A, m.B)}
    delta = torch.tensor([float(DELTA[block_of[id(p)]]) for p in params])
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=3)
    la = Laplace(model, "classification", subset_of_weights="all", hessian_structure=structure,
                 backend=CurvlinopsGGN, prior_precision=delta)
    la.fit(loader)
    perm = lora_permutation(model, params, blocks)
    if structure == "kron":
        cov = la.posterior_precision.to_matrix(exponent=-1)
        prec = la.posterior_precision.to_matrix()
    elif structure == "full":
        cov, prec = la.posterior_covariance, la.posterior_precision
    else:
        cov, prec = torch.diag(la.posterior_variance), torch.diag(la.posterior_precision)
    return la, cov.double()[perm][:, perm], prec.double()[perm][:, perm]


def _assert_inverse_within_bound(post, prec_ref):
    """Our covariance vs inv(reference precision) within ‖C‖‖C_ref‖‖P − P_ref‖ (+ fp64 slack)."""
    cov, cov_ref = post.dense_covariance(), torch.linalg.inv(prec_ref)
    norm = lambda m: torch.linalg.matrix_norm(m, ord=2)  # noqa: E731
    bound = norm(cov) * norm(cov_ref) * norm(post.dense_precision() - prec_ref)
    assert norm(cov - cov_ref) <= 1.01 * bound + 1e-9 * norm(cov_ref)


def _rel(a, b):
    return float((a.double() - b.double()).abs().max() / b.double().abs().max())


@pytest.mark.parametrize("structure", ["kron", "diag"])
def test_covariance_and_evidence_match_laplace_torch(tiny_lora_vit, tiny_batch, structure):
    """Same curvature variant ('expand', laplace-torch's default) and per-block δ: dense precision,
    covariance and log marginal likelihood agree. Both libraries accumulate the factors in fp32, so
    the precisions differ by ~1e-6 relative; a covariance inverts that difference with the
    amplification of near-null directions, C₁ − C₂ = C₁ (P₂ − P₁) C₂, so the covariance is checked
    against the float64 inverse of laplace-torch's precision within that exact perturbation bound
    ``‖C₁ − C₂‖ ≤ ‖C₁‖ ‖C₂‖ ‖P₁ − P₂‖`` (spectral norms), and against laplace-torch's own fp32
    covariance to 5e-3."""
    x, y = tiny_batch
    post = build_posterior(_curvature(tiny_lora_vit, x, y, structure), prior_precision=DELTA, prior_tuning="none")
    la, cov, prec = _laplace_torch(tiny_lora_vit, x, y, structure)
    assert _rel(post.dense_precision(), prec) < 1e-5
    _assert_inverse_within_bound(post, prec)
    assert _rel(post.dense_covariance(), cov) < 5e-3
    ours = post.log_marginal_likelihood()
    ref = la.log_marginal_likelihood().double()
    assert abs(float(ours - ref)) < 1e-5 * abs(float(ref))
    assert torch.allclose(post.mean_vector(), torch.cat([p.detach().reshape(-1) for p in la.params])
                          [lora_permutation(tiny_lora_vit, la.params)])


@pytest.mark.parametrize("structure", ["kron", "diag"])
def test_restrict_equals_fitting_with_other_blocks_frozen(tiny_lora_vit, tiny_batch, structure):
    """p_S for S = {1}: laplace-torch fitted with only block 1's LoRA trainable gives the same Σ."""
    x, y = tiny_batch
    post = build_posterior(_curvature(tiny_lora_vit, x, y, structure), prior_precision=DELTA, prior_tuning="none")
    sub = post.restrict([1])
    la, cov, prec = _laplace_torch(tiny_lora_vit, x, y, structure, blocks=[1])
    assert sub.blocks == [1]
    _assert_inverse_within_bound(sub, prec)
    assert _rel(sub.dense_covariance(), cov) < 5e-3
    ref = la.log_marginal_likelihood().double()
    assert abs(float(sub.log_marginal_likelihood() - ref)) < 1e-5 * abs(float(ref))
    zero = sub.variance_block(0)
    assert all(float(v.abs().max()) == 0 for pair in zero.values() for v in pair)
    gen = torch.Generator().manual_seed(0)
    assert all(float(s.abs().max()) == 0 for pair in sub.sample_block(2, 3, gen).values() for s in pair)


@pytest.fixture
def kron_post(tiny_lora_vit, tiny_batch):
    x, y = tiny_batch
    return build_posterior(_curvature(tiny_lora_vit, x, y, "kron"), prior_precision=DELTA, prior_tuning="none")


@pytest.mark.parametrize("rank", [None, 8])
def test_samples_and_variances_match_dense_covariance(tiny_lora_vit, tiny_batch, rank):
    """Sample shapes; variance_block = diag(dense Σ) exactly; the empirical covariance of 40 000
    samples matches Σ within the Monte-Carlo error; with rank truncation Σ = (dense precision)⁻¹."""
    x, y = tiny_batch
    post = KronPosterior(_curvature(tiny_lora_vit, x, y, "kron"), DELTA, rank=rank)
    block = 1
    cov = post.dense_covariance([block])
    var = post.variance_block(block)
    assert torch.allclose(torch.cat([v.reshape(-1) for pair in var.values() for v in pair]).double(),
                          cov.diagonal(), rtol=1e-4)
    if rank is not None:
        assert _rel(cov, torch.linalg.inv(post.dense_precision([block]))) < 1e-4
    k = 40_000
    samples = post.sample_block(block, k, torch.Generator().manual_seed(0))
    for m in lora_modules(tiny_lora_vit):
        if m.block == block:
            da, db = samples[m.name]
            assert da.shape == (k, *m.A.weight.shape) and db.shape == (k, *m.B.weight.shape)
    flat = torch.cat([s.reshape(k, -1) for pair in samples.values() for s in pair], 1)[:, :320].double()
    emp = flat.T @ flat / k  # the block's first two modules (proj, qkv: 320 weights) keep it cheap
    # entrywise sd of an empirical covariance is ≤ sqrt(2/k)·max variance; 6 sd over ~10⁵ entries
    assert float((emp - cov[:320, :320]).abs().max()) < 6 * (2 / k) ** 0.5 * float(cov.diagonal().max())


def test_diag_samples(tiny_lora_vit, tiny_batch):
    x, y = tiny_batch
    post = DiagPosterior(_curvature(tiny_lora_vit, x, y, "diag"), DELTA)
    k = 20_000
    samples = post.sample_block(0, k, torch.Generator().manual_seed(0))
    flat = torch.cat([s.reshape(k, -1) for pair in samples.values() for s in pair], 1).double()
    var = post.dense_covariance([0]).diagonal()
    assert torch.allclose(flat.square().mean(0), var, rtol=6 * (2 / k) ** 0.5)


def test_log_det_equals_dense_slogdet(kron_post):
    """The eigenvalue form of the evidence equals the dense-matrix formula."""
    prec = kron_post.dense_precision()
    theta = kron_post.mean_vector().double()
    p = theta.numel()
    d = torch.cat([DELTA[b].double().expand(sum(e["mean"].numel() for e in kron_post.block_entries(b)))
                   for b in range(3)])
    ref = -kron_post.loss - 0.5 * (d * theta.square()).sum() + 0.5 * d.log().sum() - 0.5 * torch.linalg.slogdet(prec)[1]
    assert p == prec.shape[0]
    assert abs(float(kron_post.log_marginal_likelihood() - ref)) < 1e-6 * abs(float(ref))


@pytest.mark.parametrize("per_block", [True, False])
def test_tuned_prior_maximises_evidence(kron_post, per_block):
    """Stationary (central difference in log δ ≈ 0) and better than δ·(1 ± 1%)."""
    delta = kron_post.tune_prior(per_block=per_block)
    assert kron_post.per_block is per_block
    if not per_block:
        assert torch.allclose(delta, delta[0].expand(3))
    best = kron_post.log_marginal_likelihood(delta)
    for f in (0.99, 1.01):
        for b in range(3):
            other = delta.clone()
            other[b if per_block else slice(None)] *= f
            assert kron_post.log_marginal_likelihood(other) < best
    h = 1e-4
    up, down = kron_post.marglik_terms(delta.double() * (1 + h)), kron_post.marglik_terms(delta.double() * (1 - h))
    grad = (up - down) / (2 * h)  # d f_ℓ / d log δ per block; a shared δ zeroes only the sum
    grad = grad if per_block else grad.sum()[None]
    assert float(grad.abs().max()) < 1e-4 * float(kron_post.marglik_terms(delta).abs().sum())


def test_optimal_prior_closed_form():
    """One eigenvalue λ: δ s = λ/(λ+δ) ⇒ δ = (−λ + sqrt(λ² + 4λ/s))/2."""
    lam, s = torch.tensor([3.0], dtype=torch.float64), torch.tensor([0.5], dtype=torch.float64)
    delta = optimal_prior([lam], s)
    assert torch.allclose(delta, (-lam + torch.sqrt(lam**2 + 4 * lam / s)) / 2, rtol=1e-12)
    assert float(log_evidence_terms([lam], s, delta)) > float(log_evidence_terms([lam], s, delta * 1.001))
    with pytest.raises(ValueError, match="no finite optimum"):
        optimal_prior([torch.zeros(3)], s)


def test_restricted_prior_inherit_vs_retune(kron_post):
    """Per-block δ: the evidence separates over blocks, so retuning on S reproduces the inherited δ.
    Shared δ: retuning on S = {0} maximises the evidence of S alone and differs from the full-model δ."""
    full = kron_post.tune_prior(per_block=True)
    inherit = kron_post.restrict([0, 2], "inherit")
    retune = kron_post.restrict([0, 2], "retune")
    assert torch.allclose(retune.prior_precision[[0, 2]], full[[0, 2]], rtol=1e-5)
    assert torch.equal(inherit.prior_precision, full)

    shared = kron_post.tune_prior(per_block=False)
    inherit = kron_post.restrict([0], "inherit")
    retune = kron_post.restrict([0], "retune")
    assert torch.equal(inherit.prior_precision, shared)
    assert abs(float(retune.prior_precision[0] / shared[0]) - 1) > 1e-2
    assert retune.log_marginal_likelihood() > inherit.log_marginal_likelihood()
    solo = kron_post.restrict([0]).tune_prior(per_block=True)
    assert torch.allclose(retune.prior_precision[0], solo[0], rtol=1e-5)


def test_summary_traces(kron_post):
    rows = kron_post.summary()
    assert [r["block"] for r in rows] == [0, 1, 2]
    for r in rows:
        cov = kron_post.dense_covariance([r["block"]])
        prec = kron_post.dense_precision([r["block"]])
        assert abs(r["variance_trace"] - float(cov.trace())) < 1e-4 * float(cov.trace())
        ggn_trace = float(prec.trace()) - float(DELTA[r["block"]]) * r["n_params"]
        assert abs(r["curvature_trace"] - ggn_trace) < 1e-4 * ggn_trace


def test_save_load_roundtrip(kron_post, tmp_path):
    kron_post.tune_prior(per_block=True)
    sub = kron_post.restrict([1, 2])
    sub.save(tmp_path / "post.pt")
    back = LaplacePosterior.load(tmp_path / "post.pt")
    assert isinstance(back, KronPosterior) and back.blocks == [1, 2]
    assert torch.equal(back.prior_precision, sub.prior_precision)
    a = sub.sample_block(2, 4, torch.Generator().manual_seed(3))
    b = back.sample_block(2, 4, torch.Generator().manual_seed(3))
    assert all(torch.equal(a[n][i], b[n][i]) for n in a for i in (0, 1))
    assert float(back.log_marginal_likelihood()) == float(sub.log_marginal_likelihood())


def test_bad_arguments(kron_post):
    with pytest.raises(ValueError, match="prior_precision"):
        kron_post.log_marginal_likelihood(torch.ones(2))
    with pytest.raises(ValueError, match="blocks"):
        kron_post.restrict([5])
    with pytest.raises(ValueError, match="restricted_prior"):
        kron_post.restrict([0], "keep")


@pytest.fixture
def dense_curv(tiny_lora_vit, tiny_batch):
    x, y = tiny_batch
    return fit_block_ggn(tiny_lora_vit, _batches(x, y), device="cpu", dtype=torch.float64)


def test_dense_block_matches_laplace_torch_full(tiny_lora_vit, tiny_batch, dense_curv):
    """laplace-torch ``hessian_structure='full'`` with only block 1's LoRA weights trainable, at
    δ = DELTA[1]: the dense precision GGN₁ + δ I, the covariance (the exact perturbation bound
    against the float64 inverse of laplace-torch's precision, and 5e-3 against its fp32 inverse)
    and the log marginal likelihood of p_{1} agree."""
    x, y = tiny_batch
    post = DenseBlockPosterior(dense_curv, DELTA, blocks=[1])
    la, cov, prec = _laplace_torch(tiny_lora_vit, x, y, "full", blocks=[1])
    assert _rel(post.dense_precision(), prec) < 1e-5
    _assert_inverse_within_bound(post, prec)
    assert _rel(post.dense_covariance(), cov) < 5e-3
    ref = la.log_marginal_likelihood().double()
    assert abs(float(post.log_marginal_likelihood() - ref)) < 1e-5 * abs(float(ref))


def test_dense_block_equals_inverse_of_torch_func_ggn(tiny_lora_vit, tiny_batch, dense_curv):
    """Σ_ℓ = (G_ℓ + δ_ℓ I)⁻¹ with G_ℓ from torch.func (jacrev), block-diagonal across blocks; the
    evidence equals the dense formula with slogdet."""
    x, _ = tiny_batch
    post = DenseBlockPosterior(dense_curv, DELTA)
    ggns, covs = [], []
    for b in range(3):
        ws = [lin.weight for m in lora_modules(tiny_lora_vit) if m.block == b for lin in (m.A, m.B)]
        g = dense_ggn(tiny_lora_vit, x, ws).detach()
        ggns.append(g)
        covs.append(torch.linalg.inv(g + float(DELTA[b]) * torch.eye(len(g), dtype=torch.float64)))
    assert _rel(post.dense_covariance(), torch.block_diag(*covs)) < 1e-5
    theta = post.mean_vector().double()
    terms = []
    for b, g in enumerate(ggns):
        d = float(DELTA[b])
        th = post.mean_vector([b]).double()
        logdet = torch.linalg.slogdet(g + d * torch.eye(len(g), dtype=torch.float64))[1]
        terms.append(-0.5 * (d * th @ th - len(th) * torch.log(torch.tensor(d, dtype=torch.float64)) + logdet))
    assert len(theta) == 3 * 1024
    ref = -post.loss + sum(terms)
    # the eigenvalues are stored in float32 (relative 6e-8 each): observed 1.2e-8 relative
    assert abs(float(post.log_marginal_likelihood() - ref)) < 1e-7 * abs(float(ref))


def test_dense_block_samples_variances_summary(dense_curv):
    """variance_block = diag Σ; 20 000 samples reproduce Σ of block 0 within the Monte-Carlo
    error; the summary traces are tr Σ and tr G; blocks outside the posterior give zeros."""
    post = DenseBlockPosterior(dense_curv, DELTA, blocks=[0, 2])
    cov = post.dense_covariance([0])
    var = torch.cat([v.reshape(-1) for pair in post.variance_block(0).values() for v in pair]).double()
    assert torch.allclose(var, cov.diagonal(), rtol=1e-5)
    k = 20_000
    samples = post.sample_block(0, k, torch.Generator().manual_seed(0))
    flat = torch.cat([s.reshape(k, -1) for pair in samples.values() for s in pair], 1).double()
    emp = flat.T @ flat / k
    assert float((emp - cov).abs().max()) < 6 * (2 / k) ** 0.5 * float(cov.diagonal().max())
    rows = post.summary()
    assert abs(rows[0]["variance_trace"] - float(cov.trace())) < 1e-5 * float(cov.trace())
    assert abs(rows[2]["curvature_trace"] - float(dense_curv.ggn[2].trace())) < 1e-5 * float(dense_curv.ggn[2].trace())
    assert rows[1]["variance_trace"] == 0.0
    zero = post.sample_block(1, 2, torch.Generator().manual_seed(0))
    assert all(float(s.abs().max()) == 0 for pair in zero.values() for s in pair)


def test_dense_block_tuning_save_load(dense_curv, tmp_path):
    """build_posterior tunes δ_ℓ to a stationary point of the evidence (a finite-difference check
    on both sides), restrict keeps it, and save/load gives the same samples and evidence."""
    post = build_posterior(dense_curv, prior_precision=1.0)
    assert isinstance(post, DenseBlockPosterior)
    lml = post.log_marginal_likelihood()
    for b in range(3):
        for f in (0.99, 1.01):
            d = post.prior_precision.clone()
            d[b] *= f
            assert post.log_marginal_likelihood(d) < lml
    sub = post.restrict([2])
    sub.save(tmp_path / "post.pt")
    back = LaplacePosterior.load(tmp_path / "post.pt")
    assert isinstance(back, DenseBlockPosterior) and back.blocks == [2]
    a = sub.sample_block(2, 4, torch.Generator().manual_seed(3))
    b = back.sample_block(2, 4, torch.Generator().manual_seed(3))
    assert all(torch.equal(a[n][i], b[n][i]) for n in a for i in (0, 1))
    assert float(back.log_marginal_likelihood()) == float(sub.log_marginal_likelihood())


def test_dense_block_bad_arguments(tiny_lora_vit, tiny_batch, dense_curv):
    x, y = tiny_batch
    with pytest.raises(ValueError, match="rank"):
        build_posterior(dense_curv, rank=4)
    one = fit_block_ggn(tiny_lora_vit, _batches(x, y), device="cpu", blocks=[0])
    with pytest.raises(ValueError, match="no GGN for blocks \\[1, 2\\]"):
        DenseBlockPosterior(one)
    with pytest.raises(ValueError, match="DenseCurvature"):
        DenseBlockPosterior(fit_diag(tiny_lora_vit, _batches(x, y), device="cpu"))
