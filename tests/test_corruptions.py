"""lib.corruptions: CIFAR-10-C corruptions — determinism under a seed, distance from the clean image
growing with severity (on real CIFAR-10 test images when the JPEG copy is present, else on smooth
synthetic images), shape/dtype/range kept, hand-worked pixels, noise moments, HSV against colorsys,
and the cached stage."""

from __future__ import annotations

import colorsys
import hashlib
import io
import math

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
    gaussian_taps_f32,
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


DEFOCUS = CORRUPTIONS["defocus_blur"].constants
OPENCV_DISK_ROWS = {  # cv2.GaussianBlur of make_cifar_c.py's float32 disk, rows 8 and 7, columns 6..10
    # (float32 bit patterns), and the kernel's sum in float64; identical in OpenCV 3.4.18 and 4.8.1
    (0.3, 0.4): ((0x0, 0x3D1810F1, 0x3F585029, 0x3D1810F1, 0x0),
                 (0x0, 0x3AD5CD63, 0x3D1810F1, 0x3AD5CD63, 0x0), 1.0000000013969839),
    (0.4, 0.5): ((0x0, 0x3DABA990, 0x3F1E8D87, 0x3DABA990, 0x0),
                 (0x0, 0x3C39DB15, 0x3DABA990, 0x3C39DB15, 0x0), 1.0000000186264515),
    (0.5, 0.6): ((0x0, 0x3DE35BC7, 0x3EE3F2FD, 0x3DE35BC7, 0x0),
                 (0x0, 0x3CE2C4F6, 0x3DE35BC7, 0x3CE2C4F6, 0x0), 1.0000000447034836),
    (1.0, 0.2): ((0x354811F8, 0x3E4CCC37, 0x3E4CCCCD, 0x3E4CCC37, 0x354811F8),
                 (0x2C4373D9, 0x35C81210, 0x3E4CCC37, 0x35C81210, 0x2C4373D9), 1.0000000180720523),
    (1.5, 0.1): ((0x19CF437C, 0x3DE38E39, 0x3DE38E39, 0x3DE38E39, 0x19CF437C),
                 (0x19CF437C, 0x3DE38E39, 0x3DE38E39, 0x3DE38E39, 0x19CF437C), 1.0000000074505806),
}
OPENCV_DEFOCUS_SHA = {  # sha256[:16] of the uint8 (3, 32, 32) output of make_cifar_c.py's defocus_blur
    # (cv2.filter2D with the kernel above; OpenCV 3.4.18 and 4.8.1) on the images of _reference_images
    "noise": ("fe323ed8c1d571aa", "a15897cda7a51fe4", "8f5c8880ca55a366", "0a78d2c89130e1a9", "ab6fd9836c0255ed"),
    "ramp": ("68e5091344148373", "542d95bf67fa2423", "58d7ecf054309a98", "26d656caf5e261f4", "4905cd2e65d1b102"),
}


def _reference_images() -> dict[str, torch.Tensor]:
    noise = np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    i, j = np.meshgrid(np.arange(32), np.arange(32), indexing="ij")
    ramp = np.stack([(i * 8 + j * 3 + 40 * c) % 256 for c in range(3)], -1).astype(np.uint8)
    return {k: torch.from_numpy(v.transpose(2, 0, 1).copy())[None] for k, v in (("noise", noise), ("ramp", ramp))}


def test_gaussian_taps_f32_hand_worked():
    """σ = 0.4: t = float32(exp(−1/(2·0.16))) = float32(e^−3.125), s = 1/(1 + 2t) in double,
    taps float32(t·s), float32(s), float32(t·s): OpenCV's getGaussianKernel(3, σ, CV_32F)."""
    t = float(np.float32(math.exp(-3.125)))
    s = 1.0 / (t + 1.0 + t)
    ref = np.array([t * s, s, t * s], dtype=np.float32)
    taps = gaussian_taps_f32(0.4)
    assert taps.dtype == np.float32 and np.array_equal(taps, ref)
    assert abs(float(taps[0]) - 0.0403879) < 1e-6 and abs(float(taps[1]) - 0.9192242) < 1e-6
    with pytest.raises(ValueError, match="sigma"):
        gaussian_taps_f32(0.0)


@pytest.mark.parametrize("c", DEFOCUS)
def test_disk_kernel_is_opencvs_float32_kernel(c):
    """Bit for bit the float32 kernel OpenCV builds in make_cifar_c.py's disk (recorded above);
    it sums to more than 1, which is what keeps flat regions from truncating one level darker."""
    k = disk_kernel(*c)
    assert k.shape == (17, 17) and k.dtype == np.float32
    row8, row7, total = OPENCV_DISK_ROWS[c]
    assert [int(v) for v in k[8, 6:11].view(np.uint32)] == list(row8)
    assert [int(v) for v in k[7, 6:11].view(np.uint32)] == list(row7)
    assert abs(float(k.sum(dtype=np.float64)) - total) < 1e-15 and total > 1
    assert np.array_equal(k, k.T) and np.array_equal(k, k[::-1])
    with pytest.raises(ValueError, match="radius"):
        disk_kernel(9.0, 0.1)


def test_defocus_blur_of_flat_images_keeps_every_value():
    """A flat image of value v is filtered to v·Σk ≥ v (Σk > 1), so it truncates back to v at every
    severity, as in the original; a float64 kernel (Σk = 1 up to rounding) loses a level for some v."""
    x = torch.arange(256, dtype=torch.uint8)[:, None, None, None].expand(256, 3, 32, 32).contiguous()
    for s in SEVERITIES:
        assert torch.equal(corrupt(x, "defocus_blur", s, seed=0), x), s


def test_defocus_blur_hand_computed_step_edge():
    """Severity 1 (radius 0.3: the disk is the centre pixel alone): the kernel is K_ij = float32(t_i t_j)
    with the taps t of σ = 0.4. A vertical edge (a left of column 16, b from it on) gives, in
    column 15, ⌊255 · (a/255 · (S₋₁ + S₀) + b/255 · S₁)⌋ with S_j = Σ_i K_ij, and symmetrically in
    column 16; columns 0 and 31 reflect (reflect-101) and stay flat."""
    a, b = 200, 40
    x = torch.full((1, 3, 32, 32), a, dtype=torch.uint8)
    x[..., 16:] = b
    t = gaussian_taps_f32(0.4)
    K = np.array([[float(np.float32(ti * tj)) for tj in t] for ti in t])
    S = K.sum(0)
    left = 255 * (a / 255 * (S[0] + S[1]) + b / 255 * S[2])
    right = 255 * (a / 255 * S[0] + b / 255 * (S[1] + S[2]))
    assert min(left % 1, 1 - left % 1, right % 1, 1 - right % 1) > 1e-6  # far from a truncation boundary
    y = corrupt(x, "defocus_blur", 1, seed=0)
    assert (y[..., 15] == int(left)).all() and (y[..., 16] == int(right)).all()
    assert (y[..., :15] == a).all() and (y[..., 17:] == b).all()
    assert int(left) != a and int(right) != b


@pytest.mark.parametrize("kind", list(OPENCV_DEFOCUS_SHA))
def test_defocus_blur_equals_the_recorded_opencv_output(kind):
    img = _reference_images()[kind]
    for s in SEVERITIES:
        digest = hashlib.sha256(corrupt(img, "defocus_blur", s, seed=0).numpy().tobytes()).hexdigest()[:16]
        assert digest == OPENCV_DEFOCUS_SHA[kind][s - 1], s


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
