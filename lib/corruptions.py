"""CIFAR-10-C corruptions of uint8 32-pixel images, seeded, at five severities.

Each corruption reproduces a function of ``make_cifar_c.py`` of :cite:`hendrycks2019benchmarking`
(the CIFAR-10-C generator, whose constants for 32-pixel images differ from ImageNet-C's) with
numpy, scipy and Pillow instead of scikit-image, OpenCV and Wand. Images are the layout of
:mod:`lib.data`: uint8 ``(N, 3, H, W)`` torch tensors; every corruption returns a uint8 tensor of
the same shape. As in ``make_cifar_c.py`` the float corruptions work on ``x / 255`` in [0, 1],
clip to [0, 1], multiply by 255 and convert with ``np.uint8`` (truncation, not rounding); JPEG and
pixelate go through Pillow on uint8 images.

Randomness comes only from a ``numpy.random.Generator`` seeded by the caller (:func:`corrupt`
derives it from ``seed``, the corruption's name and the severity), never from global state.

Constants (severity 1..5). Each was checked against ``make_cifar_c.py`` of hendrycks/robustness
(``ImageNet-C/create_c/make_cifar_c.py``, last changed in commit ``ca36008``, 2019-01-08): all 60
match. The review of issue 24 ran the original functions beside these on the same images: 11 of
the 12 gave the same uint8 values (the stochastic ones when fed the same random draws) and
``defocus_blur`` did not (below; fixed since). Here the random draws come from a seeded generator
instead of numpy's global stream, so the stochastic ones (noise and fog, ``draws`` in the last column) follow the
original's law with other values; the others (``pixels``) give the original's values:

===================  =======  ==================================================  ========
name                 family   constants                                           output
===================  =======  ==================================================  ========
gaussian_noise       noise    σ = .04, .06, .08, .09, .10                         draws
shot_noise           noise    λ = 500, 250, 100, 75, 50                           draws
impulse_noise        noise    amount = .01, .02, .03, .05, .07                    draws
speckle_noise        noise    σ = .06, .1, .12, .16, .2                           draws
gaussian_blur        blur     σ = .4, .6, .7, .8, 1                               pixels
defocus_blur         blur     (radius, alias σ) = (.3, .4), (.4, .5), (.5, .6),   pixels
                              (1, .2), (1.5, .1)
brightness           weather  ΔV = .05, .1, .15, .2, .3                           pixels
fog                  weather  (strength, decay) = (.2, 3), (.5, 3), (.75, 2.5),   draws
                              (1, 2), (1.5, 1.75); plasma fractal of mapsize 32
contrast             digital  factor = .75, .5, .4, .3, .15                       pixels
jpeg_compression     digital  quality = 80, 65, 58, 50, 40                        pixels
pixelate             digital  scale = .95, .9, .85, .75, .65                      pixels
saturate             digital  (factor, shift) = (.3, 0), (.1, 0), (1.5, 0),       pixels
                              (2, .1), (2.5, .2)
===================  =======  ==================================================  ========

``defocus_blur`` needs the original's float32 arithmetic: ``disk`` builds the aliased disk in
float32 and smooths it with OpenCV's float32 ``GaussianBlur``, whose kernel sums to slightly more
than 1 (by 1.4e-9 to 4.5e-8); the image is then filtered in float64 with that kernel. A float64
kernel sums to 1 within rounding, so flat regions land just below an integer and truncate one
level darker (4.7 % of the values at severity 5 on 1,000 CIFAR-10 test images). :func:`disk_kernel`
reproduces OpenCV's float32 kernel bit for bit in numpy (:func:`gaussian_taps_f32`); with it the
defocused images equal those of OpenCV 3.4.18 and 4.8.1 (``cv2.filter2D``) in every value of
1,000 CIFAR-10 test images at all five severities. OpenCV is not a dependency.

Not implemented (they need image files or ImageMagick, or are pixel loops too slow for the
budget): glass, motion and zoom blur, snow, frost, spatter, elastic transform.
Saturate is not ordered by distance from the clean image: severities 1-2 desaturate (×0.3,
×0.1), 3-5 oversaturate, so severity 3 is closer to the clean image than severity 2.
"""

from __future__ import annotations

import io
import math
import zlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from scipy import ndimage

from lib.artifacts import Stage, cached
from lib.corruption_names import SEVERITIES
from lib.data import Split

