"""lib.train: bit-identical resume, non-finite loss, the coupled-L2 MAP, the lr schedule."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lib.config import LoraConfig, ModelConfig
from lib.data import Preprocess, Split, batches, synthetic_images
from lib.model import add_lora, build_backbone
from lib.train import FitSpec, epoch_generator, fit, predict_logits, prior_precision

pytestmark = pytest.mark.usefixtures("one_thread")

TINY = ModelConfig(name="vit_tiny_patch16_224", kwargs=dict(img_size=16, patch_size=4, embed_dim=32, depth=2, num_heads=2))
CPU = torch.device("cpu")
TIMING = {"seconds", "images_per_s"}


def _lora_vit() -> nn.Module:
    model = build_backbone(TINY, 3, seed=0, device="cpu")
    model.requires_grad_(False)
    return add_lora(model, LoraConfig(r=2), seed=0)


def _data(n_train: int = 48, n_val: int = 16, size: int = 16) -> tuple[Split, Split]:
    return (
        synthetic_images(n_train, 3, size, 1.0, seed=1),
        synthetic_images(n_val, 3, size, 1.0, seed=2),
    )


PRE16 = Preprocess((0.5,) * 3, (0.5,) * 3, (16, 16))


class Interrupt(Exception):
    pass


def _interrupt_after(model: nn.Module, train_steps: int):
    """Forward hook that raises after ``train_steps`` training-mode forwards (a killed process)."""
    seen = [0]

    def hook(module, args):
        if module.training:
            seen[0] += 1
            if seen[0] > train_steps:
                raise Interrupt

    return model.register_forward_pre_hook(hook)


def _trainable(model: nn.Module) -> list[nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


def test_resume_is_bit_identical_on_cpu(tmp_path):
    train, val = _data()
    spec = FitSpec(epochs=3, batch_size=16, lr=3e-3, warmup_epochs=0.5, grad_clip=1.0, augment=True, l2=1e-3)

    full = _lora_vit()
    hist_full = fit(full, _trainable(full), train, val, spec, preprocess=PRE16, device=CPU, seed=7)

    ckpt = tmp_path / "checkpoint.pt"
    first = _lora_vit()
    handle = _interrupt_after(first, train_steps=3)  # 3 steps per epoch: dies in epoch 2
    with pytest.raises(Interrupt):
        fit(first, _trainable(first), train, val, spec, preprocess=PRE16, device=CPU, seed=7, ckpt=ckpt)
    handle.remove()
    assert torch.load(ckpt, weights_only=False)["epoch"] == 0

    resumed = _lora_vit()  # a fresh process: same init, the checkpoint on disk
    hist = fit(resumed, _trainable(resumed), train, val, spec, preprocess=PRE16, device=CPU, seed=7, ckpt=ckpt)
    for (name, a), b in zip(full.named_parameters(), resumed.parameters()):
        assert torch.equal(a, b), name
    assert len(hist) == len(hist_full) == 3
    for row, ref in zip(hist, hist_full):
        assert {k: v for k, v in row.items() if k not in TIMING} == {k: v for k, v in ref.items() if k not in TIMING}
    # the run moved: a resume that silently restarted or skipped would not match the trained model
    untouched = _lora_vit()
    assert any(not torch.equal(a, b) for a, b in zip(_trainable(untouched), _trainable(resumed)))

    # a finished checkpoint: calling fit again trains nothing and returns the saved history
    again = _lora_vit()
    hist_again = fit(again, _trainable(again), train, val, spec, preprocess=PRE16, device=CPU, seed=7, ckpt=ckpt)
    assert hist_again == hist
    assert all(torch.equal(a, b) for a, b in zip(_trainable(again), _trainable(full)))


def test_different_seed_gives_a_different_run():
    train, val = _data()
    spec = FitSpec(epochs=1, batch_size=16, lr=3e-3, augment=True)
    a, b = _lora_vit(), _lora_vit()
    fit(a, _trainable(a), train, val, spec, preprocess=PRE16, device=CPU, seed=0)
    fit(b, _trainable(b), train, val, spec, preprocess=PRE16, device=CPU, seed=1)
    assert any(not torch.equal(p, q) for p, q in zip(_trainable(a), _trainable(b)))
    assert torch.equal(torch.randperm(10, generator=epoch_generator(3, 1)), torch.randperm(10, generator=epoch_generator(3, 1)))
    assert not torch.equal(torch.rand(5, generator=epoch_generator(3, 1)), torch.rand(5, generator=epoch_generator(3, 2)))


class NanAt(nn.Module):
    """Wraps a model; its output turns NaN at training forward number ``at``."""

    def __init__(self, model: nn.Module, at: int):
        super().__init__()
        self.model, self.at, self.calls = model, at, 0

    def forward(self, x):
        out = self.model(x)
        if self.training:
            self.calls += 1
            if self.calls == self.at:
                return out * float("nan")
        return out


def test_non_finite_loss_names_epoch_and_step():
    train, val = _data()
    model = _lora_vit()
    wrapped = NanAt(model, at=5)  # 3 steps per epoch: epoch 2, step 2
    spec = FitSpec(epochs=2, batch_size=16, lr=1e-3)
    with pytest.raises(FloatingPointError, match=r"epoch 2, step 2 .*global step 5"):
        fit(wrapped, _trainable(model), train, val, spec, preprocess=PRE16, device=CPU, seed=0)


def test_exploding_lr_raises():
    train, val = _data()
    model = nn.Sequential(nn.Flatten(), nn.Linear(3 * 16 * 16, 3))
    spec = FitSpec(epochs=3, batch_size=16, lr=1e37)
    with pytest.raises(FloatingPointError, match=r"non-finite loss .* at epoch \d+, step \d+"):
        fit(model, list(model.parameters()), train, val, spec, preprocess=PRE16, device=CPU, seed=0)


def test_l2_and_decoupled_decay_are_exclusive():
    train, val = _data()
    model = nn.Sequential(nn.Flatten(), nn.Linear(3 * 16 * 16, 3))
    with pytest.raises(ValueError, match="l2 .* decoupled_wd"):
        fit(model, list(model.parameters()), train, val, FitSpec(epochs=1, batch_size=16, lr=1e-3, l2=1e-4, decoupled_wd=1e-2),
            preprocess=PRE16, device=CPU, seed=0)


def _logreg_problem():
    train = synthetic_images(64, 3, 2, 2.0, seed=11)
    val = synthetic_images(16, 3, 2, 2.0, seed=12)
    pre = Preprocess((0.5,) * 3, (0.25,) * 3, (2, 2))
    return train, val, pre


def _exact_map(features: torch.Tensor, y: torch.Tensor, lam: float) -> torch.Tensor:
    """argmin (1/N) Σ CE + (λ/2)‖θ‖² over θ = (W, b) by float64 Newton-like L-BFGS to machine precision."""
    theta = torch.zeros(3 * features.shape[1] + 3, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([theta], lr=1, max_iter=500, tolerance_grad=1e-14, tolerance_change=1e-16, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        W, b = theta[:-3].view(3, -1), theta[-3:]
        loss = F.cross_entropy(features @ W.T + b, y) + 0.5 * lam * theta.pow(2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    return theta.detach()


def _grad_sum_ce(model: nn.Linear, features: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    model = model.double()
    loss = F.cross_entropy(model(features), y, reduction="sum")
    gW, gb = torch.autograd.grad(loss, [model.weight, model.bias])
    return torch.cat([gW.flatten(), gb])


@pytest.mark.parametrize("lam", [1e-2, 1e-1])
def test_coupled_l2_training_is_the_map_with_prior_precision_lambda_n(lam):
    train, val, pre = _logreg_problem()
    n = len(train)
    features = pre(train.x).flatten(1).double()
    lin = nn.Linear(12, 3)
    model = nn.Sequential(nn.Flatten(), lin)
    spec = FitSpec(epochs=1500, batch_size=n, lr=0.05, l2=lam)
    fit(model, list(model.parameters()), train, val, spec, preprocess=pre, device=CPU, seed=0)
    theta = torch.cat([lin.weight.detach().flatten(), lin.bias.detach()]).double()
    # stationarity of the negative log posterior Σ_n CE_n + (δ/2)‖θ‖² with δ = prior_precision(λ, N) = λN
    delta = prior_precision(lam, n)
    assert delta == pytest.approx(lam * n)
    grad = _grad_sum_ce(lin, features, train.y) + delta * theta
    assert grad.norm() < 1e-3 * (delta * theta).norm(), (grad.norm(), (delta * theta).norm())
    # and the exact MAP of the same objective
    exact = _exact_map(features, train.y, lam)
    assert torch.allclose(theta, exact, atol=1e-4, rtol=1e-3), (theta - exact).abs().max()


def test_decoupled_decay_is_not_that_map():
    """AdamW's fixed point differs from the L2 MAP (loshchilov2019decoupled): the check above can fail."""
    lam = 1e-1
    train, val, pre = _logreg_problem()
    n = len(train)
    features = pre(train.x).flatten(1).double()
    lin = nn.Linear(12, 3)
    model = nn.Sequential(nn.Flatten(), lin)
    fit(model, list(model.parameters()), train, val, FitSpec(epochs=1500, batch_size=n, lr=0.05, decoupled_wd=lam),
        preprocess=pre, device=CPU, seed=0)
    theta = torch.cat([lin.weight.detach().flatten(), lin.bias.detach()]).double()
    grad = _grad_sum_ce(lin, features, train.y) + prior_precision(lam, n) * theta
    assert grad.norm() > 1e-2 * (prior_precision(lam, n) * theta).norm()


