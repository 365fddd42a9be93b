"""lib.corruptions: CIFAR-10-C corruptions — determinism under a seed, distance from the clean image
growing with severity (on real CIFAR-10 test images when the JPEG copy is present, else on smooth
synthetic images), shape/dtype/range kept, hand-worked pixels, noise moments, HSV against colorsys,
and the cached stage."""

from __future__ import annotations

import colorsys
import io

import numpy as np
import pytest
import torch
from PIL import Image

from lib.corruption_names import SEVERITIES
from lib.corruptions import (
    CORRUPTIONS,
    cached_corrupt_split,
    corrupt,
    corrupt_split,
    disk_kernel,
    hsv_to_rgb,
    plasma_fractal,
    rgb_to_hsv,
    subsample_index,
)
from lib.data import Split, synthetic_images
from lib.paths import ROOT

pytestmark = pytest.mark.usefixtures("one_thread")

JPEG_PACK = ROOT.parent / "shared" / "data" / "cifar10-jpeg"
STOCHASTIC = [n for n, c in CORRUPTIONS.items() if c.stochastic]
DETERMINISTIC = [n for n, c in CORRUPTIONS.items() if not c.stochastic]


@pytest.fixture(scope="module")
def images() -> torch.Tensor:
    """200 CIFAR-10 test images (20 per class, evenly spaced) from the JPEG copy, uint8 (200, 3, 32, 32);
    without the copy, 200 smooth class-prototype images with mild noise (:func:`synthetic_images`)."""
    index_file = JPEG_PACK / "test_index.npz"
    if not index_file.is_file():
        return synthetic_images(200, 10, 32, 0.1, seed=0).x
    offsets = np.load(index_file)["offsets"]
    blob = (JPEG_PACK / "test.jpgs").read_bytes()
    pick = np.linspace(0, len(offsets) - 2, 200).astype(int)
    arrs = [np.asarray(Image.open(io.BytesIO(blob[offsets[i]:offsets[i + 1]])).convert("RGB")) for i in pick]
    return torch.from_numpy(np.stack(arrs).transpose(0, 3, 1, 2).copy())


def test_registry_covers_the_four_families_and_required_corruptions():
    assert {c.family for c in CORRUPTIONS.values()} == {"noise", "blur", "weather", "digital"}
    required = {"gaussian_noise", "gaussian_blur", "defocus_blur", "contrast", "jpeg_compression", "pixelate",
                "brightness", "saturate"}
    assert required <= set(CORRUPTIONS)
    assert all(len(c.constants) == len(SEVERITIES) == 5 for c in CORRUPTIONS.values())
    assert CORRUPTIONS["gaussian_noise"].constants == (0.04, 0.06, 0.08, 0.09, 0.10)
    assert CORRUPTIONS["jpeg_compression"].constants == (80, 65, 58, 50, 40)


@pytest.mark.parametrize("name", list(CORRUPTIONS))
def test_shape_dtype_and_range_kept(images, name):
    x = images[:8]
    for s in SEVERITIES:
        y = corrupt(x, name, s, seed=0)
        assert y.shape == x.shape and y.dtype == torch.uint8 and y.device == x.device
    assert not torch.equal(corrupt(x, name, 5, seed=0), x)


@pytest.mark.parametrize("name", list(CORRUPTIONS))
def test_same_seed_gives_identical_images(images, name):
    x = images[:16]
    assert torch.equal(corrupt(x, name, 3, seed=7), corrupt(x, name, 3, seed=7))


@pytest.mark.parametrize("name", STOCHASTIC)
def test_different_seed_gives_different_noise(images, name):
    x = images[:16]
    a, b = corrupt(x, name, 3, seed=7), corrupt(x, name, 3, seed=8)
    assert (a != b).float().mean() > 0.005


@pytest.mark.parametrize("name", DETERMINISTIC)
def test_deterministic_corruptions_ignore_the_seed(images, name):
    x = images[:16]
    assert torch.equal(corrupt(x, name, 3, seed=7), corrupt(x, name, 3, seed=8))


def _distances(x: torch.Tensor, name: str) -> list[float]:
    return [float((corrupt(x, name, s, seed=0).float() - x.float()).abs().mean()) for s in SEVERITIES]


@pytest.mark.parametrize("name", [n for n in CORRUPTIONS if n != "saturate"])
def test_distance_from_clean_grows_with_severity(images, name):
    """Mean |corrupted − clean| (pixel values) strictly increases from severity 1 to 5."""
    d = _distances(images, name)
    assert all(b > a for a, b in zip(d, d[1:])), f"{name}: {[round(v, 2) for v in d]}"
    assert d[0] > 0.5


