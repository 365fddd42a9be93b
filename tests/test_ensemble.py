"""lib.baselines.ensemble: the ensemble predictive, nested sizes, member seeds and cost."""

from __future__ import annotations

import pytest
import torch
from conftest import TINY_VIT, make_lora_vit

from lib.baselines.ensemble import (
    ensemble_cost,
    ensemble_probs,
    member_probs,
    member_seeds,
)
from lib.data import Preprocess, Split
from lib.model import count_parameters, data_config


def _split(n: int = 5) -> Split:
    gen = torch.Generator().manual_seed(7)
    return Split(torch.randint(0, 256, (n, 3, 16, 16), generator=gen, dtype=torch.uint8), torch.zeros(n, dtype=torch.int64))


def test_identical_members_equal_the_member():
    model = make_lora_vit(TINY_VIT, num_classes=4, r=2)
    pre = Preprocess.from_data_config(data_config(model))
    split = _split()
    probs = member_probs([model, model, model], split, preprocess=pre, device=torch.device("cpu"), batch_size=2)
    single = member_probs([model], split, preprocess=pre, device=torch.device("cpu"), batch_size=2)[0]
    assert probs.shape == (3, 5, 4)
    assert torch.allclose(ensemble_probs(probs), single, atol=1e-7)
    with torch.no_grad():  # one batch instead of three: matmul round-off only
        assert torch.allclose(single, model(pre(split.x)).softmax(-1), atol=1e-6)


def test_two_members_average_their_softmax():
    """Two differently seeded tiny LoRA ViTs: the ensemble is the mean of their softmax outputs."""
    a, b = make_lora_vit(TINY_VIT, num_classes=4, r=2, seed=0), make_lora_vit(TINY_VIT, num_classes=4, r=2, seed=1)
    pre = Preprocess.from_data_config(data_config(a))
    split = _split()
    probs = ensemble_probs(member_probs([a, b], split, preprocess=pre, device=torch.device("cpu")))
    with torch.no_grad():
        pa, pb = a(pre(split.x)).softmax(-1), b(pre(split.x)).softmax(-1)
    assert (pa - pb).abs().max() > 1e-3
    assert torch.allclose(probs, (pa + pb) / 2, atol=1e-6)


def test_hand_made_mean():
    p1 = torch.tensor([[0.2, 0.8], [1.0, 0.0]])
    p2 = torch.tensor([[0.6, 0.4], [0.5, 0.5]])
    ref = torch.tensor([[0.4, 0.6], [0.75, 0.25]])
    assert torch.allclose(ensemble_probs(torch.stack([p1, p2])), ref, atol=1e-7)


def test_sizes_are_nested_prefixes():
    gen = torch.Generator().manual_seed(0)
    probs = torch.rand(5, 7, 3, generator=gen).softmax(-1)
    assert torch.allclose(ensemble_probs(probs, 3), probs[:3].sum(0) / 3, atol=1e-7)
    assert torch.allclose(ensemble_probs(probs, 5), probs.sum(0) / 5, atol=1e-7)
    assert not torch.allclose(ensemble_probs(probs, 3), ensemble_probs(probs, 5), atol=1e-3)
    with pytest.raises(ValueError, match="m is 6"):
        ensemble_probs(probs, 6)


def test_member_seeds_are_the_study_seeds_from_the_seed_on():
    assert member_seeds(2, 3, [0, 1, 2, 3]) == [2, 3, 0]
    assert member_seeds(5, 3, [5, 9, 7]) == [5, 9, 7]
    assert member_seeds(7, 2, [5, 9, 7]) == [7, 5]
    assert member_seeds(9, 3, [5, 9, 7])[:2] == member_seeds(9, 2, [5, 9, 7])  # nested sizes
    with pytest.raises(ValueError, match="needs 4 study seeds"):
        member_seeds(0, 4, [0, 1, 2])
    with pytest.raises(ValueError, match="not one of the study's seeds"):
        member_seeds(3, 1, [0, 1, 2])


def test_cost_over_one_map_model():
    """Members 1..M−1 are the extra cost: their training time and parameters; M forward passes."""
    model = make_lora_vit(TINY_VIT, num_classes=4, r=2)
    n = count_parameters(model)
    per_member = n["lora"] + n["head"]
    hist = [[{"seconds": 1.5}, {"seconds": 2.0}], [{"seconds": 3.0}], [{"seconds": 0.5}]]
    cost = ensemble_cost(hist, per_member)
    assert cost.members == 3 and cost.forward_passes == 3
    assert cost.extra_train_seconds == pytest.approx(3.5)
    assert cost.extra_params == 2 * per_member
    assert ensemble_cost(hist[:1], per_member).extra_train_seconds == 0.0
