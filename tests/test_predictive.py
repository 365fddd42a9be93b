"""Tests of lib.laplace.predictive: the per-block perturbation bank and the subset predictives.

References: explicit Jacobians (torch.func.jacrev) times the same samples, the exact logit
covariance ``J Σ Jᵀ``, laplace-torch's GLM predictive under the same posterior covariance, and
hand-worked 2-sample cases.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch.func import functional_call, jacrev
from torch.utils.data import DataLoader, TensorDataset

from lib.laplace.predictive import (
    Bank,
    block_samples,
    iter_subset_probs,
    perturbation_bank,
    standard_subsets,
    subset_probs,
    sample_mixture,
)
from lib.model import lora_modules, set_fused_attention, unwrap


class DenseBlockPosterior:
    """Zero-mean Gaussian posterior with a dense covariance per transformer block.

    Parameter order within a block: :func:`lib.model.lora_modules` order, ``vec(A)`` then
    ``vec(B)`` (row-major) of each module.
    """

    def __init__(self, model: torch.nn.Module, covs: dict[int, torch.Tensor]):
        self.mods = {b: [m for m in lora_modules(model) if m.block == b] for b in covs}
        self.covs = covs
        self.blocks = sorted(covs)
        self.prior_precision = torch.ones(len(self.blocks))

    def sample_block(self, block, n_samples, generator):
        chol = torch.linalg.cholesky(self.covs[block].double())
        eps = torch.randn(n_samples, chol.shape[0], generator=generator, dtype=torch.float64)
        flat = (eps @ chol.T).float()
        out, i = {}, 0
        for m in self.mods[block]:
            a, b = m.A.weight, m.B.weight
            dA = flat[:, i : i + a.numel()].reshape(n_samples, *a.shape)
            i += a.numel()
            dB = flat[:, i : i + b.numel()].reshape(n_samples, *b.shape)
            i += b.numel()
            out[m.name] = (dA, dB)
        return out

    def dense_covariance(self, blocks=None):
        return torch.block_diag(*(self.covs[b] for b in (self.blocks if blocks is None else blocks)))

    def restrict(self, blocks):
        post = DenseBlockPosterior.__new__(DenseBlockPosterior)
        post.mods = {b: self.mods[b] for b in blocks}
        post.covs = {b: self.covs[b] for b in blocks}
        post.blocks = sorted(blocks)
        post.prior_precision = torch.ones(len(post.blocks))
        return post


def block_param_names(model, block):
    """Full parameter names of block ``block``'s LoRA factors in DenseBlockPosterior order."""
    ids = {id(p): n for n, p in model.named_parameters()}
    return [ids[id(w)] for m in lora_modules(model) if m.block == block for w in (m.A.weight, m.B.weight)]


def jacobian(model, x, blocks):
    """Explicit Jacobian (N, C, P) of the logits w.r.t. the flattened LoRA factors of ``blocks``."""
    params = dict(model.named_parameters())
    names = [n for b in blocks for n in block_param_names(model, b)]
    primal = {n: params[n].detach() for n in names}
    set_fused_attention(model, False)  # the SDPA backward has no vmap batching rule (slow fallback)
    jac = jacrev(lambda p: functional_call(model, p, (x,)))(primal)
    set_fused_attention(model, True)
    return torch.cat([jac[n].flatten(2) for n in names], dim=2)


def random_spd(p, gen, scale):
    m = torch.randn(p, p, generator=gen) / math.sqrt(p)
    return scale * (m @ m.T + 0.1 * torch.eye(p))


def block_sizes(model):
    """Number of LoRA parameters per block."""
    sizes = {}
    for m in lora_modules(model):
        sizes[m.block] = sizes.get(m.block, 0) + m.A.weight.numel() + m.B.weight.numel()
    return sizes


@pytest.fixture
def posterior(tiny_lora_vit):
    gen = torch.Generator().manual_seed(7)
    return DenseBlockPosterior(tiny_lora_vit, {b: random_spd(p, gen, 0.05) for b, p in block_sizes(tiny_lora_vit).items()})


def batches_of(x, y, size):
    return [(x[i : i + size], y[i : i + size]) for i in range(0, len(x), size)]


