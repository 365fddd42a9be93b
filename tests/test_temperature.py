"""lib.temperature: the fitted T is the validation-NLL minimiser (grid search reference) and recovers
a known temperature; apply_temperature is softmax(f/T) and rejects T <= 0."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from lib.temperature import apply_temperature, fit_temperature


def _nll(logits: torch.Tensor, labels: torch.Tensor, temps: torch.Tensor) -> torch.Tensor:
    """Mean NLL of softmax(logits / T) for every T in ``temps`` (G,) → (G,), float64."""
    f = logits.double()[None] / temps.double()[:, None, None]
    logp = f.log_softmax(-1).gather(2, labels.view(1, -1, 1).expand(len(temps), -1, 1))
    return -logp.squeeze(2).mean(1)


def _grid_argmin(logits: torch.Tensor, labels: torch.Tensor) -> float:
    """Coarse grid over log T in [-3, 3] (step 1e-3), then a fine grid of step 1e-6 around the best."""
    log_t = torch.arange(-3, 3, 1e-3, dtype=torch.float64)
    best = log_t[_nll(logits, labels, log_t.exp()).argmin()]
    fine = best + torch.arange(-2e-3, 2e-3, 1e-6, dtype=torch.float64)
    return float(fine[_nll(logits, labels, fine.exp()).argmin()].exp())


def _sample(n: int, c: int, t0: float, scale: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits z ~ N(0, scale²) and labels drawn from softmax(z / t0)."""
    g = torch.Generator().manual_seed(seed)
    z = scale * torch.randn(n, c, generator=g)
    y = torch.multinomial(torch.softmax(z / t0, -1), 1, generator=g).squeeze(1)
    return z, y


@pytest.mark.parametrize(("t0", "seed"), [(0.6, 0), (1.0, 1), (2.5, 2)])
def test_fit_equals_grid_search_argmin(t0, seed):
    z, y = _sample(800, 6, t0, 3.0, seed)
    t = fit_temperature(z, y)
    ref = _grid_argmin(z, y)
    assert t == pytest.approx(ref, rel=1e-3)
    # and it is a minimum: the NLL at T is no larger than at T(1 ± 1e-2)
    vals = _nll(z, y, torch.tensor([t, t * 0.99, t * 1.01]))
    assert vals[0] <= vals[1] and vals[0] <= vals[2]


@pytest.mark.parametrize("t0", [0.5, 2.0, 4.0])
def test_recovers_known_temperature(t0):
    z, y = _sample(40_000, 10, t0, 4.0, seed=int(10 * t0))
    t = fit_temperature(z, y)
    assert abs(t / t0 - 1) < 0.05, (t, t0)


def test_overconfident_logits_get_t_above_one():
    z, y = _sample(5000, 5, 3.0, 4.0, seed=7)
    assert fit_temperature(z, y) > 2.5
    assert fit_temperature(z / 3.0, y) == pytest.approx(fit_temperature(z, y) / 3.0, rel=1e-3)


def test_fit_rejects_bad_shapes():
    z = torch.randn(10, 3)
    with pytest.raises(ValueError, match="logits must be"):
        fit_temperature(z, torch.zeros(9, dtype=torch.long))
    with pytest.raises(ValueError, match="logits must be"):
        fit_temperature(z.flatten(), torch.zeros(30, dtype=torch.long))


def test_apply_temperature():
    z = torch.randn(7, 4, generator=torch.Generator().manual_seed(0)).double()
    p = apply_temperature(z, 2.0)
    assert torch.allclose(p, torch.softmax(z.float() / 2.0, -1), atol=1e-7)
    assert torch.allclose(p.sum(-1), torch.ones(7), atol=1e-6)
    assert torch.allclose(apply_temperature(z, 1.0), F.softmax(z.float(), -1), atol=1e-7)
    assert (apply_temperature(z, 100.0) - 0.25).abs().max() < 0.02
    for bad in (0.0, -1.0):
        with pytest.raises(ValueError, match="temperature must be > 0"):
            apply_temperature(z, bad)
