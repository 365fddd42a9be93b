"""lib.baselines.variational: the KL approximation against a numerical integral, the gates, rank
pruning, a short training run and the sampled predictive."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
import torch
import yaml
from conftest import TINY_VIT, make_lora_vit
from scipy import integrate

from lib.baselines.variational import (
    K1,
    VariationalLoRA,
    check_pruning_can_act,
    fit_variational,
    kl_beta,
    kl_log_uniform,
    prune_epochs,
    pruning_table,
    sampling,
    variational_probs,
)
from lib.baselines.finetune import finetune_spec
from lib.config import Config, DataConfig, LoraConfig, VariationalConfig, load_params
from lib.data import Preprocess, Split, synthetic_images
from lib.model import add_lora, build_backbone, data_config, lora_modules
from lib.paths import PARAMS
from lib.train import FitSpec, fit, lr_factor

EULER_GAMMA = 0.5772156649015329
ATOL_KL = 0.012  # error of the fit of molchanov2017variational; observed max 0.0094 (at log α = −3.5)


def kl_exact(log_alpha: float) -> float:
    """KL = −½ log α + E log|1 + √α ξ| + (γ + log 2)/2, ξ ~ N(0, 1), by adaptive quadrature with
    the log singularity at ξ = −1/√α as a break point (0 as α → ∞)."""
    s = math.exp(0.5 * log_alpha)

    def f(xi: float) -> float:
        return math.exp(-0.5 * xi * xi) / math.sqrt(2 * math.pi) * math.log(abs(1 + s * xi))

    lo, hi, sing = -40.0, 40.0, -1.0 / s
    pieces = [(lo, sing), (sing, hi)] if lo < sing < hi else [(lo, hi)]
    val = sum(integrate.quad(f, a, b, limit=400, epsabs=1e-12)[0] for a, b in pieces)
    return -0.5 * log_alpha + val + 0.5 * (EULER_GAMMA + math.log(2))


def test_kl_matches_numerical_integral():
    grid = np.linspace(-6, 6, 25)
    exact = torch.tensor([kl_exact(v) for v in grid], dtype=torch.float64)
    approx = kl_log_uniform(torch.tensor(grid))
    assert (approx - exact).abs().max() <= ATOL_KL
    assert (approx >= 0).all()
    assert exact[0] > exact[-1]  # decreasing in α: a large dropout rate costs little
    # the published constant k1 is the α → ∞ limit (γ + log 2)/2 of the exact KL's normalisation
    assert abs(K1 - 0.5 * (EULER_GAMMA + math.log(2))) < 1e-3


def test_kl_limits():
    """α → 0: KL ≈ k1 − ½ log α (small-noise expansion); α → ∞: KL → 0 (log α clamped at 8,
    where KL = ½ log(1 + e⁻⁸) up to 1e-6)."""
    la = torch.tensor([-20.0, 8.0, 20.0], dtype=torch.float64)
    kl = kl_log_uniform(la)
    assert abs(float(kl[0]) - (K1 + 10.0)) < 1e-6
    assert abs(float(kl[1]) - 0.5 * math.log1p(math.exp(-8.0))) < 1e-6
    assert float(kl[2]) == float(kl[1])


def _model(seed: int = 0):
    return make_lora_vit(TINY_VIT, num_classes=4, r=2, seed=seed)


def _split(n: int = 6) -> Split:
    gen = torch.Generator().manual_seed(9)
    return Split(torch.randint(0, 256, (n, 3, 16, 16), generator=gen, dtype=torch.uint8), torch.zeros(n, dtype=torch.int64))


def test_mean_mode_is_plain_lora_and_gates_have_variance_alpha():
    model = _model()
    pre = Preprocess.from_data_config(data_config(model))
    x = pre(_split().x)
    with torch.no_grad():
        ref = model(x)
    v = VariationalLoRA(model, init_log_alpha=-1.0, generator=torch.Generator().manual_seed(0))
    with torch.no_grad(), v.mode(False):
        assert torch.equal(model(x), ref)
    with torch.no_grad():
        assert (model(x) - ref).abs().max() > 1e-3
    name = lora_modules(model)[0].name
    g = v.gates(name, 20000, 3, torch.device("cpu")).detach()
    assert g.shape == (20000, 1, 2)
    se_var = math.exp(-1.0) * math.sqrt(2 / 20000)  # standard error of a Gaussian variance
    assert torch.allclose(g.var(0).flatten(), torch.full((2,), math.exp(-1.0)), atol=5 * se_var)
    assert torch.allclose(g.mean(0).flatten(), torch.ones(2), atol=5 * math.exp(-0.5) / math.sqrt(20000))
    v.remove()
    with torch.no_grad():
        assert torch.equal(model(x), ref)


def test_pruning_a_dead_rank_changes_nothing():
    """Rank 1 of every module has A row 0 and B column 0 (zero mean and zero variance of its
    contribution) and log α = 5 > 3: pruning it leaves the outputs unchanged; the other rank
    (log α = −30, no noise) is kept; the log lists every module with its kept rank."""
    model = _model()
    mods = lora_modules(model)
    with torch.no_grad():
        for m in mods:
            m.A.weight[1].zero_()
            m.B.weight[:, 1].zero_()
    pre = Preprocess.from_data_config(data_config(model))
    x = pre(_split().x)
    v = VariationalLoRA(model, init_log_alpha=-30.0, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        for p in v.log_alpha.values():
            p[1] = 5.0
        with v.mode(False):
            before_mean = model(x)
        v.generator.manual_seed(1)
        before_sample = model(x)
    log = v.prune(3.0, epoch=7)
    assert [r["module"] for r in log] == [m.name for m in mods]
    assert all(r["ranks_before"] == 2 and r["ranks_kept"] == 1 and r["kept"] == [0] and r["epoch"] == 7 for r in log)
    assert all(m.A.weight.shape[0] == 1 and m.B.weight.shape[1] == 1 for m in mods)
    with torch.no_grad():
        with v.mode(False):
            assert torch.allclose(model(x), before_mean, atol=1e-6)
        v.generator.manual_seed(1)
        assert torch.allclose(model(x), before_sample, atol=1e-5)
    assert sum(v.ranks().values()) == len(mods)


def test_pruning_keeps_min_ranks_and_live_ranks_matter():
    model = _model()
    v = VariationalLoRA(model, init_log_alpha=6.0, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        first = next(iter(v.log_alpha.values()))
        first[0] = 7.0
    log = v.prune(3.0, min_ranks=1)
    assert log[0]["kept"] == [1]  # the smaller log α of the two
    assert all(r["ranks_kept"] == 1 for r in log)


def _tiny(seed: int = 0):
    model = add_lora(build_backbone(TINY_VIT, 4, seed=seed, device="cpu"), LoraConfig(r=2), seed=seed)
    return model, Preprocess.from_data_config(data_config(model))


def test_schedule_of_the_seed_demo():
    """The seed's benchmark (--kl-freeze-epochs 3 --beta-warmup-epochs 5 --sample-warmup-epochs 3
    --prune-every 3, 20 epochs) printed β 0, 0, 0, .2, .4, .6, .8, 1, …, sampling from epoch 4 and
    pruned after epochs 9, 12, 15, 18 (from epoch 3 + 5 = 8 on)."""
    cfg = VariationalConfig(kl_freeze_epochs=3, beta_warmup_epochs=5, sample_warmup_epochs=3, prune_every=3)
    assert [kl_beta(cfg, e) for e in range(1, 10)] == [0.0, 0.0, 0.0, 0.2, 0.4, 0.6, 0.8, 1.0, 1.0]
    assert [sampling(cfg, e) for e in (3, 4)] == [False, True]
    assert prune_epochs(cfg, 20) == [9, 12, 15, 18]
    assert prune_epochs(dataclasses.replace(cfg, prune_start_epoch=1), 7) == [3, 6]


def test_pruning_cannot_act_with_adams_step_bound():
    """The issue's case: log α from −4, threshold 3, step size 1e-3: a few hundred steps cannot
    reach 3, and the schedule is refused with the numbers; 0.05 per step can."""
    spec = FitSpec(epochs=2, batch_size=64, lr=1e-3)
    slow = VariationalConfig(log_alpha_lr=1e-3, beta_warmup_epochs=1, prune_every=2)
    with pytest.raises(ValueError, match="cannot act.*at most -3.84 <= prune_threshold 3.0"):
        check_pruning_can_act(spec, slow, n_train=5000)  # 2 × 79 steps with a KL term
    assert check_pruning_can_act(spec, dataclasses.replace(slow, log_alpha_lr=0.05), n_train=5000) == 158
    with pytest.raises(ValueError, match="never prunes"):
        check_pruning_can_act(spec, dataclasses.replace(slow, prune_every=3), n_train=5000)


CIFAR_TRAIN_PER_CLASS = {"cifar10": 5000, "cifar100": 500}
"""Training images per class of the CIFAR training sets (torchvision)."""

BASELINE_PROFILES = sorted(p.stem for p in PARAMS.glob("*.yml") if "baselines" in (yaml.safe_load(p.read_text()) or {}))


def training_images(data: DataConfig) -> int:
    """A lower bound on the images of the fine-tuning split (:func:`lib.data.load_splits`), from
    the config alone: ``synthetic.n_train``; for CIFAR the k classes' training images less
    ``val_size``, or with ``train_per_class`` p at least ``k · min(p, per class − val_size)`` (each
    class loses at most ``val_size`` images to validation). Fewer images mean fewer steps, so a
    schedule that can prune with this many can prune with the real split."""
    if data.name == "synthetic":
        return data.synthetic.n_train
    k, per = data.num_classes, CIFAR_TRAIN_PER_CLASS[data.name]
    if data.train_per_class is None:
        return k * per - data.val_size
    return k * min(data.train_per_class, per - data.val_size)


@pytest.mark.parametrize("profile", BASELINE_PROFILES)
def test_every_profiles_variational_schedule_can_prune(profile):
    """The refusal of :func:`lib.baselines.variational.fit_variational`, checked on every shipped
    profile with a ``baselines`` section, so that a schedule that cannot prune fails here and not
    after the MAP, Laplace and baseline stages of a compute."""
    cfg = Config.from_dict(load_params(PARAMS / f"{profile}.yml", check_data=False))
    bc = cfg.baselines
    n = training_images(cfg.data)
    assert n > 0, f"{profile}: no training images left after data.val_size {cfg.data.val_size}"
    assert check_pruning_can_act(finetune_spec(cfg.train, bc.finetune), bc.variational, n) > 0


def test_a_rank_without_signal_is_pruned_and_a_live_one_kept():
    """Truth known: in every LoRA map rank 1 has A row 0, so with B = 0 at the start neither it, its
    B column nor its gate ever receives a likelihood gradient (the L2 prior keeps them at 0) and
    only the KL moves its log α, up by log_alpha_lr per step; rank 0 carries the fit. As in the
    study, the MAP model is trained first (plain LoRA, the MAP recipe) and the variational LoRA
    starts from it: every dead rank is pruned at the first pruning (its log α has risen above 3,
    and not above Adam's bound −4 + 24 steps × 0.6) and every live rank is kept (log α < 3 throughout)."""
    train = synthetic_images(64, 4, 16, 0.3, seed=1)
    model, pre = _tiny()
    with torch.no_grad():
        for m in lora_modules(model):
            m.A.weight[1].zero_()
    point = [p for p in model.parameters() if p.requires_grad]
    fit(model, point, train, train, FitSpec(epochs=8, batch_size=8, lr=1e-2, l2=1e-4, grad_clip=1.0),
        preprocess=pre, device=torch.device("cpu"), seed=0)
    assert all(float(m.B.weight[:, 1].detach().abs().max()) == 0.0 for m in lora_modules(model))
    v = VariationalLoRA(model, init_log_alpha=-4.0, generator=torch.Generator().manual_seed(0))
    spec = FitSpec(epochs=6, batch_size=8, lr=3e-3, warmup_epochs=0.5, grad_clip=1.0, l2=1e-4)
    cfg = VariationalConfig(log_alpha_lr=0.6, beta_warmup_epochs=1, prune_every=3, min_ranks=1)
    hist, log = fit_variational(model, v, train, spec, cfg, preprocess=pre, device="cpu", seed=0)
    mods = lora_modules(model)
    first, last = [r for r in log if r["epoch"] == 3], [r for r in log if r["epoch"] == 6]
    assert {r["epoch"] for r in log} == {3, 6} and len(first) == len(last) == len(mods)
    assert all(r["kept"] == [0] for r in first + last)
    assert all(3.0 < r["log_alpha_before"][1] <= -4.0 + 24 * 0.6 + 1e-4 for r in first)
    assert all(r["log_alpha_before"][0] < 3.0 for r in first + last), [r["log_alpha_before"] for r in first + last]
    assert hist[-1]["ranks"] == len(mods) and [h["beta"] for h in hist] == [1.0] * 6
    table = pruning_table(log)
    assert list(table.columns) == ["epoch", "block", "ranks_before", "ranks_kept", "pruned", "log_alpha_median",
                                   "log_alpha_min", "log_alpha_max"]
    at3 = table[table.epoch == 3]
    assert list(at3.ranks_before) == [8, 8, 8] and list(at3.ranks_kept) == [4, 4, 4] and (at3.pruned == 4).all()
    assert (at3.log_alpha_max > 3.0).all() and (at3.log_alpha_min < 3.0).all()
    assert (table[table.epoch == 6].pruned == 0).all()


def test_training_decreases_loss_with_the_map_recipe():
    """A tiny LoRA ViT (LoRA B = 0 at the start) on separable synthetic classes: the loss falls over
    6 epochs, KL ≥ 0, the learning rate of the point parameters follows warm-up and cosine (0 at
    the end), β warms up, and both prunings log every module."""
    train = synthetic_images(32, 4, 16, 0.3, seed=1)
    model, pre = _tiny()
    v = VariationalLoRA(model, init_log_alpha=-4.0, generator=torch.Generator().manual_seed(0))
    spec = FitSpec(epochs=6, batch_size=16, lr=1e-2, warmup_epochs=1, grad_clip=1.0, l2=1e-4, augment=True)
    cfg = VariationalConfig(log_alpha_lr=1.0, beta_warmup_epochs=2, prune_every=3)
    hist, log = fit_variational(model, v, train, spec, cfg, preprocess=pre, device="cpu", seed=0)
    assert [h["epoch"] for h in hist] == list(range(1, 7))
    assert hist[-1]["loss"] < 0.8 * hist[0]["loss"], [h["loss"] for h in hist]
    assert all(h["kl"] >= 0 for h in hist) and [h["beta"] for h in hist] == [0.5, 1.0, 1.0, 1.0, 1.0, 1.0]
    assert hist[0]["lr"] == pytest.approx(1e-2 * lr_factor(2, 2, 12)) and hist[-1]["lr"] == pytest.approx(0.0, abs=1e-12)
    assert len(log) == 2 * len(lora_modules(model)) and {r["epoch"] for r in log} == {3, 6}
    assert all(r["ranks_kept"] >= 2 for r in log)  # min_ranks 2 of r = 2: nothing can go
    assert not model.training
    with pytest.raises(ValueError, match="coupled l2"):
        fit_variational(model, v, train, dataclasses.replace(spec, l2=0.0, decoupled_wd=0.1), cfg, preprocess=pre,
                        device="cpu", seed=0)


def test_log_alpha_step_size_is_its_own():
    """log α moves by at most ~lr per Adam step: with log_alpha_lr = 1e-3 it stays within
    2 steps × 1e-3 of its start; with 0.2 it moves further than that (the point parameters' lr is
    1e-3 in both)."""
    train = synthetic_images(16, 4, 16, 0.3, seed=1)
    moved = []
    for alpha_lr in (1e-3, 0.2):
        model, pre = _tiny()
        v = VariationalLoRA(model, init_log_alpha=-4.0, generator=torch.Generator().manual_seed(0))
        cfg = VariationalConfig(log_alpha_lr=alpha_lr, init_log_alpha=-4.0, prune_threshold=-5.0, beta_warmup_epochs=1,
                                prune_every=1)
        fit_variational(model, v, train, FitSpec(epochs=1, batch_size=8, lr=1e-3), cfg, preprocess=pre, device="cpu",
                        seed=0)
        moved.append(max(float((torch.tensor(r) + 4.0).abs().max()) for r in
                         [[float(x) for x in p.detach()] for p in v.log_alpha.values()]))
    assert moved[0] <= 2 * 1e-3 * 1.01
    assert moved[1] > 0.1


def test_predictive_is_deterministic_and_averages_draws():
    model = _model()
    pre = Preprocess.from_data_config(data_config(model))
    split = _split()
    v = VariationalLoRA(model, init_log_alpha=0.0, generator=torch.Generator().manual_seed(0))
    p = variational_probs(model, v, split, samples=4, seed=3, preprocess=pre, device="cpu", batch_size=6)
    assert torch.equal(p, variational_probs(model, v, split, samples=4, seed=3, preprocess=pre, device="cpu", batch_size=6))
    v.generator.manual_seed(3)
    with torch.no_grad():
        ref = torch.stack([model(pre(split.x)).softmax(-1) for _ in range(4)]).mean(0)
    assert torch.allclose(p, ref, atol=1e-6)
    assert torch.allclose(p.sum(-1), torch.ones(6), atol=1e-6)


def test_mean_prediction_is_the_network_at_gate_one():
    model = _model()
    pre = Preprocess.from_data_config(data_config(model))
    split = _split()
    with torch.no_grad():
        ref = model(pre(split.x)).softmax(-1)
    v = VariationalLoRA(model, init_log_alpha=0.0, generator=torch.Generator().manual_seed(0))
    p = variational_probs(model, v, split, samples=4, seed=3, preprocess=pre, device="cpu", mean=True)
    assert torch.allclose(p, ref, atol=1e-6)
