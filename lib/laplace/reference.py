"""Agreement of :mod:`lib.laplace` with laplace-torch 0.3 on a tiny LoRA ViT, as a table.

:func:`agreement_table` is the validation the book shows (chapter 3): it builds a tiny seeded
LoRA ViT, fits our Laplace approximation over the LoRA weights (K-FAC and diagonal GGN,
:mod:`lib.laplace.curvature`; posterior, :mod:`lib.laplace.posterior`; GLM predictive,
:mod:`lib.laplace.predictive`) and laplace-torch's (daxberger2021laplace) with the same data, the
same curvature (curvlinops' exact type-2 GGN) and the same per-block prior precision, and reports
one row per quantity with the largest deviation and the bound that the unit tests
(``tests/test_curvature.py``, ``test_posterior.py``, ``test_predictive.py``) assert for it
(the dense K-FAC covariance instead gets a conditioning-aware float32 bound, see
:func:`agreement_table`).
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from typing import Iterator

import pandas as pd
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

from lib.config import LoraConfig, ModelConfig
from lib.laplace.curvature import fit_diag, fit_kron
from lib.laplace.posterior import DiagPosterior, KronPosterior, LaplacePosterior
from lib.laplace.predictive import perturbation_bank, subset_probs
from lib.model import add_lora, build_backbone, lora_modules, set_fused_attention

TINY_VIT = ModelConfig(
    name="vit_tiny_patch16_224",
    kwargs=dict(img_size=16, patch_size=4, embed_dim=32, depth=3, num_heads=2),
)
"""The tiny ViT of the tests: 16 px images, 4 px patches (17 tokens), width 32, 3 blocks."""

NUM_CLASSES = 4
LORA_RANK = 2
N_TRAIN = 6
N_TEST = 4
BATCH_SIZE = 3
PRIOR_PRECISION = (0.5, 2.0, 7.0)
"""One prior precision per transformer block, the same for both libraries (not tuned)."""
BANK_SAMPLES = 2048
"""Default parameter samples K of our perturbation bank (probit variance and MC predictive)."""
REFERENCE_MC_SAMPLES = 200_000
"""Logit samples M of laplace-torch's MC predictive (its MC error is then ≪ ours)."""
N_SIGMA = 5.0
"""Monte-Carlo bounds are this many standard errors."""

# Bounds asserted by the unit tests, relative to the reference's largest |entry|.
RTOL_CURVATURE = 1e-4  # test_curvature: fp32 accumulation in different orders
RTOL_PRECISION = 1e-5  # test_posterior
RTOL_COVARIANCE = 2e-4  # test_posterior, diagonal covariance (the K-FAC one: see _kron_covariance_bound)
FP32_EPS = 2.0**-24  # unit roundoff of float32
RTOL_EVIDENCE = 1e-5  # test_posterior

COLUMNS = ["check", "max_abs_diff", "max_rel_diff", "tolerance", "ok", "note"]


