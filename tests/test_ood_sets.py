"""lib.ood_sets: the near-OOD held-out classes of a fabricated CIFAR-10 and the three far-OOD sets —
seeded, of the stated content (patches recomputed from scikit-learn's photographs with the documented
draws, digits by hand at their native size, synthetic noise moments) — and their cached stage."""

from __future__ import annotations

import math
import typing

import numpy as np
import pytest
import torch
from PIL import Image
from sklearn.datasets import load_digits, load_sample_images

from conftest import write_fake_cifar10
from lib.config import FAR_OOD_SET_NAMES, Config, FarOodSet
from lib.ood_sets import (
    FAR_OOD_SETS,
    MAX_PATCH_FACTOR,
    cached_ood_images,
    digit_images,
    natural_patches,
    near_ood_images,
    synthetic_ood_images,
)


def _tv(t: torch.Tensor) -> float:
    """Mean absolute difference of horizontally neighbouring values."""
    t = t.double()
    return float((t[..., 1:] - t[..., :-1]).abs().mean())


def test_near_ood_images_are_the_held_out_classes(tmp_path):
    ref = write_fake_cifar10(tmp_path, n_test=40)
    cfg = Config.from_dict({"profile": "t", "data": {"name": "cifar10", "root": str(tmp_path), "classes": [5, 6, 7, 8, 9],
                                                     "num_classes": 5}})
    x = near_ood_images(cfg)
    keep = np.isin(ref["test_labels"], [0, 1, 2, 3, 4])
    assert torch.equal(x, torch.as_tensor(ref["test"][keep]).reshape(-1, 3, 32, 32))
    sub = near_ood_images(cfg, max_images=7, seed=1)
    assert sub.shape == (7, 3, 32, 32)
    assert all(any(torch.equal(s, r) for r in x) for s in sub)
    assert torch.equal(sub, near_ood_images(cfg, max_images=7, seed=1))
    with pytest.raises(ValueError, match="data.classes"):
        near_ood_images(Config.from_dict({"profile": "t", "data": {"name": "cifar10", "root": str(tmp_path)}}))


def test_natural_patches_are_the_documented_crops_of_the_photographs():
    """Recompute every patch from the photographs with the documented draws (side log-uniform in
    [size, 8·size], then row, then column, from default_rng(seed)); patches alternate between the
    two photographs and are smooth like photographs, not like noise."""
    n, size, seed = 12, 32, 5
    x = natural_patches(n, seed=seed, size=size)
    assert x.shape == (n, 3, size, size) and x.dtype == torch.uint8
    photos = load_sample_images().images
    rng = np.random.default_rng(seed)
    sides = []
    for k in range(n):
        photo = photos[k % 2]
        s = int(round(math.exp(rng.uniform(math.log(size), math.log(MAX_PATCH_FACTOR * size)))))
        top, left = int(rng.integers(0, photo.shape[0] - s + 1)), int(rng.integers(0, photo.shape[1] - s + 1))
        ref = np.asarray(Image.fromarray(photo[top:top + s, left:left + s]).resize((size, size), Image.BOX))
        assert np.array_equal(x[k].numpy().transpose(1, 2, 0), ref), k
        sides.append(s)
    assert all(size <= s <= MAX_PATCH_FACTOR * size for s in sides) and len(set(sides)) > 1
    assert torch.equal(x, natural_patches(n, seed=seed, size=size))
    assert not torch.equal(x, natural_patches(n, seed=seed + 1, size=size))
    assert _tv(x) < 0.5 * _tv(synthetic_ood_images(n, seed=0, size=size)[: (n + 1) // 2])
    with pytest.raises(ValueError, match="too large"):
        natural_patches(2, seed=0, size=64)


def test_box_resize_averages_blocks():
    """What natural_patches' resize does: for an integer factor, PIL's BOX filter is the block mean
    (to within one level: PIL averages in fixed point)."""
    photo = load_sample_images().images[0][:64, :64]
    small = np.asarray(Image.fromarray(photo).resize((16, 16), Image.BOX)).astype(float)
    mean = photo.reshape(16, 4, 16, 4, 3).mean((1, 3))
    assert np.abs(small - mean).max() < 1


def test_digit_images_by_hand_at_native_size():
    """At size 8 the bicubic resize is the identity, so every image is 255 − 255·v/16 rounded, grey
    on all three channels, in the order of torch.randperm(1797) of the seed."""
    digits = load_digits().images
    x = digit_images(20, seed=3, size=8)
    pick = torch.randperm(1797, generator=torch.Generator().manual_seed(3))[:20].numpy()
    ref = np.round(255.0 - 255.0 / 16.0 * digits[pick])
    assert x.shape == (20, 3, 8, 8) and x.dtype == torch.uint8
    assert np.array_equal(x[:, 0].numpy(), ref) and torch.equal(x[:, 0], x[:, 1]) and torch.equal(x[:, 0], x[:, 2])
    up = digit_images(20, seed=3, size=32)
    assert up.shape == (20, 3, 32, 32)
    # bicubic upsampling keeps the mean of each image up to its small overshoot at strokes
    assert (up.double().mean((1, 2, 3)) - x.double().mean((1, 2, 3))).abs().max() < 6
    assert set(digit_images(1797, seed=0, size=8)[:, 0].reshape(1797, -1).sum(1).tolist()) \
        == set(torch.as_tensor(np.round(255.0 - 255.0 / 16.0 * digits)).reshape(1797, -1).sum(1).tolist())
    with pytest.raises(ValueError, match="1797 digits"):
        digit_images(1798, seed=0)


def test_synthetic_ood_images_are_seeded_noise_and_blobs():
    x = synthetic_ood_images(101, seed=4)
    assert x.shape == (101, 3, 32, 32) and x.dtype == torch.uint8
    assert torch.equal(x, synthetic_ood_images(101, seed=4)) and not torch.equal(x, synthetic_ood_images(101, seed=5))
    u, s = x[:51].double(), x[51:].double()
    # uniform on 0..255: mean 127.5, sd 73.9 (discrete uniform, sqrt((256² − 1) / 12)); 156,672 values
    assert abs(float(u.mean()) - 127.5) < 0.6 and abs(float(u.std()) - 73.9) < 0.5
    # neighbouring pixels: independent for uniform (mean |diff| = 85.3), close for smooth blobs
    assert abs(_tv(u) - 85.3) < 1.0 and _tv(s) < 15
    with pytest.raises(ValueError, match="n must be"):
        synthetic_ood_images(0, seed=0)


def test_cached_sets_are_reused_and_keyed(tmp_path):
    assert tuple(FAR_OOD_SETS) == FAR_OOD_SET_NAMES == typing.get_args(FarOodSet)
    a = cached_ood_images("digits", 5, seed=1, size=16, root=tmp_path)
    assert a.stage.done and torch.equal(a.images, digit_images(5, seed=1, size=16))
    again = cached_ood_images("digits", 5, seed=1, size=16, root=tmp_path)
    assert again.stage.path == a.stage.path and torch.equal(again.images, a.images)
    other = cached_ood_images("digits", 5, seed=2, size=16, root=tmp_path)
    assert other.stage.path != a.stage.path
    nat = cached_ood_images("natural", 5, seed=1, size=16, root=tmp_path)
    assert torch.equal(nat.images, natural_patches(5, seed=1, size=16)) and nat.stage.path != a.stage.path
    with pytest.raises(ValueError, match="unknown"):
        cached_ood_images("faces", 5, seed=1, size=16, root=tmp_path)