__all__ = [
    "Corruption",
    "CORRUPTIONS",
    "rgb_to_hsv",
    "hsv_to_rgb",
    "plasma_fractal",
    "gaussian_taps_f32",
    "disk_kernel",
    "corrupt",
    "subsample_index",
    "corrupt_split",
    "CorruptedSplit",
    "cached_corrupt_split",
]


# ---------------------------------------------------------------------------------------------
# colour space (numpy versions of skimage.color.rgb2hsv / hsv2rgb on the channel axis 1)


def rgb_to_hsv(x: np.ndarray) -> np.ndarray:
    """RGB in [0, 1] → HSV in [0, 1], channels on axis 1 of ``(N, 3, H, W)``.

    ``V = max(r, g, b)``, ``S = (V − min) / V`` (0 where V = min), ``H`` the hexcone hue / 6
    (0 for grey), as ``skimage.color.rgb2hsv`` and ``colorsys.rgb_to_hsv``.
    """
    r, g, b = x[:, 0], x[:, 1], x[:, 2]
    v = x.max(axis=1)
    delta = v - x.min(axis=1)
    grey = delta == 0
    safe = np.where(grey, 1.0, delta)
    s = np.where(grey, 0.0, delta / np.where(v == 0, 1.0, v))
    h = np.where(b == v, 4.0 + (r - g) / safe, 0.0)
    h = np.where(g == v, 2.0 + (b - r) / safe, h)
    h = np.where(r == v, (g - b) / safe, h)
    h = np.where(grey, 0.0, (h / 6.0) % 1.0)
    return np.stack([h, s, v], axis=1)


def hsv_to_rgb(x: np.ndarray) -> np.ndarray:
    """HSV in [0, 1] → RGB in [0, 1] on axis 1 of ``(N, 3, H, W)`` (``skimage.color.hsv2rgb``)."""
    h, s, v = x[:, 0], x[:, 1], x[:, 2]
    hi = np.floor(h * 6)
    f = h * 6 - hi
    p, q, t = v * (1 - s), v * (1 - f * s), v * (1 - (1 - f) * s)
    sector = hi.astype(np.int64) % 6
    table = np.stack([
        np.stack([v, t, p], axis=1), np.stack([q, v, p], axis=1), np.stack([p, v, t], axis=1),
        np.stack([p, q, v], axis=1), np.stack([t, p, v], axis=1), np.stack([v, p, q], axis=1),
    ])
    return np.take_along_axis(table, sector[None, :, None], axis=0)[0]


# ---------------------------------------------------------------------------------------------
# helpers of make_cifar_c.py


def plasma_fractal(mapsize: int, wibbledecay: float, rng: np.random.Generator) -> np.ndarray:
    """Diamond-square plasma fractal ``(mapsize, mapsize)`` in [0, 1] (``make_cifar_c.py``'s
    ``plasma_fractal``, ``wibble`` starting at 100 and divided by ``wibbledecay`` per octave,
    midpoints ``mean / 4 + wibble · U(−wibble, wibble)`` as in the original)."""
    if mapsize < 2 or mapsize & (mapsize - 1):
        raise ValueError(f"mapsize must be a power of two >= 2; got {mapsize}")
    a = np.zeros((mapsize, mapsize))
    step, wibble = mapsize, 100.0

    def wibbled(arr: np.ndarray) -> np.ndarray:
        return arr / 4 + wibble * rng.uniform(-wibble, wibble, arr.shape)

    while step >= 2:
        half = step // 2
        corner = a[0:mapsize:step, 0:mapsize:step]
        square = corner + np.roll(corner, -1, axis=0)
        square = square + np.roll(square, -1, axis=1)
        a[half:mapsize:step, half:mapsize:step] = wibbled(square)
        dr = a[half:mapsize:step, half:mapsize:step]
        ul = a[0:mapsize:step, 0:mapsize:step]
        a[0:mapsize:step, half:mapsize:step] = wibbled(dr + np.roll(dr, 1, axis=0) + ul + np.roll(ul, -1, axis=1))
        a[half:mapsize:step, 0:mapsize:step] = wibbled(dr + np.roll(dr, 1, axis=1) + ul + np.roll(ul, -1, axis=0))
        step //= 2
        wibble /= wibbledecay
    a -= a.min()
    return a / a.max()