def agreement_table(
    *, seed: int = 0, device: str | torch.device = "cpu", n_samples: int = BANK_SAMPLES, perturb_prior: float = 1.0
) -> pd.DataFrame:
    """Our K-FAC / diagonal Laplace over LoRA weights against laplace-torch 0.3, one row per check.

    Setup (all seeded from ``seed``, no global RNG): a timm ``vit_tiny_patch16_224`` shrunk to
    16 px images, 4 px patches, width 32, depth 3, 2 heads, 4 classes, with peft LoRA (r = 2) on
    ``qkv``, ``proj``, ``fc1``, ``fc2`` of every block and every LoRA ``B`` set to ``0.05·N(0, 1)``
    (from ``seed + 1``); 6 training images (6, 3, 16, 16) with labels (6,) in batches of 3, then
    4 test images, from ``seed + 123`` (``seed = 0``: the ``tiny_lora_vit`` and ``tiny_batch`` test
    fixtures).
    Prior precision ``δ_ℓ`` = :data:`PRIOR_PRECISION` per block; laplace-torch gets the same
    value for every LoRA tensor of block ``ℓ`` and ``Laplace(model, 'classification',
    subset_of_weights='all', hessian_structure='kron' | 'diag', backend=CurvlinopsGGN)`` with
    only the LoRA weights requiring gradients.

    Rows (``check``): the K-FAC factors ``G``, ``X`` of every LoRA weight (``kfac='expand'``,
    laplace-torch's default, and ``'reduce'`` through ``asdl_fisher_kwargs``), the diagonal GGN,
    and per structure the dense posterior precision ``GGN + δ I`` and covariance (P × P,
    P = 3072), the Laplace log marginal likelihood
    ``log p(D|θ*) − ½ Σ_ℓ [δ_ℓ‖θ*_ℓ‖² − P_ℓ log δ_ℓ + log det(GGN_ℓ + δ_ℓ I)]``, the GLM logit
    variance ``diag(J Σ Jᵀ)`` and the GLM predictive (immer2021improving) with the probit link
    ``softmax(f / √(1 + π/8 · v))`` and with Monte-Carlo integration ``E[softmax(f + J δθ)]``.
    Ours is our library path: :func:`~lib.laplace.predictive.perturbation_bank` with
    K = ``n_samples`` samples per block and :func:`~lib.laplace.predictive.subset_probs`
    over all blocks, whose probit ``v`` is a K-sample estimate of ``diag(J Σ Jᵀ)``; hence those
    rows have Monte-Carlo bounds (see ``note``).

    Columns: ``max_abs_diff`` ``max |ours − ref|``; ``max_rel_diff`` that divided by
    ``max |ref|`` (for the factors the worst weight, each relative to its own factor);
    ``tolerance`` the unit tests' bound on ``max_rel_diff`` (for Monte-Carlo rows the largest
    entrywise bound, divided by ``max |ref|``); ``ok`` whether every entry is within its bound;
    ``note`` the reference and the bound. The dense K-FAC covariance is compared with the
    forward-error bound of a float32 inverse, ``10 κ u`` (``κ`` the condition number of the
    posterior precision, ``u = 2⁻²⁴``): laplace-torch inverts in float32 and ``κ ≈ 2·10⁴`` here,
    so a fixed bound would measure laplace-torch's roundoff, not ours.

    ``perturb_prior`` multiplies *our* prior precision only (laplace-torch keeps
    :data:`PRIOR_PRECISION`): a negative control, any value ≠ 1 must make the prior-dependent rows
    fail. ``device``: where both libraries fit and predict (the comparison runs in float64 on CPU).
    Global state is left as found: the torch RNGs (forked; everything random uses explicit
    generators), the intra-op thread count (one thread while it runs).
    """
    if n_samples < 2:
        raise ValueError(f"n_samples is {n_samples}; use at least 2 bank samples (MC standard errors)")
    if not perturb_prior > 0:
        raise ValueError(f"perturb_prior is {perturb_prior}; use a positive factor (1.0: no perturbation)")
    device = torch.device(device)
    rng_devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=rng_devices), _one_thread():
        model = _tiny_lora_vit(seed, device)
        set_fused_attention(model, False)  # same maths; both libraries' Jacobians are slow through SDPA
        gen = torch.Generator().manual_seed(seed + 123)
        x = torch.randn(N_TRAIN, 3, 16, 16, generator=gen)
        y = torch.randint(0, NUM_CLASSES, (N_TRAIN,), generator=gen)
        x_test = torch.randn(N_TEST, 3, 16, 16, generator=gen).to(device)
        train = [(x[i : i + BATCH_SIZE], y[i : i + BATCH_SIZE]) for i in range(0, N_TRAIN, BATCH_SIZE)]
        ours_prior = torch.tensor(PRIOR_PRECISION) * perturb_prior
        rows = []
        for kfac in ("expand", "reduce"):
            curv = fit_kron(model, train, device=device, kfac=kfac)
            la = _fit_laplace_torch(model, train, "kron", device, asdl_fisher_kwargs={"kfac_approx": kfac})
            rows.append(_factor_row(model, curv, la, kfac))
            if kfac == "expand":
                post = KronPosterior(curv, prior_precision=ours_prior)
                rows += _posterior_rows(model, post, la, "kron", seed, x_test, device, n_samples)
        curv = fit_diag(model, train, device=device)
        la = _fit_laplace_torch(model, train, "diag", device)
        rows.append(_diag_row(model, curv, la))
        post = DiagPosterior(curv, prior_precision=ours_prior)
        rows += _posterior_rows(model, post, la, "diag", seed, x_test, device, n_samples)
    return pd.DataFrame(rows, columns=COLUMNS)


