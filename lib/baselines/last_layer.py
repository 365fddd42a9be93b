"""Last-layer Laplace with laplace-torch itself: the baseline users know (daxberger2021laplace).

Only the classifier head ``f(x) = W φ(x) + b`` (W: C × D, b: C; φ the LoRA-adapted ViT's
pooled, normed features) is Bayesian; the LoRA weights and the backbone stay at the MAP. With
the exact GGN of the softmax likelihood and a Gaussian prior of precision δ,

    Σ = (Σ_n J_nᵀ Λ_n J_n + δ I)⁻¹,   J_n = [I_C ⊗ φ_nᵀ, I_C]  (C × P, P = C·D + C),
    Λ_n = diag(p_n) − p_n p_nᵀ,

kept ``'full'`` (P × P) or ``'kron'`` (K-FAC, martens2015optimizing), δ tuned by maximising
laplace-torch's Laplace log marginal likelihood (``optimize_prior_precision(method='marglik')``,
Adam on log δ), and the predictive is the linearised (GLM) one with the probit approximation
(immer2021improving)

    p(y | x) ≈ softmax(f(x) / √(1 + π/8 · diag(J Σ Jᵀ))).

Laplace-LoRA (yang2024bayesian) reports this baseline beside its full-LoRA Laplace.

How laplace-torch finds the head of a peft-wrapped timm ViT: ``Laplace(...,
subset_of_weights='last_layer')`` wraps a deep copy of the model in its ``FeatureExtractor``,
which needs the name of the last ``nn.Linear`` executed. peft's ``modules_to_save=['head']``
turns ``head`` into a ``ModulesToSaveWrapper`` holding the frozen original and the trained copy;
the one executed is ``base_model.model.head.modules_to_save.<adapter>`` (what laplace-torch's
own automatic search also finds). :func:`head_name` gives that name and it is passed as
``last_layer_name``, so nothing depends on the search. The model's ``requires_grad`` flags are
irrelevant to the last-layer mode (it differentiates the head only, in closed form).
"""

from __future__ import annotations

import dataclasses
import json
import time
import warnings
from typing import Any, Iterator

import torch
from torch import nn

from lib.artifacts import cached
from lib.baselines.result import (BaselineResult, Row, baselines_config, forward_ms, load, ms_per_image, save,
                                  timing_batch, timing_key)
from lib.config import Config, LastLayerConfig
from lib.data import Preprocess, Split, batches
from lib.model import unwrap
from lib.pipeline import MapRun, numerics
from lib.train import prior_precision