def test_saturate_orders_by_distance_only_within_desaturation_and_oversaturation(images):
    """Severities 1-2 scale saturation by 0.3, 0.1 and 3-5 raise it, so severity 3 (×1.5) is closer
    to the clean image than severity 2 (×0.1); within each regime the distance grows."""
    d = _distances(images, "saturate")
    assert d[1] > d[0] and d[2] < d[1] and d[2] < d[3] < d[4]


def test_contrast_hand_worked():
    """One channel 0/255 (mean 1/2): factor 0.5 → 0.25, 0.75 → 63.75, 191.25 → truncated 63, 191."""
    x = torch.zeros(1, 3, 2, 2, dtype=torch.uint8)
    x[0, :, 0, :] = 255
    y = corrupt(x, "contrast", 2, seed=0)
    assert y[0, :, 0].eq(191).all() and y[0, :, 1].eq(63).all()


def test_brightness_and_saturate_hand_worked():
    """Grey 51 (V = 0.2) + 0.1 → 0.3 → 76.5 → 76; red (102, 0, 0) (V = 0.4, S = 1) + 0.1 → (127, 0, 0);
    saturate ×0.3 on (102, 0, 0): S = 0.3 → (0.4, 0.28, 0.28) → (102, 71, 71)."""
    x = torch.tensor([[51, 102], [51, 0], [51, 0]], dtype=torch.uint8).view(1, 3, 1, 2)
    y = corrupt(x, "brightness", 2, seed=0)
    assert y[0, :, 0, 0].tolist() == [76, 76, 76] and y[0, :, 0, 1].tolist() == [127, 0, 0]
    s = corrupt(x, "saturate", 1, seed=0)
    assert s[0, :, 0, 0].tolist() == [51, 51, 51] and s[0, :, 0, 1].tolist() == [102, 71, 71]


@pytest.mark.parametrize(("name", "severity", "var_fn"), [
    ("gaussian_noise", 5, lambda u, c: c**2),
    ("shot_noise", 5, lambda u, c: u / c),
    ("speckle_noise", 5, lambda u, c: (u * c) ** 2),
])
def test_noise_moments(name, severity, var_fn):
    """On a flat image u = 128/255 the corrupted pixels have mean 255·u − 1/2 (truncation) and
    variance 255²·var + 1/12 (gaussian: σ², shot: u/λ, speckle: (uσ)²); 4·3·32·32 pixels."""
    x = torch.full((4, 3, 32, 32), 128, dtype=torch.uint8)
    y = corrupt(x, name, severity, seed=1).double()
    u, c = 128 / 255, CORRUPTIONS[name].constants[severity - 1]
    assert abs(float(y.mean()) - (128 - 0.5)) < 0.6
    assert abs(float(y.var()) / (255**2 * var_fn(u, c) + 1 / 12) - 1) < 0.05


def test_impulse_noise_replaces_the_stated_fraction():
    """amount 0.07: about 3.5 % of values become 255 and 3.5 % become 0 (binomial SE ≈ 0.1 %)."""
    x = torch.full((8, 3, 32, 32), 128, dtype=torch.uint8)
    y = corrupt(x, "impulse_noise", 5, seed=2)
    assert abs(float((y == 255).float().mean()) - 0.035) < 0.004
    assert abs(float((y == 0).float().mean()) - 0.035) < 0.004
    assert set(y.unique().tolist()) == {0, 128, 255}


def test_flat_image_is_a_fixed_point_of_blur_and_contrast():
    x = torch.full((2, 3, 32, 32), 128, dtype=torch.uint8)
    for name in ("gaussian_blur", "defocus_blur", "contrast", "pixelate"):
        assert torch.equal(corrupt(x, name, 5, seed=0), x), name


def test_gaussian_blur_spreads_an_impulse_as_a_gaussian():
    """A single 255 pixel blurred with σ = 1 (severity 5): centre 255·g0², neighbour 255·g0·g1 with
    the sampled normalised Gaussian g (truncate 4σ), before truncation to uint8."""
    x = torch.zeros(1, 3, 17, 17, dtype=torch.uint8)
    x[0, :, 8, 8] = 255
    y = corrupt(x, "gaussian_blur", 5, seed=0).double()
    g = np.exp(-np.arange(-4, 5) ** 2 / 2.0)
    g /= g.sum()
    assert abs(float(y[0, 0, 8, 8]) - 255 * g[4] ** 2) < 1.0
    assert abs(float(y[0, 0, 8, 9]) - 255 * g[4] * g[5]) < 1.0
    assert abs(float(y[0, 0, 7, 9]) - 255 * g[5] ** 2) < 1.0


