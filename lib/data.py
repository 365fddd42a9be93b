"""Datasets as uint8 tensors, seeded splits, and on-device preprocessing.

Real data are read from torchvision's on-disk CIFAR layout (``cifar-10-batches-py/``,
``cifar-100-python/``; krizhevsky2009learning) by unpickling directly, so copies whose md5 sums
differ from the official archives (the project's JPEG copy of CIFAR-10) load too. Images stay
uint8 (N, 3, 32, 32) in memory; :class:`Preprocess` resizes and normalises each batch on the
compute device with the model's own pretrained data config.
"""

from __future__ import annotations

import argparse
import pickle
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import torch
import torch.nn.functional as F

from lib.config import CIFAR_DIRS, Config, DataConfig


@dataclass(frozen=True)
class Split:
    """Images ``x`` uint8 (N, 3, H, W) and labels ``y`` int64 (N,)."""

    x: torch.Tensor
    y: torch.Tensor

    def __len__(self) -> int:
        return len(self.y)


@dataclass(frozen=True)
class Splits:
    """Train / validation / test splits and the class names (relabelled 0..C-1)."""

    train: Split
    val: Split
    test: Split
    class_names: tuple[str, ...]

    @property
    def num_classes(self) -> int:
        return len(self.class_names)


def read_cifar(root: Path, name: str, *, download: bool = False) -> tuple[Split, Split, tuple[str, ...]]:
    """Read CIFAR-10/100 (train, test, class names) from ``root/<torchvision folder>``.

    With ``download`` the official archive is fetched by torchvision first (needs internet).
    """
    folder = root / CIFAR_DIRS[name]
    if not folder.is_dir() and download:
        import torchvision

        cls = torchvision.datasets.CIFAR10 if name == "cifar10" else torchvision.datasets.CIFAR100
        try:
            cls(root=str(root), train=True, download=True)
        except Exception as err:  # network errors come in many types
            raise RuntimeError(
                f"data.download: could not download {name} into {root} ({type(err).__name__}); "
                f"place the torchvision folder {CIFAR_DIRS[name]}/ there by hand"
            ) from None
    if not folder.is_dir():
        raise FileNotFoundError(
            f"data.root: {folder} not found; set data.root to the folder that holds "
            f"{CIFAR_DIRS[name]}/ or set data.download: true"
        )
    if name == "cifar10":
        train_files = [folder / f"data_batch_{i}" for i in range(1, 6)]
        test_files, meta_file = [folder / "test_batch"], folder / "batches.meta"
        label_key, names_key = "labels", "label_names"
    else:
        train_files, test_files, meta_file = [folder / "train"], [folder / "test"], folder / "meta"
        label_key, names_key = "fine_labels", "fine_label_names"

    def load(files: list[Path]) -> Split:
        xs, ys = [], []
        for f in files:
            if not f.is_file():
                raise FileNotFoundError(f"data.root: {f} is missing; the {name} folder is incomplete")
            d = _unpickle(f)
            xs.append(torch.as_tensor(d["data"]).reshape(-1, 3, 32, 32))
            ys.append(torch.as_tensor(d[label_key], dtype=torch.int64))
        return Split(torch.cat(xs), torch.cat(ys))

    names = tuple(_text(n) for n in _unpickle(meta_file)[names_key])
    return load(train_files), load(test_files), names


def _text(s: str | bytes) -> str:
    return s.decode("latin1") if isinstance(s, bytes) else s


def _unpickle(path: Path) -> dict:
    """A CIFAR pickle as a dict with str keys (the official files are Python 2 pickles whose keys
    load as str with ``encoding='latin1'``; copies re-pickled from ``encoding='bytes'`` have bytes keys)."""
    with open(path, "rb") as fh:
        d = pickle.load(fh, encoding="latin1")
    return {_text(k): v for k, v in d.items()}