def test_lr_schedule_warms_up_then_decays_to_zero():
    train, val = _data(n_train=64)  # 4 steps per epoch
    model = nn.Sequential(nn.Flatten(), nn.Linear(3 * 16 * 16, 3))
    lr, epochs, warmup_epochs = 1e-3, 6, 1.5
    hist = fit(model, list(model.parameters()), train, val, FitSpec(epochs=epochs, batch_size=16, lr=lr, warmup_epochs=warmup_epochs),
               preprocess=PRE16, device=CPU, seed=0)
    W, T = int(warmup_epochs * 4), epochs * 4

    def lr_after(s: int) -> float:  # the lr set for step s (0-based), i.e. after s scheduler steps
        return lr * ((s + 1) / W if s < W else 0.5 * (1 + math.cos(math.pi * (s - W) / (T - W))))

    lrs = [row["lr"] for row in hist]
    assert lrs == pytest.approx([lr_after(4 * (e + 1)) for e in range(epochs)], rel=1e-12, abs=1e-15)
    assert lrs[0] < lr and lrs[-1] == 0.0
    assert all(a > b for a, b in zip(lrs[1:], lrs[2:]))
    assert [row["epoch"] for row in hist] == list(range(1, epochs + 1))


def test_history_rows_and_predict_logits():
    train, val = _data()
    model = _lora_vit()
    seen = []  # the logits of every training step, as the optimiser saw them
    hook = model.register_forward_hook(lambda m, args, out: seen.append(out.detach().clone()) if m.training else None)
    hist = fit(model, _trainable(model), train, val, FitSpec(epochs=1, batch_size=16, lr=1e-3), preprocess=PRE16, device=CPU, seed=0)
    hook.remove()
    row = hist[0]
    assert set(row) == {"epoch", "lr", "train_loss", "train_acc", "val_loss", "val_acc", "seconds", "images_per_s"}
    logits = predict_logits(model, val, preprocess=PRE16, device=CPU, batch_size=5)
    assert logits.shape == (16, 3) and logits.dtype == torch.float32 and not model.training
    assert row["val_loss"] == pytest.approx(F.cross_entropy(logits, val.y).item(), rel=1e-6)
    assert row["val_acc"] == pytest.approx((logits.argmax(1) == val.y).float().mean().item())
    with torch.no_grad():
        ref = model(PRE16(val.x))
    assert torch.allclose(logits, ref, atol=1e-5)
    # train_loss/train_acc: over the epoch's shuffled batches (seed 0, epoch 0), each at the weights of its step
    ys = torch.cat([y for _, y in batches(train, 16, preprocess=PRE16, device=CPU, shuffle=True, generator=epoch_generator(0, 0))])
    assert len(seen) == 3 and torch.cat(seen).shape == (len(train), 3)
    assert row["train_loss"] == pytest.approx(F.cross_entropy(torch.cat(seen), ys).item(), rel=1e-6)
    assert row["train_acc"] == pytest.approx((torch.cat(seen).argmax(1) == ys).sum().item() / len(ys), abs=1e-12)