@pytest.mark.parametrize("batching", ["shared", "folded"])
def test_bank_equals_explicit_jacobian_times_samples(tiny_lora_vit, tiny_batch, posterior, batching):
    x, y = tiny_batch
    K = 3
    bank = perturbation_bank(
        tiny_lora_vit, posterior, batches_of(x, y, 4), n_samples=K, seed=11, device="cpu",
        k_chunk=2, tangent_batching=batching,
    )
    assert bank.delta.shape == (3, 6, K, 4) and bank.delta.dtype == torch.float32
    assert torch.equal(bank.labels, y)
    with torch.no_grad():
        assert torch.allclose(bank.map_logits, tiny_lora_vit(x), atol=1e-5)
    for i, b in enumerate(bank.blocks):
        J = jacobian(tiny_lora_vit, x, [b])
        samples = block_samples(posterior, b, K, seed=11)
        flat = torch.cat([torch.cat([dA.flatten(1), dB.flatten(1)], 1) for dA, dB in samples.values()], 1)
        expected = torch.einsum("ncp,kp->nkc", J, flat)
        assert expected.abs().max() > 1e-2  # a non-trivial perturbation
        assert torch.allclose(bank.delta[i], expected, atol=1e-5, rtol=1e-4)


def test_mc_logit_covariance_converges_to_J_sigma_Jt(tiny_lora_vit, tiny_batch, posterior):
    x, y = tiny_batch
    K = 1000
    bank = perturbation_bank(tiny_lora_vit, posterior, [(x, y)], n_samples=K, seed=3, device="cpu", k_chunk=500)
    for blocks in ([0, 1, 2], [0, 2]):
        J = jacobian(tiny_lora_vit, x, blocks)
        exact = J @ posterior.dense_covariance(blocks) @ J.transpose(1, 2)  # (N, C, C)
        per_block = sum(
            jacobian(tiny_lora_vit, x, [b]) @ posterior.covs[b] @ jacobian(tiny_lora_vit, x, [b]).transpose(1, 2)
            for b in blocks
        )
        assert torch.allclose(exact, per_block, atol=1e-6)  # Σ_S block-diagonal: covariances add
        mask = torch.tensor([b in blocks for b in bank.blocks])
        g = bank.delta[mask].sum(0)  # (N, K, C), zero-mean
        emp = torch.einsum("nkc,nkd->ncd", g, g) / K
        d = torch.diagonal(exact, dim1=1, dim2=2)
        se = torch.sqrt((d[:, :, None] * d[:, None, :] + exact.square()) / K)  # std of a Gaussian covariance entry
        assert exact.diagonal(dim1=1, dim2=2).min() > 1e-3
        assert ((emp - exact).abs() <= 5 * se).all()


@pytest.mark.parametrize("blocks,chunk", [(None, 10), ([0, 2], 3), ([1], 1)])
def test_reverse_mode_bank_equals_forward_mode(tiny_lora_vit, tiny_batch, posterior, blocks, chunk):
    """mode='reverse' (output gradients × sampled weights) gives the forward-mode JVP bank with the
    same samples, for any block set and class chunking; fused attention flags are restored."""
    x, y = tiny_batch
    kw = dict(n_samples=7, seed=4, device="cpu", blocks=blocks)
    fused = [m.fused_attn for m in unwrap(tiny_lora_vit).modules() if hasattr(m, "fused_attn")]
    grad_flags = [p.requires_grad for p in tiny_lora_vit.parameters()]
    fwd = perturbation_bank(tiny_lora_vit, posterior, batches_of(x, y, 4), mode="forward", **kw)
    rev = perturbation_bank(tiny_lora_vit, posterior, batches_of(x, y, 4), mode="reverse", class_chunk=chunk, **kw)
    assert rev.blocks == fwd.blocks and torch.equal(rev.labels, fwd.labels)
    assert torch.allclose(rev.map_logits, fwd.map_logits, atol=1e-5)
    assert fwd.delta.abs().max() > 1e-2
    assert torch.allclose(rev.delta, fwd.delta, atol=1e-5, rtol=1e-4)
    assert [m.fused_attn for m in unwrap(tiny_lora_vit).modules() if hasattr(m, "fused_attn")] == fused
    assert [p.requires_grad for p in tiny_lora_vit.parameters()] == grad_flags


def test_auto_mode_picks_reverse_only_when_classes_do_not_exceed_the_sample_ratio(tiny_lora_vit, tiny_batch, posterior,
                                                                                   monkeypatch):
    import lib.laplace.predictive as P

    x, y = tiny_batch
    calls = []
    real = P._reverse_bank
    monkeypatch.setattr(P, "_reverse_bank", lambda *a, **k: calls.append(1) or real(*a, **k))
    monkeypatch.setattr(P, "REVERSE_CLASSES_PER_SAMPLE", 1)
    perturbation_bank(tiny_lora_vit, posterior, [(x, y)], n_samples=4, seed=0, device="cpu")  # C = 4 <= 1 * 4
    perturbation_bank(tiny_lora_vit, posterior, [(x, y)], n_samples=3, seed=0, device="cpu")  # C = 4 > 1 * 3
    assert calls == [1]