def synthetic_images(n: int, num_classes: int, size: int, noise: float, *, seed: int, class_seed: int = 12345) -> Split:
    """Class-conditional images: a smooth random prototype per class plus pixel noise.

    Prototypes depend only on ``class_seed`` (shared by all splits); ``seed`` draws the labels and
    noise. Pixel = clip(128 + 64·(prototype + noise·ε)), ε ~ N(0, 1); uint8 (n, 3, size, size).
    """
    g = torch.Generator().manual_seed(class_seed)
    coarse = torch.randn(num_classes, 3, 4, 4, generator=g)
    protos = F.interpolate(coarse, size=(size, size), mode="bicubic", align_corners=False)
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(num_classes, (n,), generator=g)
    x = protos[y] + noise * torch.randn(n, 3, size, size, generator=g)
    return Split((128 + 64 * x).clamp(0, 255).to(torch.uint8), y)


def select_classes(split: Split, classes: tuple[int, ...]) -> Split:
    """Keep examples of ``classes`` and relabel them 0..k-1 in the given order."""
    lut = torch.full((int(split.y.max()) + 1,), -1, dtype=torch.int64)
    lut[torch.tensor(classes)] = torch.arange(len(classes))
    keep = lut[split.y] >= 0
    return Split(split.x[keep], lut[split.y[keep]])


def per_class_subset(split: Split, per_class: int, *, generator: torch.Generator) -> Split:
    """A random subset with at most ``per_class`` examples of each class."""
    perm = torch.randperm(len(split), generator=generator)
    y = split.y[perm]
    rank = torch.zeros_like(y)
    for c in y.unique():
        idx = (y == c).nonzero().squeeze(1)
        rank[idx] = torch.arange(len(idx))
    keep = perm[rank < per_class].sort().values
    return Split(split.x[keep], split.y[keep])


def load_splits(cfg: DataConfig, root: Path) -> Splits:
    """Train / validation / test splits of ``cfg`` (validation carved from train, ``split_seed``)."""
    g = torch.Generator().manual_seed(cfg.split_seed)
    if cfg.name == "synthetic":
        s = cfg.synthetic
        make = lambda n, seed: synthetic_images(n, cfg.num_classes, s.native_size, s.noise, seed=seed)  # noqa: E731
        base = 1000 * cfg.split_seed
        return Splits(
            make(s.n_train, base + 1), make(s.n_val, base + 2), make(s.n_test, base + 3),
            tuple(f"class {c}" for c in range(cfg.num_classes)),
        )
    train, test, names = read_cifar(root, cfg.name, download=cfg.download)
    if cfg.classes is not None:
        train, test = select_classes(train, cfg.classes), select_classes(test, cfg.classes)
        names = tuple(names[c] for c in cfg.classes)
    if len(names) != cfg.num_classes:
        raise ValueError(
            f"data.num_classes is {cfg.num_classes} but the selected data have {len(names)} classes; "
            f"set data.num_classes: {len(names)}"
        )
    if cfg.val_size >= len(train):
        raise ValueError(f"data.val_size {cfg.val_size} must be smaller than the training set ({len(train)})")
    perm = torch.randperm(len(train), generator=g)
    val = Split(train.x[perm[: cfg.val_size]], train.y[perm[: cfg.val_size]])
    train = Split(train.x[perm[cfg.val_size:]], train.y[perm[cfg.val_size:]])
    if cfg.train_per_class is not None:
        train = per_class_subset(train, cfg.train_per_class, generator=g)
    if cfg.test_size is not None:
        idx = torch.randperm(len(test), generator=g)[: cfg.test_size].sort().values
        test = Split(test.x[idx], test.y[idx])
    return Splits(train, val, test, names)