def gaussian_taps_f32(sigma: float) -> np.ndarray:
    """OpenCV's ``getGaussianKernel(3, sigma, CV_32F)``: float32 taps (3,) at offsets −1, 0, 1.

    As OpenCV computes them: ``t_i = float32(exp(−x_i² / (2σ²)))`` (in double, rounded to
    float32), ``s = 1 / Σ_i t_i`` (the sum of the float32 values in double) and
    ``k_i = float32(t_i · s)`` (the product in double, rounded to float32).
    """
    if not sigma > 0:
        raise ValueError(f"sigma must be > 0; got {sigma}")
    t = [float(np.float32(math.exp(-0.5 / (sigma * sigma) * x * x))) for x in (-1.0, 0.0, 1.0)]
    s = 1.0 / sum(t)
    return np.array([v * s for v in t], dtype=np.float32)


def _smooth3_f32(a: np.ndarray, taps: np.ndarray, axis: int) -> np.ndarray:
    """One pass of OpenCV's symmetric 3-tap float32 filter along ``axis`` with reflect-101 borders:
    ``k₀ · a_i + k₁ · (a_{i−1} + a_{i+1})``, every operation rounded to float32."""
    p = np.pad(a, [(1, 1) if d == axis else (0, 0) for d in range(a.ndim)], mode="reflect")
    n = a.shape[axis]
    left, mid, right = (np.take(p, np.arange(i, i + n), axis=axis) for i in range(3))
    return mid * taps[1] + (left + right) * taps[0]


def disk_kernel(radius: float, alias_blur: float) -> np.ndarray:
    """Defocus kernel (17, 17) float32: ``make_cifar_c.py``'s ``disk`` for radius ≤ 8.

    The disk ``x² + y² ≤ radius²`` on offsets −8..8 as float32 ones, divided by its float32 sum,
    then ``cv2.GaussianBlur(ksize=(3, 3), sigmaX=alias_blur)``: a separable pass of the taps of
    :func:`gaussian_taps_f32` along the rows, then along the columns, in float32 with reflect-101
    borders (OpenCV's ``BORDER_DEFAULT``). Bit-identical to OpenCV 3.4.18 and 4.8.1 (module docstring).
    """
    if not 0 < radius <= 8:
        raise ValueError(f"radius must be in (0, 8]; got {radius}")
    grid = np.arange(-8, 9)
    xx, yy = np.meshgrid(grid, grid)
    disk = (xx**2 + yy**2 <= radius**2).astype(np.float32)
    disk /= np.sum(disk)
    taps = gaussian_taps_f32(alias_blur)
    return _smooth3_f32(_smooth3_f32(disk, taps, axis=1), taps, axis=0)


# ---------------------------------------------------------------------------------------------
# the corruptions: float ones map x in [0, 1] (N, 3, H, W) to an unclipped float array;
# uint8 ones map uint8 (N, 3, H, W) to uint8


def _gaussian_noise(x: np.ndarray, c: float, rng: np.random.Generator) -> np.ndarray:
    return x + rng.normal(scale=c, size=x.shape)


def _shot_noise(x: np.ndarray, c: float, rng: np.random.Generator) -> np.ndarray:
    return rng.poisson(x * c) / c


def _impulse_noise(x: np.ndarray, c: float, rng: np.random.Generator) -> np.ndarray:
    flipped = rng.random(x.shape) <= c
    salted = rng.random(x.shape) <= 0.5
    out = x.copy()
    out[flipped & salted] = 1.0
    out[flipped & ~salted] = 0.0
    return out


def _speckle_noise(x: np.ndarray, c: float, rng: np.random.Generator) -> np.ndarray:
    return x + x * rng.normal(scale=c, size=x.shape)


def _gaussian_blur(x: np.ndarray, c: float, rng: np.random.Generator) -> np.ndarray:
    return ndimage.gaussian_filter(x, sigma=(0, 0, c, c), mode="nearest", truncate=4.0)


def _defocus_blur(x: np.ndarray, c: tuple[float, float], rng: np.random.Generator) -> np.ndarray:
    kernel = disk_kernel(*c).astype(np.float64)
    return ndimage.correlate(x, kernel[None, None], mode="mirror")


def _brightness(x: np.ndarray, c: float, rng: np.random.Generator) -> np.ndarray:
    hsv = rgb_to_hsv(x)
    hsv[:, 2] = np.clip(hsv[:, 2] + c, 0, 1)
    return hsv_to_rgb(hsv)


def _saturate(x: np.ndarray, c: tuple[float, float], rng: np.random.Generator) -> np.ndarray:
    hsv = rgb_to_hsv(x)
    hsv[:, 1] = np.clip(hsv[:, 1] * c[0] + c[1], 0, 1)
    return hsv_to_rgb(hsv)