def _tiny_lora_vit(seed: int, device: torch.device) -> nn.Module:
    backbone = build_backbone(TINY_VIT, NUM_CLASSES, seed=seed, device=device)
    model = add_lora(backbone, LoraConfig(r=LORA_RANK), seed=seed)
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for m in lora_modules(model):
            m.B.weight.copy_(0.05 * torch.randn(m.B.weight.shape, generator=gen))
    return model.eval()


@contextmanager
def _one_thread() -> Iterator[None]:
    """One intra-op CPU thread for the duration (the tensors are tiny: on a busy 2-core machine a
    thread pool made the table 6× slower); restores the previous setting."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@contextmanager
def _only_lora_trainable(model: nn.Module) -> Iterator[list[nn.Parameter]]:
    """Only the LoRA weights require gradients (laplace-torch's parameter set); restores all flags."""
    lora = {id(lin.weight) for m in lora_modules(model) for lin in (m.A, m.B)}
    params = list(model.parameters())
    flags = [p.requires_grad for p in params]
    try:
        for p in params:
            p.requires_grad_(id(p) in lora)
        yield [p for p in params if p.requires_grad]
    finally:
        for p, f in zip(params, flags):
            p.requires_grad_(f)


def _fit_laplace_torch(model: nn.Module, train: list, structure: str, device: torch.device, **kw):
    from laplace import Laplace
    from laplace.curvature import CurvlinopsGGN

    block_of = {id(lin.weight): m.block for m in lora_modules(model) for lin in (m.A, m.B)}
    with _only_lora_trainable(model) as params:
        prior = torch.tensor([PRIOR_PRECISION[block_of[id(p)]] for p in params], device=device)
        la = Laplace(model, "classification", subset_of_weights="all", hessian_structure=structure,
                     backend=CurvlinopsGGN, prior_precision=prior, **kw)
        x, y = (torch.cat(t).to(device) for t in zip(*train))
        # an explicit generator: a DataLoader iterator otherwise draws its base seed from the global RNG
        loader = DataLoader(TensorDataset(x, y), batch_size=BATCH_SIZE, generator=torch.Generator().manual_seed(0))
        la.fit(loader)
    return la


def _permutation(model: nn.Module, params: list[Tensor]) -> Tensor:
    """Indices into laplace-torch's flat parameter vector (model order) in lib.laplace's order."""
    offset, o = {}, 0
    for p in params:
        offset[id(p)] = o
        o += p.numel()
    return torch.cat([torch.arange(offset[id(lin.weight)], offset[id(lin.weight)] + lin.weight.numel())
                      for m in lora_modules(model) for lin in (m.A, m.B)])


def _row(check: str, ours: Tensor, ref: Tensor, bound: float | Tensor, note: str) -> dict:
    """One row; ``bound``: a tolerance relative to ``max |ref|`` or entrywise absolute bounds."""
    ours, ref = ours.detach().double().cpu(), ref.detach().double().cpu()
    diff = (ours - ref).abs()
    scale = float(ref.abs().max())
    if isinstance(bound, float):
        tolerance, ok = bound, float(diff.max()) <= bound * scale
    else:
        bound = bound.detach().double().cpu()
        tolerance, ok = float(bound.max()) / scale, bool((diff <= bound).all())
    return {
        "check": check,
        "max_abs_diff": float(diff.max()),
        "max_rel_diff": float(diff.max()) / scale,
        "tolerance": tolerance,
        "ok": ok,
        "note": note,
    }


def factor_deviation(model: nn.Module, curv, la) -> tuple[float, float, bool]:
    """Worst deviation of our K-FAC factors ``curv`` from laplace-torch's ``la.H_facs`` on ``model``.

    Every LoRA weight's ``G`` and ``X`` is compared entrywise; returns the largest
    ``max |ours − ref|``, the largest of those relative to the factor's own ``max |ref|``, and
    whether every factor is within :data:`RTOL_CURVATURE` of its reference.
    """
    pos = {id(p): i for i, p in enumerate(la.params)}
    worst_abs, worst_rel, ok = 0.0, 0.0, True
    for m in lora_modules(model):
        for lin, ours in zip((m.A, m.B), curv.factors[m.name]):
            G, X = la.H_facs.kfacs[pos[id(lin.weight)]]
            for a, b in ((ours.G, G), (ours.X, X)):
                r = _row("", a, b, RTOL_CURVATURE, "")
                worst_abs, worst_rel = max(worst_abs, r["max_abs_diff"]), max(worst_rel, r["max_rel_diff"])
                ok &= r["ok"]
    return worst_abs, worst_rel, ok


def _factor_row(model: nn.Module, curv, la, kfac: str) -> dict:
    worst_abs, worst_rel, ok = factor_deviation(model, curv, la)
    how = "laplace-torch's default" if kfac == "expand" else "asdl_fisher_kwargs={'kfac_approx': 'reduce'}"
    return {
        "check": f"K-FAC factors ({kfac})", "max_abs_diff": worst_abs, "max_rel_diff": worst_rel,
        "tolerance": RTOL_CURVATURE, "ok": ok,
        "note": f"G and X of all 24 LoRA weights vs la.H_facs ({how}); worst weight, relative to its own factor",
    }


def _diag_row(model: nn.Module, curv, la) -> dict:
    ours = torch.cat([d.reshape(-1) for n in curv.names for d in curv.diag[n]])
    ref = la.H[_permutation(model, la.params)]
    return _row("diag GGN", ours, ref, RTOL_CURVATURE, "vs la.H (exact diagonal of the GGN, torch.func Jacobians)")


def _kron_covariance_bound(la) -> tuple[float, float]:
    """``(10 κ u, κ)``: ``κ`` the condition number of laplace-torch's K-FAC posterior precision.

    The precision is block-diagonal with blocks ``G ⊗ X + δ I``, whose eigenvalues are
    ``λ_G λ_X + δ``. To first order ``‖ΔΣ‖/‖Σ‖ ≤ κ ‖ΔP‖/‖P‖``: a precision known to float32
    roundoff (``‖ΔP‖/‖P‖`` of order ``10 u``, the precision row) gives a covariance known to about
    ``10 κ u``, the bound used (a heuristic constant: the worst case aligns the error with the
    smallest eigenvalue, which roundoff does not).
    """
    lo, hi = math.inf, 0.0
    for (G, X), delta in zip(la.H_facs.kfacs, la.prior_precision):
        lg, lx = torch.linalg.eigvalsh(G.double()).clamp_min(0), torch.linalg.eigvalsh(X.double()).clamp_min(0)
        hi = max(hi, float(lg.max() * lx.max() + delta))
        lo = min(lo, float(lg.min() * lx.min() + delta))
    kappa = hi / lo
    return 10 * kappa * FP32_EPS, kappa


def _posterior_rows(model: nn.Module, post: LaplacePosterior, la, structure: str, seed: int,
                    x_test: Tensor, device: torch.device, n_samples: int) -> list[dict]:
    perm = _permutation(model, la.params)
    if structure == "kron":
        prec = la.posterior_precision.to_matrix()[perm][:, perm]
        cov = la.posterior_precision.to_matrix(exponent=-1)[perm][:, perm]
        ours_prec, ours_cov = post.dense_precision(), post.dense_covariance()
    else:
        prec, cov = la.posterior_precision[perm], la.posterior_variance[perm]
        ours_prec, ours_cov = post.dense_precision().diagonal(), post.dense_covariance().diagonal()
    lml_ours, lml_ref = post.log_marginal_likelihood(), la.log_marginal_likelihood()
    if structure == "kron":
        cov_bound, kappa = _kron_covariance_bound(la)
        cov_note = (f"dense Σ (P × P); bound 10·κ·u_fp32 with κ = {kappa:.3g} (laplace-torch inverts in fp32; "
                    f"the unit test's fixed {RTOL_COVARIANCE:g} is below its roundoff here)")
    else:
        cov_bound, cov_note = RTOL_COVARIANCE, "posterior variances 1/(GGN + δ)"
    rows = [
        _row(f"posterior precision ({structure})", ours_prec, prec, RTOL_PRECISION,
             "dense GGN + δ I (P × P)" if structure == "kron" else "diagonal GGN + δ"),
        _row(f"posterior covariance ({structure})", ours_cov, cov, cov_bound, cov_note),
        _row(f"log marginal likelihood ({structure})", lml_ours.reshape(1), lml_ref.reshape(1), RTOL_EVIDENCE,
             "la.log_marginal_likelihood() at the same δ"),
    ]
    return rows + _predictive_rows(model, post, la, structure, seed, x_test, device, n_samples)


def _predictive_rows(model: nn.Module, post: LaplacePosterior, la, structure: str, seed: int,
                     x_test: Tensor, device: torch.device, n_samples: int) -> list[dict]:
    K, M = n_samples, REFERENCE_MC_SAMPLES
    labels = torch.zeros(len(x_test), dtype=torch.long)
    bank = perturbation_bank(model, post, [(x_test, labels)], n_samples=K, seed=seed, device=device)
    with _only_lora_trainable(model):
        f_mu, f_var = la._glm_predictive_distribution(x_test)
        probit_ref = la(x_test, pred_type="glm", link_approx="probit")
        # la(x, link_approx='mc', generator=g) drops the generator in 0.3 (global RNG); this is its MC path with it
        gen = torch.Generator(device=device).manual_seed(seed + 2)
        mc_ref = la._glm_predictive_samples(f_mu, f_var, n_samples=M, generator=gen).mean(0)
    f_mu, f_var, probit_ref, mc_ref = (t.detach().double().cpu() for t in (f_mu, f_var, probit_ref, mc_ref))
    g = bank.delta.sum(0).double()  # (N, K, C) logit perturbations over all blocks
    v_ref = f_var.diagonal(dim1=1, dim2=2)
    eps = N_SIGMA * math.sqrt(2 / K)  # relative sd of a K-sample variance estimate is √(2/K)

    a = math.pi / 8
    p = torch.softmax(f_mu / torch.sqrt(1 + a * v_ref), -1)
    dp_dz = p[:, :, None] * (torch.eye(p.shape[1], dtype=p.dtype) - p[:, None, :])
    dz_dv = -0.5 * a * f_mu * (1 + a * v_ref) ** -1.5
    probit_bound = 1.2 * (dp_dz.abs() * (dz_dv.abs() * eps * v_ref)[:, None, :]).sum(-1) + 1e-6

    mc_sd = torch.softmax(bank.map_logits.double()[:, None] + g, -1).std(1)
    mc_bound = N_SIGMA * mc_sd * math.sqrt(1 / K + 1 / M) + 1e-6
    return [
        _row(f"GLM logit variance ({structure})", g.square().mean(1), v_ref, eps * v_ref,
             f"our K={K}-sample estimate of diag(J Σ Jᵀ) vs la's exact f_var; "
             f"bound {N_SIGMA:g}·√(2/K) relative per entry"),
        _row(f"GLM predictive, probit ({structure})", subset_probs(bank, 2**bank.n_blocks - 1, method="probit"),
             probit_ref, probit_bound,
             f"vs la(x, 'glm', link_approx='probit'); ours uses the K={K} variance estimate: "
             f"bound = 1.2 × first-order change of p for a {N_SIGMA:g}σ error of every v"),
        _row(f"GLM predictive, MC ({structure})", subset_probs(bank, 2**bank.n_blocks - 1, method="mc"),
             mc_ref, mc_bound,
             f"ours K={K} parameter samples vs laplace-torch's MC with M={M} logit samples from N(f_mu, f_var); "
             f"bound {N_SIGMA:g} sd·√(1/K + 1/M) per entry"),
    ]
