"""The out-of-distribution image sets: near-OOD held-out classes and three far-OOD sets, offline and seeded.

All sets are uint8 ``(n, 3, size, size)`` tensors in the layout of :mod:`lib.data`, built without
network access from files that the installed packages ship, and drawn from an explicit seeded
generator (never global state), so a set is a deterministic function of its arguments and of the
versions of scikit-learn and Pillow (which :func:`cached_ood_images` puts into its stage key).

- **near** (:func:`near_ood_images`): the test images of the dataset's classes that were *not*
  fine-tuned on. For the CIFAR-10 transfer profiles these are the test images of classes 0–4, which
  the backbone saw in pre-training while LoRA and the head were fine-tuned on classes 5–9.
- **natural** (:func:`natural_patches`): patches of the two photographs scikit-learn ships
  (``sklearn.datasets.load_sample_images``: ``china.jpg``, a temple, and ``flower.jpg``, a
  flower; 427 × 640 each). Patch k comes from photograph ``k mod 2``; its side ``s`` is drawn
  log-uniformly in ``[size, 8·size]`` pixels (so it shows anything from fine texture to a whole
  roof or blossom), rounded, its top-left corner uniformly among the positions where it fits, and
  it is resized to ``size`` with Pillow's area-averaging ``BOX`` filter. These are real
  photographs, but only two of them: the patches overlap and are far less diverse than a dataset,
  which the chapter must say when it reads their AUROC.
- **digits** (:func:`digit_images`): the 1,797 handwritten digits scikit-learn ships
  (``load_digits``, 8 × 8, ink 0–16), ``n`` of them drawn without replacement, as dark ink on white
  paper (``255 − 255·v/16``), upsampled bicubically to ``size`` and repeated over the three
  channels. A real image set that shares no content with natural photographs.
- **synthetic** (:func:`synthetic_ood_images`): images of two kinds in equal numbers —
  ``uniform``: i.i.d. uniform pixel values in 0..255 per pixel and channel; ``smooth``: a 4 × 4
  grid of i.i.d. uniform colours upsampled bicubically to full size (smooth colour blobs without
  objects).

:data:`FAR_OOD_SETS` names the far-OOD builders; ``shift.far_ood_sets`` of the params chooses among
them and ``shift.far_ood_images`` sets their size (:class:`lib.config.ShiftConfig`). The OOD
metrics are in :mod:`lib.ood`, the evaluation in :mod:`lib.shift_study`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import PIL
import sklearn
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor

from lib.artifacts import Stage, cached
from lib.config import Config
from lib.data import read_cifar

__all__ = [
    "FAR_OOD_SETS",
    "near_ood_images",
    "natural_patches",
    "digit_images",
    "synthetic_ood_images",
    "OodImages",
    "cached_ood_images",
]

MAX_PATCH_FACTOR = 8
"""The largest patch side of :func:`natural_patches`, as a multiple of ``size``."""


def _check(n: int, size: int) -> None:
    if n < 1 or size < 4:
        raise ValueError(f"n must be >= 1 and size >= 4; got n={n}, size={size}")


def near_ood_images(cfg: Config, *, max_images: int | None = None, seed: int = 0) -> Tensor:
    """Test images of the classes of the dataset that were *not* fine-tuned on, uint8 (M, 3, 32, 32).

    For the CIFAR-10 transfer profiles these are the 5,000 test images of classes 0–4.
    ``max_images`` keeps a sorted random subset drawn with ``torch.Generator().manual_seed(seed)``.
    """
    if cfg.data.name == "synthetic" or cfg.data.classes is None:
        raise ValueError(
            f"profile '{cfg.profile}': near-OOD images need a real dataset with data.classes set "
            "(the held-out classes are the near-OOD set)"
        )
    _, test, _ = read_cifar(cfg.data_root, cfg.data.name, download=cfg.data.download)
    keep = ~torch.isin(test.y, torch.tensor(cfg.data.classes))
    x = test.x[keep]
    if max_images is not None and max_images < len(x):
        idx = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))[:max_images].sort().values
        x = x[idx]
    return x


def natural_patches(n: int, *, seed: int, size: int = 32) -> Tensor:
    """``n`` patches of scikit-learn's two sample photographs, uint8 (n, 3, size, size).

    Patch k: photograph ``k mod 2``; side ``s = round(exp(U(log size, log(8·size))))`` pixels;
    top-left corner uniform over the ``(H − s + 1) × (W − s + 1)`` positions; Pillow ``BOX``
    resize to ``size`` (the mean of the source pixels each target pixel covers). The draws come
    from ``numpy.random.default_rng(seed)`` in the order side, row, column per patch.
    """
    from sklearn.datasets import load_sample_images

    _check(n, size)
    photos = load_sample_images().images
    if any(min(p.shape[:2]) < MAX_PATCH_FACTOR * size for p in photos):
        raise ValueError(f"size {size} is too large for the sample photographs "
                         f"({min(min(p.shape[:2]) for p in photos)} px); use size <= "
                         f"{min(min(p.shape[:2]) for p in photos) // MAX_PATCH_FACTOR}")
    rng = np.random.default_rng(seed)
    out = np.empty((n, size, size, 3), dtype=np.uint8)
    lo, hi = math.log(size), math.log(MAX_PATCH_FACTOR * size)
    for k in range(n):
        photo = photos[k % len(photos)]
        s = int(round(math.exp(rng.uniform(lo, hi))))
        top = int(rng.integers(0, photo.shape[0] - s + 1))
        left = int(rng.integers(0, photo.shape[1] - s + 1))
        crop = Image.fromarray(photo[top:top + s, left:left + s])
        out[k] = np.asarray(crop.resize((size, size), Image.BOX))
    return torch.from_numpy(out.transpose(0, 3, 1, 2).copy())


def digit_images(n: int, *, seed: int, size: int = 32) -> Tensor:
    """``n`` of scikit-learn's 1,797 handwritten digits, uint8 (n, 3, size, size): drawn without
    replacement by ``torch.randperm`` of ``torch.Generator().manual_seed(seed)`` (kept in that
    order), ``255 − 255·v/16`` (dark ink on white), bicubic upsampling to ``size``, rounded and
    clipped, the grey value repeated on the three channels."""
    from sklearn.datasets import load_digits

    _check(n, size)
    digits = torch.as_tensor(load_digits().images, dtype=torch.float32)  # (1797, 8, 8), ink 0..16
    if n > len(digits):
        raise ValueError(f"n is {n} but scikit-learn ships {len(digits)} digits; use n <= {len(digits)}")
    pick = torch.randperm(len(digits), generator=torch.Generator().manual_seed(seed))[:n]
    grey = 255.0 - 255.0 / 16.0 * digits[pick, None]
    up = F.interpolate(grey, size=(size, size), mode="bicubic", align_corners=False)
    return up.round().clamp(0, 255).to(torch.uint8).expand(n, 3, size, size).contiguous()


def synthetic_ood_images(n: int, *, seed: int, size: int = 32) -> Tensor:
    """Synthetic far-OOD images uint8 (n, 3, size, size) (module docstring): the first
    ``ceil(n / 2)`` are ``uniform`` (pixels i.i.d. uniform in 0..255), the rest ``smooth`` (4 × 4
    uniform colours in [0, 255], bicubic upsampling to ``size``, rounded and clipped), all drawn
    from ``torch.Generator().manual_seed(seed)`` in that order."""
    _check(n, size)
    g = torch.Generator().manual_seed(seed)
    n_uniform = (n + 1) // 2
    uniform = torch.randint(0, 256, (n_uniform, 3, size, size), generator=g, dtype=torch.uint8)
    coarse = 255 * torch.rand(n - n_uniform, 3, 4, 4, generator=g)
    smooth = F.interpolate(coarse, size=(size, size), mode="bicubic", align_corners=False)
    return torch.cat([uniform, smooth.round().clamp(0, 255).to(torch.uint8)])


FAR_OOD_SETS: Mapping[str, Callable[..., Tensor]] = {
    "natural": natural_patches,
    "digits": digit_images,
    "synthetic": synthetic_ood_images,
}
"""Far-OOD set name → builder ``(n, *, seed, size) -> uint8 (n, 3, size, size)``."""


@dataclass(frozen=True)
class OodImages:
    """A cached far-OOD set: its ``name``, uint8 ``images`` (n, 3, size, size) and its ``stage``."""

    name: str
    images: Tensor
    stage: Stage


def cached_ood_images(name: str, n: int, *, seed: int, size: int, root: Path | None = None) -> OodImages:
    """The far-OOD set ``name`` of :data:`FAR_OOD_SETS` as an ``ood_images`` stage (:mod:`lib.artifacts`).

    The key holds the set, ``n``, ``seed``, ``size``, the versions of scikit-learn (which ships the
    photographs and digits) and Pillow (which decodes and resizes them) and this module's code
    (:func:`lib.artifacts.cached`), so a new version or a fix makes a new set instead of reusing the
    old one. File: ``images.pt`` (uint8).
    """
    if name not in FAR_OOD_SETS:
        raise ValueError(f"far-OOD set {name!r} is unknown; use one of {', '.join(FAR_OOD_SETS)} (shift.far_ood_sets)")
    inputs = {"set": name, "n": n, "seed": seed, "size": size,
              "versions": {"scikit-learn": sklearn.__version__, "Pillow": PIL.__version__}}
    def compute(st: Stage) -> None:
        torch.save(FAR_OOD_SETS[name](n, seed=seed, size=size), st.file("images.pt"))

    st = cached("ood_images", inputs, code=__name__, compute=compute, root=root)
    return OodImages(name, torch.load(st.file("images.pt"), weights_only=True), st)