class SplitLoader:
    """The minimal DataLoader laplace-torch's ``fit`` needs: ``dataset`` (for N = ``len``) and
    iteration over preprocessed (x (B, 3, H, W), y (B,)) batches on ``device``, in order."""

    def __init__(self, split: Split, batch_size: int, *, preprocess: Preprocess, device: torch.device | str):
        self.dataset = split
        self.batch_size = batch_size
        self.preprocess = preprocess
        self.device = torch.device(device)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        return batches(self.dataset, self.batch_size, preprocess=self.preprocess, device=self.device)

    def __len__(self) -> int:
        return -(-len(self.dataset) // self.batch_size)


def head_name(model: nn.Module) -> str:
    """Name in ``model.named_modules()`` of the classifier ``nn.Linear`` that the forward pass
    executes: ``…head.modules_to_save.<adapter>`` under peft, ``head`` for a bare timm ViT."""
    head = unwrap(model).get_classifier()
    if hasattr(head, "modules_to_save"):
        head = head.modules_to_save[head.active_adapter if isinstance(head.active_adapter, str) else head.active_adapter[0]]
    if not isinstance(head, nn.Linear):
        raise ValueError(f"the classifier head is {type(head).__name__}; last-layer Laplace needs an nn.Linear head")
    for name, module in model.named_modules():
        if module is head:
            return name
    raise ValueError("the classifier head is not a submodule of the model")


def fit_last_layer(
    model: nn.Module,
    train: Split,
    cfg: LastLayerConfig,
    *,
    preprocess: Preprocess,
    device: torch.device | str,
    prior_init: float,
):
    """Fit and tune laplace-torch's last-layer Laplace on the (MAP) ``model``; returns the
    ``laplace.LLLaplace`` object (``FullLLLaplace`` or ``KronLLLaplace``).

    GGN over all of ``train`` (in order, batches of ``cfg.batch_size``), then δ maximises the
    log marginal likelihood from ``cfg.prior_init`` if set, else from ``prior_init`` (δ = λ·N
    of the MAP training). ``model`` itself is not modified (laplace-torch deep-copies it); the
    fit is deterministic (no random numbers are drawn). Formula and citation: module docstring.
    """
    from laplace import Laplace

    if not prior_init > 0:
        raise ValueError(f"prior_init is {prior_init}; the prior precision must be > 0")
    model.eval()
    la = Laplace(model, "classification", subset_of_weights="last_layer", hessian_structure=cfg.structure,
                 last_layer_name=head_name(model))
    la.fit(SplitLoader(train, cfg.batch_size, preprocess=preprocess, device=device))
    start = cfg.prior_init if cfg.prior_init is not None else prior_init
    with warnings.catch_warnings():  # its reminder that link_approx defaults to probit: we predict with probit
        warnings.filterwarnings("ignore", message="By default `link_approx` is `probit`")
        la.optimize_prior_precision(pred_type="glm", method="marglik", n_steps=cfg.marglik_steps, lr=cfg.marglik_lr,
                                    init_prior_prec=start, prior_structure="scalar")
    return la


@torch.no_grad()
def last_layer_probs(la, split: Split, *, preprocess: Preprocess, device: torch.device | str, batch_size: int = 64) -> torch.Tensor:
    """laplace-torch's GLM probit predictive ``la(x, pred_type='glm', link_approx='probit')`` over
    ``split`` in batches: probabilities (N, C), float32 on CPU, rows on the simplex."""
    out = [la(x, pred_type="glm", link_approx="probit").float().cpu()
           for x, _ in batches(split, batch_size, preprocess=preprocess, device=device)]
    return torch.cat(out)


def _posterior_floats(precision: Any) -> int:
    """Floats that laplace-torch keeps for a posterior precision: the matrix itself (``full``), or
    the eigenvectors and eigenvalues of its Kronecker factors (``kron``)."""
    if isinstance(precision, torch.Tensor):
        return precision.numel()
    return sum(t.numel() for group in (precision.eigenvectors, precision.eigenvalues) for fs in group for t in fs)


def last_layer_baseline(cfg: Config, run: MapRun, device: torch.device) -> BaselineResult:
    """laplace-torch's last-layer Laplace on the MAP model of ``run``, one row
    ``'last-layer Laplace'`` (:mod:`lib.baselines.result`); the marginal-likelihood search starts
    from δ = λ·N of the MAP training unless ``baselines.last_layer.prior_init`` is set. Record:
    ``prior.json`` (the tuned δ). Formula: module docstring."""
    bc = baselines_config(cfg)
    lc = bc.last_layer

    def compute(st) -> None:
        pre = run.preprocess
        t0 = time.perf_counter()
        la = fit_last_layer(run.model, run.splits.train, lc, preprocess=pre, device=device,
                            prior_init=prior_precision(cfg.train.weight_decay, len(run.splits.train)))
        fit_seconds = time.perf_counter() - t0
        st.file("prior.json").write_text(json.dumps({"prior_precision": la.prior_precision.tolist()}))
        val = last_layer_probs(la, run.splits.val, preprocess=pre, device=device, batch_size=lc.batch_size)
        test = last_layer_probs(la, run.splits.test, preprocess=pre, device=device, batch_size=lc.batch_size)
        x = timing_batch(run, bc, device)

        def predict():
            with torch.no_grad():
                return la(x, pred_type="glm", link_approx="probit")

        ms, mem = ms_per_image(predict, x, bc, device)
        save(st, {"last-layer Laplace": Row(val, test, ms, 1)},
             {"train_seconds": fit_seconds, "extra_params": _posterior_floats(la.posterior_precision), "peak_mib": mem,
              "map_ms_per_image": forward_ms(run.model, x, bc, device),
              "training": {"kind": "post hoc", "structure": lc.structure}})

    inputs = {"last_layer": dataclasses.asdict(lc), "timing": timing_key(bc), "numerics": numerics(device)}
    return load(cached("baseline_last_layer", inputs, code=__name__, compute=compute, upstream=[run.stage]),
                "last-layer Laplace")