@dataclass(frozen=True)
class Preprocess:
    """uint8 images → normalised float input of the model, on the batch's device.

    ``x = (resize(u / 255) − mean) / std`` with the model's pretrained mean, std, interpolation and
    input size; optional training augmentation: random crop with 4-pixel reflection padding (at the
    native resolution) and horizontal flip, drawn from an explicit generator.
    """

    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    size: tuple[int, int]
    interpolation: str = "bicubic"

    @classmethod
    def from_data_config(cls, dc: dict) -> "Preprocess":
        """From timm's ``resolve_data_config`` dict (``mean``, ``std``, ``input_size`` (3, H, W),
        ``interpolation``), so the preprocessing follows the model's pretrained config."""
        return cls(tuple(dc["mean"]), tuple(dc["std"]), tuple(dc["input_size"][1:]), dc["interpolation"])

    def __call__(self, x: torch.Tensor, *, augment: bool = False, generator: torch.Generator | None = None) -> torch.Tensor:
        x = x.float().div_(255)
        if augment:
            x = _augment(x, generator)
        if tuple(x.shape[-2:]) != self.size:
            mode = "bicubic" if self.interpolation == "bicubic" else "bilinear"
            x = F.interpolate(x, size=self.size, mode=mode, align_corners=False, antialias=True)
        mean = torch.tensor(self.mean, device=x.device).view(1, 3, 1, 1)
        std = torch.tensor(self.std, device=x.device).view(1, 3, 1, 1)
        return (x - mean) / std


def _augment(x: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    n, _, h, w = x.shape
    padded = F.pad(x, (4, 4, 4, 4), mode="reflect")
    dx = torch.randint(9, (n,), generator=generator).to(x.device)
    dy = torch.randint(9, (n,), generator=generator).to(x.device)
    rows = (dy.view(n, 1) + torch.arange(h, device=x.device)).view(n, 1, h, 1).expand(n, 3, h, w + 8)
    x = padded.gather(2, rows)
    cols = (dx.view(n, 1) + torch.arange(w, device=x.device)).view(n, 1, 1, w).expand(n, 3, h, w)
    x = x.gather(3, cols)
    flip = (torch.rand(n, generator=generator) < 0.5).to(x.device).view(n, 1, 1, 1)
    return torch.where(flip, x.flip(3), x)


def batches(
    split: Split,
    batch_size: int,
    *,
    preprocess: Preprocess,
    device: torch.device | str,
    shuffle: bool = False,
    generator: torch.Generator | None = None,
    augment: bool = False,
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Yield (inputs float (B, 3, H, W), labels int64 (B,)) on ``device``.

    Shuffling and augmentation draw from ``generator`` only, so an epoch is reproducible from it.
    """
    n = len(split)
    order = torch.randperm(n, generator=generator) if shuffle else torch.arange(n)
    for i in range(0, n, batch_size):
        idx = order[i : i + batch_size]
        x = split.x[idx].to(device, non_blocking=True)
        yield preprocess(x, augment=augment, generator=generator), split.y[idx].to(device, non_blocking=True)


def splits_for(cfg: Config) -> Splits:
    """The fine-tuning splits of a profile."""
    return load_splits(cfg.data, cfg.data_root)


def pretrain_splits(cfg: Config) -> Splits:
    """Splits for backbone pre-training on ``pretrain.classes`` (cifar10-transfer profile)."""
    if cfg.pretrain is None:
        raise ValueError(f"params for profile '{cfg.profile}' have no pretrain section")
    data = DataConfig(
        name=cfg.data.name, root=cfg.data.root, download=cfg.data.download,
        classes=cfg.pretrain.classes, num_classes=len(cfg.pretrain.classes),
        val_size=cfg.data.val_size, split_seed=cfg.data.split_seed,
    )
    return load_splits(data, cfg.data_root)


def materialize_cifar10(source: Path, root: Path) -> Path:
    """Write ``root/cifar-10-batches-py`` from the JPEG pack in ``source`` (its materialize.py)."""
    script = source / "materialize.py"
    if not script.is_file():
        raise FileNotFoundError(f"{script} not found; pass the folder of the CIFAR-10 JPEG pack as --source")
    subprocess.run([sys.executable, str(script), str(root)], check=True)
    return root / CIFAR_DIRS["cifar10"]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m lib.data")
    sub = parser.add_subparsers(dest="cmd", required=True)
    mat = sub.add_parser("materialize-cifar10", help="write the torchvision CIFAR-10 layout from the JPEG pack")
    mat.add_argument("root", type=Path, help="data root, e.g. data")
    mat.add_argument("--source", type=Path, default=Path("../shared/data/cifar10-jpeg"))
    args = parser.parse_args(argv)
    print(materialize_cifar10(args.source.resolve(), args.root))


if __name__ == "__main__":
    main()