def test_auto_mode_rule_at_the_measured_ratio():
    """C = 100, K = 32 (ViT-B/16 on CIFAR-100, where reverse mode was measured faster) is reverse;
    C = 100 with K = 24 (C > 4K) stays forward; explicit modes are obeyed."""
    from lib.laplace.predictive import REVERSE_CLASSES_PER_SAMPLE, uses_reverse_mode

    head = torch.nn.Linear(2, 100)
    head.num_classes = 100
    assert REVERSE_CLASSES_PER_SAMPLE == 4
    assert uses_reverse_mode(head, 32, "auto") and uses_reverse_mode(head, 25, "auto")
    assert not uses_reverse_mode(head, 24, "auto")
    assert uses_reverse_mode(head, 1, "reverse") and not uses_reverse_mode(head, 1000, "forward")
    with pytest.raises(ValueError, match="mode must be"):
        uses_reverse_mode(head, 32, "fast")


def test_mc_averages_probabilities_not_logits_hand_case():
    delta = torch.tensor([[4.0, 0.0], [-4.0, 0.0]]).reshape(1, 1, 2, 2)
    bank = Bank(map_logits=torch.tensor([[1.0, 0.0]]), labels=torch.tensor([0]), delta=delta, blocks=(0,))
    sig = lambda z: 1 / (1 + math.exp(-z))  # noqa: E731
    prob_avg = 0.5 * (sig(5.0) + sig(-3.0))  # 0.5203
    logit_avg = sig(1.0)  # 0.7311: softmax of the mean logits
    p = subset_probs(bank, torch.tensor([True]), method="mc")
    assert torch.allclose(p, torch.tensor([[prob_avg, 1 - prob_avg]]), atol=1e-6)
    assert abs(p[0, 0].item() - logit_avg) > 0.2
    kappa = 1 / math.sqrt(1 + math.pi / 8 * 16.0)  # v = mean of squares = (16 + 16) / 2
    probit = subset_probs(bank, torch.tensor([True]), method="probit")
    assert torch.allclose(probit[0, 0], torch.tensor(sig(kappa)), atol=1e-6)
    assert torch.allclose(subset_probs(bank, 0), torch.tensor([[sig(1.0), 1 - sig(1.0)]]), atol=1e-6)


@pytest.mark.parametrize("method", ["mc", "probit"])
def test_sample_mixture_weights_the_bank_samples(method):
    """Uniform weights give subset_probs at κ; a one-hot weight row is the predictive of that single
    sample, by hand; resampled weights are the predictive of the resampled samples."""
    g = torch.Generator().manual_seed(3)
    bank = Bank(map_logits=torch.randn(7, 4, generator=g), labels=torch.randint(0, 4, (7,), generator=g),
                delta=torch.randn(3, 7, 5, 4, generator=g), blocks=(0, 2, 5))
    mask, kappa = torch.tensor([True, False, True]), 0.3
    mix = sample_mixture(bank, mask, method=method, scale=kappa)
    uniform = mix(torch.full((1, 5), 0.2))
    assert uniform.shape == (1, 7, 4)
    assert torch.allclose(uniform[0], subset_probs(bank, mask, method=method, scale=kappa), atol=1e-6)
    g2 = math.sqrt(kappa) * (bank.delta[0, :, 2] + bank.delta[2, :, 2])
    if method == "mc":
        by_hand = torch.softmax(bank.map_logits + g2, -1)
    else:
        by_hand = torch.softmax(bank.map_logits / torch.sqrt(1 + math.pi / 8 * g2.square()), -1)
    assert torch.allclose(mix(torch.eye(5)[2:3])[0], by_hand, atol=1e-6)
    picks = torch.tensor([0, 0, 3, 4, 4])
    resampled = Bank(bank.map_logits, bank.labels, bank.delta[:, :, picks], bank.blocks)
    counts = torch.bincount(picks, minlength=5).float()[None] / 5
    assert torch.allclose(mix(counts)[0], subset_probs(resampled, mask, method=method, scale=kappa), atol=1e-6)
    with pytest.raises(ValueError, match="weights must be"):
        mix(torch.ones(1, 4))


