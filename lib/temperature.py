"""Temperature scaling (guo2017calibration): the post-hoc baseline the Laplace posteriors face.

``p = softmax(f / T)`` with one scalar ``T > 0`` fitted by minimising the validation NLL
``(1/N) Σ_n −log softmax(f_n / T)_{y_n}`` (a convex problem in ``1/T``), never on the test set.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def fit_temperature(logits: torch.Tensor, labels: torch.Tensor, *, max_iter: int = 100) -> float:
    """The NLL-optimal temperature ``T`` for ``logits`` (N, C) and ``labels`` (N,).

    ``T = argmin_T −(1/N) Σ_n log softmax(f_n / T)[y_n]``, minimised over ``log T`` with L-BFGS
    (strong Wolfe line search) in float64 :cite:`guo2017calibration`.
    """
    if logits.ndim != 2 or labels.shape != logits.shape[:1]:
        raise ValueError(f"logits must be (N, C) and labels (N,); got {tuple(logits.shape)}, {tuple(labels.shape)}")
    f = logits.detach().double()
    log_t = torch.zeros((), dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([log_t], lr=1.0, max_iter=max_iter, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(f / log_t.exp(), labels)
        loss.backward()
        return loss

    opt.step(closure)
    return float(log_t.detach().exp())


def apply_temperature(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """Probabilities ``softmax(logits / T)``, (N, C)."""
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    return torch.softmax(logits.float() / temperature, dim=-1)