def _fog(x: np.ndarray, c: tuple[float, float], rng: np.random.Generator) -> np.ndarray:
    n, _, h, w = x.shape
    size = max(2, 1 << (max(h, w) - 1).bit_length())
    out = np.empty_like(x)
    for i in range(n):
        max_val = x[i].max()
        fog = c[0] * plasma_fractal(size, c[1], rng)[:h, :w]
        out[i] = (x[i] + fog[None]) * max_val / (max_val + c[0])
    return out


def _contrast(x: np.ndarray, c: float, rng: np.random.Generator) -> np.ndarray:
    means = x.mean(axis=(2, 3), keepdims=True)
    return (x - means) * c + means


def _pil_map(x: np.ndarray, fn: Callable[[Image.Image], Image.Image]) -> np.ndarray:
    out = np.empty_like(x)
    for i in range(x.shape[0]):
        out[i] = np.asarray(fn(Image.fromarray(x[i].transpose(1, 2, 0)))).transpose(2, 0, 1)
    return out


def _jpeg(x: np.ndarray, c: int, rng: np.random.Generator) -> np.ndarray:
    def encode(img: Image.Image) -> Image.Image:
        buf = io.BytesIO()
        img.save(buf, "JPEG", quality=c)
        buf.seek(0)
        return Image.open(buf).convert("RGB")

    return _pil_map(x, encode)


def _pixelate(x: np.ndarray, c: float, rng: np.random.Generator) -> np.ndarray:
    def pix(img: Image.Image) -> Image.Image:
        w, h = img.size
        small = img.resize((int(w * c), int(h * c)), Image.BOX)
        return small.resize((w, h), Image.BOX)

    return _pil_map(x, pix)


@dataclass(frozen=True)
class Corruption:
    """A registered corruption.

    Attributes:
        family: 'noise', 'blur', 'weather' or 'digital' (:cite:`hendrycks2019benchmarking`).
        fn: ``fn(x, c, rng)``; on float ``x / 255`` (then clipped and truncated) if ``float_domain``,
            else on uint8 images.
        constants: the constant ``c`` of severities 1..5.
        stochastic: whether ``fn`` draws from ``rng``.
        float_domain: see ``fn``.
    """

    family: str
    fn: Callable[[np.ndarray, Any, np.random.Generator], np.ndarray]
    constants: tuple
    stochastic: bool
    float_domain: bool = True


CORRUPTIONS: Mapping[str, Corruption] = {
    "gaussian_noise": Corruption("noise", _gaussian_noise, (0.04, 0.06, 0.08, 0.09, 0.10), True),
    "shot_noise": Corruption("noise", _shot_noise, (500, 250, 100, 75, 50), True),
    "impulse_noise": Corruption("noise", _impulse_noise, (0.01, 0.02, 0.03, 0.05, 0.07), True),
    "speckle_noise": Corruption("noise", _speckle_noise, (0.06, 0.1, 0.12, 0.16, 0.2), True),
    "gaussian_blur": Corruption("blur", _gaussian_blur, (0.4, 0.6, 0.7, 0.8, 1.0), False),
    "defocus_blur": Corruption(
        "blur", _defocus_blur, ((0.3, 0.4), (0.4, 0.5), (0.5, 0.6), (1.0, 0.2), (1.5, 0.1)), False
    ),
    "brightness": Corruption("weather", _brightness, (0.05, 0.1, 0.15, 0.2, 0.3), False),
    "fog": Corruption("weather", _fog, ((0.2, 3.0), (0.5, 3.0), (0.75, 2.5), (1.0, 2.0), (1.5, 1.75)), True),
    "contrast": Corruption("digital", _contrast, (0.75, 0.5, 0.4, 0.3, 0.15), False),
    "jpeg_compression": Corruption("digital", _jpeg, (80, 65, 58, 50, 40), False, float_domain=False),
    "pixelate": Corruption("digital", _pixelate, (0.95, 0.9, 0.85, 0.75, 0.65), False, float_domain=False),
    "saturate": Corruption(
        "digital", _saturate, ((0.3, 0.0), (0.1, 0.0), (1.5, 0.0), (2.0, 0.1), (2.5, 0.2)), False
    ),
}


def _lookup(name: str, severity: int) -> Corruption:
    if name not in CORRUPTIONS:
        raise ValueError(f"corruption {name!r} is unknown; use one of {', '.join(CORRUPTIONS)}")
    if severity not in SEVERITIES:
        raise ValueError(f"severity must be one of {SEVERITIES}; got {severity!r}")
    return CORRUPTIONS[name]