def test_mc_on_model_differs_from_logit_averaging(tiny_lora_vit, tiny_batch):
    x, y = tiny_batch
    post = DenseBlockPosterior(tiny_lora_vit, {b: 4.0 * torch.eye(n) for b, n in block_sizes(tiny_lora_vit).items()})
    bank = perturbation_bank(tiny_lora_vit, post, [(x, y)], n_samples=64, seed=0, device="cpu")
    g = bank.delta.sum(0)
    p = subset_probs(bank, 0b111)
    assert torch.allclose(p, torch.softmax(bank.map_logits[:, None] + g, -1).mean(1), atol=1e-6)
    logit_avg = torch.softmax(bank.map_logits + g.mean(1), -1)
    assert (p - logit_avg).abs().max() > 0.02


def test_subset_sums_and_restriction(tiny_lora_vit, tiny_batch, posterior):
    x, y = tiny_batch
    kw = dict(n_samples=5, seed=2, device="cpu")
    full = perturbation_bank(tiny_lora_vit, posterior, batches_of(x, y, 3), **kw)
    only1 = perturbation_bank(tiny_lora_vit, posterior, batches_of(x, y, 3), blocks=[1], **kw)
    restricted = perturbation_bank(tiny_lora_vit, posterior.restrict([1]), batches_of(x, y, 3), **kw)
    assert only1.blocks == restricted.blocks == (1,)
    assert torch.allclose(only1.delta[0], full.delta[1], atol=1e-6)
    assert torch.allclose(restricted.delta, only1.delta, atol=1e-6)
    for method in ("mc", "probit"):
        single = subset_probs(full, 0b010, method=method)
        assert torch.allclose(single, subset_probs(restricted, 0b1, method=method), atol=1e-6)
        masks = torch.tensor([[(s >> i) & 1 == 1 for i in range(3)] for s in range(8)])
        chunks = list(iter_subset_probs(full, masks, method=method, chunk=3))
        stacked = torch.cat([p for _, p in chunks])
        assert [c[1].shape[0] for c in chunks] == [3, 3, 2]
        for s in range(8):
            ref = subset_probs(full, masks[s], method=method)
            assert torch.allclose(stacked[s], ref, atol=1e-6)
            assert torch.allclose(subset_probs(full, s, method=method), ref, atol=1e-6)
        assert torch.allclose(stacked[0], torch.softmax(full.map_logits, -1), atol=1e-6)
        assert (stacked[7] - stacked[0]).abs().max() > 1e-3


def laplace_torch_posterior(model, x, y, prior_precision):
    """laplace-torch KronLaplace over the LoRA factors only, and its covariance as a DenseBlockPosterior."""
    from laplace import KronLaplace
    from laplace.curvature import CurvlinopsGGN

    lora_ids = {id(w) for m in lora_modules(model) for w in (m.A.weight, m.B.weight)}
    for p in model.parameters():
        p.requires_grad_(id(p) in lora_ids)
    la = KronLaplace(model, "classification", prior_precision=prior_precision, backend=CurvlinopsGGN)
    la.fit(DataLoader(TensorDataset(x, y), batch_size=3))
    cov = la.posterior_precision.to_matrix(exponent=-1)
    offsets, i = {}, 0
    for n, p in model.named_parameters():
        if p.requires_grad:
            offsets[n] = torch.arange(i, i + p.numel())
            i += p.numel()
    assert i == cov.shape[0]
    covs, order = {}, []
    for b in sorted({m.block for m in lora_modules(model)}):
        idx = torch.cat([offsets[n] for n in block_param_names(model, b)])
        covs[b] = cov[idx][:, idx]
        order.append(idx)
    perm = torch.cat(order)
    blockdiag = torch.block_diag(*covs.values())
    assert torch.allclose(cov[perm][:, perm], blockdiag, atol=1e-7)  # Kron: no cross-block covariance
    return la, DenseBlockPosterior(model, covs)


