"""lib.baselines.last_layer: laplace-torch's last-layer Laplace on a tiny peft LoRA ViT, against a
closed form computed by hand (features, GGN, covariance, GLM probit predictive)."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import TINY_VIT, make_lora_vit

from lib.baselines.last_layer import fit_last_layer, head_name, last_layer_probs
from lib.config import LastLayerConfig
from lib.data import Preprocess, Split
from lib.model import build_backbone, data_config, unwrap

ATOL_PROBS = 1e-5  # float32 predictive of laplace-torch vs our float64 closed form; observed ≤ 3e-7
RTOL_PRECISION = 1e-4  # float32 GGN accumulation vs float64; relative to the largest entry


def _split(n: int, seed: int) -> Split:
    gen = torch.Generator().manual_seed(seed)
    return Split(torch.randint(0, 256, (n, 3, 16, 16), generator=gen, dtype=torch.uint8),
                 torch.randint(0, 4, (n,), generator=gen))


@pytest.fixture(scope="module")
def setup():
    model = make_lora_vit(TINY_VIT, num_classes=4, r=2)
    pre = Preprocess.from_data_config(data_config(model))
    return model, pre, _split(10, 1), _split(5, 2)


def _features(model, pre, split):
    vit = unwrap(model)
    with torch.no_grad():
        return vit.forward_head(vit.forward_features(pre(split.x)), pre_logits=True).double()


def _jacobian(phi: torch.Tensor, n_classes: int) -> torch.Tensor:
    """J_n = [I_C ⊗ φ_nᵀ, I_C] (N, C, C·D + C), the head's parameters as vec(W) row-major then b."""
    eye = torch.eye(n_classes, dtype=phi.dtype)
    Jw = torch.einsum("ij,nd->nijd", eye, phi).reshape(len(phi), n_classes, -1)
    return torch.cat([Jw, eye.expand(len(phi), -1, -1)], dim=2)


def test_head_name_is_what_laplace_torch_finds(setup):
    """Our explicit last_layer_name equals laplace-torch's automatic search on the peft model."""
    from laplace import Laplace

    model, pre, train, _ = setup
    assert head_name(model) == "base_model.model.head.modules_to_save.default"
    la = Laplace(model, "classification", subset_of_weights="last_layer", hessian_structure="full")
    la.fit(torch.utils.data.DataLoader(torch.utils.data.TensorDataset(pre(train.x), train.y), batch_size=4))
    assert la.model._last_layer_name == head_name(model)
    assert head_name(build_backbone(TINY_VIT, 4, seed=0, device="cpu")) == "head"


def test_full_matches_closed_form(setup):
    """'full': posterior precision = Σ_n J_nᵀ Λ_n J_n + δ I by hand, and the predictive equals
    softmax(f / √(1 + π/8 diag(J Σ Jᵀ))) with Σ = la.posterior_covariance and f = W φ + b."""
    model, pre, train, test = setup
    cfg = LastLayerConfig(structure="full", batch_size=4, marglik_steps=50)
    la = fit_last_layer(model, train, cfg, preprocess=pre, device="cpu", prior_init=1.0)
    delta = float(la.prior_precision)
    assert delta > 0 and delta != 1.0  # the marginal likelihood moved it

    head = unwrap(model).get_classifier().modules_to_save["default"]
    phi_tr = _features(model, pre, train)
    J = _jacobian(phi_tr, 4)
    p = (phi_tr @ head.weight.double().T + head.bias.double()).softmax(-1)
    lam = torch.diag_embed(p) - p[:, :, None] * p[:, None, :]
    precision = torch.einsum("nca,ncd,ndb->ab", J, lam, J) + delta * torch.eye(J.shape[2], dtype=torch.float64)
    ref_prec = la.posterior_precision.double()
    assert (precision - ref_prec).abs().max() <= RTOL_PRECISION * ref_prec.abs().max()

    phi = _features(model, pre, test)
    f = phi @ head.weight.double().T + head.bias.double()
    with torch.no_grad():
        assert torch.allclose(f.float(), model(pre(test.x)), atol=1e-5)
    Jt = _jacobian(phi, 4)
    var = torch.einsum("ncp,pq,ncq->nc", Jt, la.posterior_covariance.double(), Jt)
    ref = (f / torch.sqrt(1 + math.pi / 8 * var)).softmax(-1)

    ours = last_layer_probs(la, test, preprocess=pre, device="cpu", batch_size=2)
    assert ours.shape == (5, 4)
    assert torch.allclose(ours.double(), ref, atol=ATOL_PROBS)
    assert torch.allclose(ours.sum(-1), torch.ones(5), atol=1e-6)
    assert (ours.double() - f.softmax(-1)).abs().max() > 1e-3  # the variance matters: the check can fail


@pytest.mark.parametrize("structure", ["full", "kron"])
def test_marglik_prior_is_a_maximum(setup, structure):
    """The tuned δ has a higher Laplace evidence than δ·e^{±1} and than its start."""
    model, pre, train, _ = setup
    cfg = LastLayerConfig(structure=structure, batch_size=4)
    la = fit_last_layer(model, train, cfg, preprocess=pre, device="cpu", prior_init=0.01)
    delta = la.prior_precision.detach().clone()
    with torch.no_grad():
        best = float(la.log_marginal_likelihood(prior_precision=delta))
        for other in (delta * math.e, delta / math.e, torch.tensor([0.01])):
            assert best >= float(la.log_marginal_likelihood(prior_precision=other))


def test_kron_predictive_is_laplace_torchs_own(setup):
    """The batched wrapper returns la(x, 'glm', 'probit') of the whole test set; rows sum to 1."""
    model, pre, train, test = setup
    la = fit_last_layer(model, train, LastLayerConfig(structure="kron", batch_size=4),
                        preprocess=pre, device="cpu", prior_init=1.0)
    assert la.prior_precision.shape == (1,)
    ours = last_layer_probs(la, test, preprocess=pre, device="cpu", batch_size=3)
    with torch.no_grad():
        ref = la(pre(test.x), pred_type="glm", link_approx="probit")
        map_probs = model(pre(test.x)).softmax(-1)
    assert torch.allclose(ours, ref, atol=1e-6)
    assert torch.allclose(ours.sum(-1), torch.ones(5), atol=1e-6)
    assert (ours - map_probs).abs().max() > 1e-4