def corrupt(x: torch.Tensor, name: str, severity: int, *, seed: int) -> torch.Tensor:
    """Corrupt uint8 images ``x`` (N, 3, H, W) with corruption ``name`` at ``severity`` in 1..5.

    Float corruptions return ``uint8(255 · clip(f(x / 255), 0, 1))`` (truncation, as
    ``np.uint8`` in ``make_cifar_c.py`` :cite:`hendrycks2019benchmarking`). The random draws come
    from ``numpy.random.default_rng([seed, crc32(name), severity])``, so a call is a deterministic
    function of (images, name, severity, seed) and different corruptions or severities draw
    independent noise. Returns uint8 (N, 3, H, W) on the device of ``x``.
    """
    corruption = _lookup(name, severity)
    if not isinstance(x, torch.Tensor) or x.dtype != torch.uint8 or x.ndim != 4 or x.shape[1] != 3:
        shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
        dtype = x.dtype if isinstance(x, torch.Tensor) else None
        raise ValueError(f"x must be a uint8 tensor (N, 3, H, W) as lib.data stores images; got {shape} {dtype}")
    rng = np.random.default_rng([seed, zlib.crc32(name.encode()), severity])
    c = corruption.constants[severity - 1]
    arr = x.cpu().numpy()
    if corruption.float_domain:
        out = corruption.fn(arr.astype(np.float64) / 255.0, c, rng)
        out = (np.clip(out, 0.0, 1.0) * 255.0).astype(np.uint8)
    else:
        out = corruption.fn(arr, c, rng)
    return torch.from_numpy(np.ascontiguousarray(out)).to(x.device)


def subsample_index(n: int, max_images: int | None, *, seed: int) -> torch.Tensor:
    """Sorted int64 indices of ``min(n, max_images)`` images drawn without replacement with
    ``torch.Generator().manual_seed(seed)`` (all ``n`` in order when ``max_images`` is None).
    The same for every corruption and severity, so the corrupted sets are paired."""
    if max_images is not None and max_images < 1:
        raise ValueError(f"max_images must be >= 1 or None; got {max_images}")
    if max_images is None or max_images >= n:
        return torch.arange(n)
    g = torch.Generator().manual_seed(seed)
    return torch.randperm(n, generator=g)[:max_images].sort().values


def corrupt_split(split: Split, name: str, severity: int, *, seed: int, max_images: int | None = None) -> tuple[Split, torch.Tensor]:
    """The corrupted copy of a (sub-sampled) split and the indices ``(M,)`` of its images in ``split``.

    Images ``split.x[index]`` are corrupted by :func:`corrupt` with ``seed``; labels are kept.
    """
    index = subsample_index(len(split), max_images, seed=seed)
    return Split(corrupt(split.x[index], name, severity, seed=seed), split.y[index]), index


@dataclass(frozen=True)
class CorruptedSplit:
    """A cached corrupted copy of a split: images and labels ``split``, the indices ``index`` (M,)
    of its images in the clean split, the corruption ``name`` and ``severity``, and its ``stage``."""

    split: Split
    index: torch.Tensor
    name: str
    severity: int
    stage: Stage


def cached_corrupt_split(
    split: Split,
    split_inputs: Mapping[str, Any],
    name: str,
    severity: int,
    *,
    seed: int,
    max_images: int | None = None,
    root: Path | None = None,
) -> CorruptedSplit:
    """:func:`corrupt_split` cached as a ``corrupt`` stage (:mod:`lib.artifacts`).

    ``split_inputs`` identifies the clean split (e.g. the data section and the split's name); the
    stage key also holds the corruption, its constant, the severity, ``seed``, ``max_images`` and the
    code of this module (:func:`lib.artifacts.cached`).
    The stage file ``split.pt`` holds ``x`` uint8 (M, 3, H, W), ``y`` int64 (M,) and ``index`` int64 (M,).
    """
    corruption = _lookup(name, severity)
    inputs = {
        "split": dict(split_inputs),
        "corruption": name,
        "constant": list(np.atleast_1d(corruption.constants[severity - 1]).tolist()),
        "severity": severity,
        "seed": seed,
        "max_images": max_images,
    }
    def compute(st: Stage) -> None:
        out, index = corrupt_split(split, name, severity, seed=seed, max_images=max_images)
        torch.save({"x": out.x, "y": out.y, "index": index}, st.file("split.pt"))

    st = cached("corrupt", inputs, code=__name__, compute=compute, root=root)
    saved = torch.load(st.file("split.pt"), weights_only=True)
    return CorruptedSplit(Split(saved["x"], saved["y"]), saved["index"], name, severity, st)