@pytest.mark.parametrize("source", ["laplace-torch covariance", "KronPosterior"])
def test_glm_predictive_matches_laplace_torch(tiny_lora_vit, tiny_batch, source):
    x, y = tiny_batch
    la, post = laplace_torch_posterior(tiny_lora_vit, x, y, prior_precision=0.5)
    if source == "KronPosterior":
        from lib.laplace import KronPosterior, fit_kron

        curv = fit_kron(tiny_lora_vit, batches_of(x, y, 3), device="cpu", kfac="expand", fisher="exact")
        post = KronPosterior(curv, prior_precision=0.5)
    K = 2000
    bank = perturbation_bank(tiny_lora_vit, post, [(x, y)], n_samples=K, seed=5, device="cpu", k_chunk=500)
    f_mu, f_var = la._glm_predictive_distribution(x)
    assert torch.allclose(bank.map_logits, f_mu, atol=1e-5)
    g = bank.delta.sum(0)
    v = g.square().mean(1)
    ref_v = torch.diagonal(f_var, dim1=1, dim2=2)
    assert ref_v.min() > 1e-2
    eps = 5 * math.sqrt(2 / K)  # relative std of a K-sample variance estimate is sqrt(2/K)
    assert ((v - ref_v).abs() <= eps * ref_v).all()

    # probit: tolerance = first-order change of p when every v_j moves by its 5-sigma MC error,
    # Σ_j |∂p_c/∂z_j| |∂z_j/∂v_j| eps v_j with z_j = f_j (1 + π v_j / 8)^(-1/2), plus 20 % slack
    ours = subset_probs(bank, 0b111, method="probit")
    theirs = la(x, pred_type="glm", link_approx="probit")
    a = math.pi / 8
    p = torch.softmax(f_mu / torch.sqrt(1 + a * ref_v), -1)
    dp_dz = p[:, :, None] * (torch.eye(p.shape[1]) - p[:, None, :])  # (N, c, j)
    dz_dv = -0.5 * a * f_mu * (1 + a * ref_v) ** -1.5
    tol = 1.2 * (dp_dz.abs() * (dz_dv.abs() * eps * ref_v)[:, None, :]).sum(-1)
    assert ((ours - theirs).abs() <= tol + 1e-6).all()
    assert (ours - torch.softmax(f_mu, -1)).abs().max() > 2 * tol.max()  # the check has power

    # MC: both are K-sample means of softmax samples; tolerance 5 standard errors of the difference
    M = 20000
    ours_mc = subset_probs(bank, 0b111, method="mc")
    theirs_mc = la(x, pred_type="glm", link_approx="mc", n_samples=M, generator=torch.Generator().manual_seed(0))
    sd = torch.softmax(bank.map_logits[:, None] + g, -1).std(1)
    assert ((ours_mc - theirs_mc).abs() <= 5 * sd * math.sqrt(1 / K + 1 / M)).all()
    assert (ours_mc - ours).abs().max() > 1e-3  # MC and probit are different approximations


def test_fused_attention_off_during_bank_and_restored(tiny_lora_vit, tiny_batch, posterior):
    x, y = tiny_batch
    attn = [m for m in unwrap(tiny_lora_vit).modules() if hasattr(m, "fused_attn")]
    seen = []
    hooks = [m.register_forward_pre_hook(lambda m, a: seen.append(m.fused_attn)) for m in attn]
    set_fused_attention(tiny_lora_vit, True)
    perturbation_bank(tiny_lora_vit, posterior, [(x, y)], n_samples=2, seed=0, device="cpu")
    assert seen and not any(seen)
    assert all(m.fused_attn for m in attn)

    def failing():
        yield x, y
        raise RuntimeError("data error")

    with pytest.raises(RuntimeError, match="data error"):
        perturbation_bank(tiny_lora_vit, posterior, failing(), n_samples=2, seed=0, device="cpu")
    assert all(m.fused_attn for m in attn)
    for h in hooks:
        h.remove()


def test_bad_inputs_raise(tiny_lora_vit, tiny_batch, posterior):
    x, y = tiny_batch
    kw = dict(n_samples=2, seed=0, device="cpu")
    with pytest.raises(ValueError, match="blocks"):
        perturbation_bank(tiny_lora_vit, posterior, [(x, y)], blocks=[5], **kw)
    with pytest.raises(ValueError, match="bfloat16"):
        perturbation_bank(tiny_lora_vit, posterior, [(x, y)], dtype=torch.float16, **kw)
    with pytest.raises(ValueError, match="empty"):
        perturbation_bank(tiny_lora_vit, posterior, [], **kw)
    bank = perturbation_bank(tiny_lora_vit, posterior, [(x, y)], **kw)
    with pytest.raises(ValueError, match="subset"):
        subset_probs(bank, torch.tensor([True, False]))
    with pytest.raises(ValueError, match="bitmask"):
        subset_probs(bank, 8)
    with pytest.raises(ValueError, match="method"):
        subset_probs(bank, 1, method="mean")
    with pytest.raises(ValueError, match="subsets"):
        next(iter_subset_probs(bank, torch.ones(2, 4, dtype=torch.bool)))


def test_standard_subsets():
    s = standard_subsets(4)
    assert len(s) == 2 + 4 + 4 + 4 + 4
    assert s["single 2"].tolist() == [False, False, True, False]
    assert s["all but 1"].tolist() == [True, False, True, True]
    assert s["first 2"].tolist() == [True, True, False, False]
    assert s["last 1"].tolist() == [False, False, False, True]
    assert torch.equal(s["first 4"], s["all"]) and not s["none"].any()
    with pytest.raises(ValueError, match="L"):
        standard_subsets(0)