def test_disk_kernel():
    """Normalised, symmetric; radius 1 with a tiny alias blur is the 5-pixel plus with weights 1/5."""
    k = disk_kernel(1.0, 0.2)
    assert k.shape == (17, 17) and abs(k.sum() - 1) < 1e-12
    assert np.allclose(k, k.T) and np.allclose(k, k[::-1])
    plus = np.zeros((17, 17))
    plus[8, 7:10] = plus[7:10, 8] = 0.2
    assert np.allclose(k, plus, atol=1e-4)
    with pytest.raises(ValueError, match="radius"):
        disk_kernel(9.0, 0.1)


def test_hsv_against_colorsys_and_round_trip():
    rng = np.random.default_rng(0)
    rgb = rng.random((3, 3, 4, 5))
    rgb[0, :, 0, 0] = 0.5
    hsv = rgb_to_hsv(rgb)
    ref = np.array([colorsys.rgb_to_hsv(*rgb[n, :, i, j]) for n in range(3) for i in range(4) for j in range(5)])
    assert np.allclose(hsv.transpose(0, 2, 3, 1).reshape(-1, 3), ref, atol=1e-12)
    assert np.allclose(hsv_to_rgb(hsv), rgb, atol=1e-12)


def test_plasma_fractal_is_seeded_and_normalised():
    a = plasma_fractal(32, 3.0, np.random.default_rng(0))
    b = plasma_fractal(32, 3.0, np.random.default_rng(0))
    c = plasma_fractal(32, 3.0, np.random.default_rng(1))
    assert a.shape == (32, 32) and np.array_equal(a, b) and not np.allclose(a, c)
    assert a.min() == 0.0 and a.max() == 1.0
    with pytest.raises(ValueError, match="mapsize"):
        plasma_fractal(30, 3.0, np.random.default_rng(0))


def test_subsample_is_seeded_sorted_and_shared_by_corruptions(images):
    idx = subsample_index(200, 50, seed=3)
    assert idx.shape == (50,) and torch.equal(idx, idx.sort().values) and len(idx.unique()) == 50
    assert torch.equal(idx, subsample_index(200, 50, seed=3))
    assert not torch.equal(idx, subsample_index(200, 50, seed=4))
    assert torch.equal(subsample_index(200, None, seed=3), torch.arange(200))
    split = Split(images, torch.arange(200) % 10)
    a, ia = corrupt_split(split, "fog", 2, seed=3, max_images=50)
    b, ib = corrupt_split(split, "contrast", 4, seed=3, max_images=50)
    assert torch.equal(ia, idx) and torch.equal(ib, idx)
    assert torch.equal(a.y, split.y[idx]) and torch.equal(a.x, corrupt(split.x[idx], "fog", 2, seed=3))


def test_cached_corrupt_split_reuses_its_stage(images, tmp_path):
    split = Split(images[:20], torch.arange(20) % 10)
    inputs = {"name": "test", "n": 20}
    a = cached_corrupt_split(split, inputs, "jpeg_compression", 5, seed=0, max_images=10, root=tmp_path)
    b = cached_corrupt_split(split, inputs, "jpeg_compression", 5, seed=0, max_images=10, root=tmp_path)
    assert a.stage.done and a.stage.path == b.stage.path and (a.name, a.severity) == ("jpeg_compression", 5)
    assert torch.equal(a.split.x, b.split.x) and torch.equal(a.index, b.index)
    assert torch.equal(a.split.y, split.y[a.index])
    assert torch.equal(a.split.x, corrupt(split.x[a.index], "jpeg_compression", 5, seed=0))
    c = cached_corrupt_split(split, inputs, "jpeg_compression", 4, seed=0, max_images=10, root=tmp_path)
    assert c.stage.path != a.stage.path
    dirs = sorted(p.name for p in tmp_path.iterdir())
    assert len(dirs) == 2 and all(d.startswith("corrupt-") for d in dirs)


def test_bad_inputs_are_refused(images):
    with pytest.raises(ValueError, match="corruption 'rain'"):
        corrupt(images[:2], "rain", 1, seed=0)
    with pytest.raises(ValueError, match="severity"):
        corrupt(images[:2], "contrast", 0, seed=0)
    with pytest.raises(ValueError, match="uint8"):
        corrupt(images[:2].float(), "contrast", 1, seed=0)
    with pytest.raises(ValueError, match="max_images"):
        subsample_index(10, 0, seed=0)
