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

import warnings
from dataclasses import dataclass
from typing import Any, Iterator, Literal, Mapping

import torch
from torch import nn

from lib.config import _above, _at_least, _build
from lib.data import Preprocess, Split, batches
from lib.model import unwrap


@dataclass(frozen=True)
class LastLayerConfig:
    """Last-layer Laplace settings.

    ``structure``: the head's GGN kept ``full`` or ``kron``; the prior is one scalar δ for the
    whole head (laplace-torch 0.3's last-layer classes accept a scalar or a full diagonal, not one
    δ per tensor); ``prior_init``: δ
    where the marginal-likelihood search starts (None: δ = λ·N of the MAP training, given to
    :func:`fit_last_layer`); ``marglik_steps``/``marglik_lr``: Adam steps and step size on log δ;
    ``batch_size``: images per curvature and prediction batch.
    """

    structure: Literal["full", "kron"] = "kron"
    prior_init: float | None = _above(None, 0.0)
    marglik_steps: int = _at_least(100, 1)
    marglik_lr: float = _above(0.1, 0.0)
    batch_size: int = _at_least(64, 1)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], source: str = "params") -> "LastLayerConfig":
        """Build from a mapping, rejecting unknown keys and out-of-range values (``ParamsError``)."""
        return _build(cls, d, source, "last_layer.")


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
