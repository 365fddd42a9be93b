"""lib.data: CIFAR readers on fabricated files in the official layouts, seeded splits, synthetic
images, preprocessing against PIL, batching, and the real CIFAR-10 JPEG copy."""

from __future__ import annotations

import urllib.error
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import CIFAR10_NAMES, dump_cifar_pickle, write_fake_cifar10
from lib.config import Config, DataConfig, SyntheticConfig
from lib.data import (
    Preprocess,
    Split,
    batches,
    load_splits,
    materialize_cifar10,
    per_class_subset,
    pretrain_splits,
    read_cifar,
    select_classes,
    synthetic_images,
)
from lib.paths import ROOT

pytestmark = pytest.mark.usefixtures("one_thread")

JPEG_PACK = ROOT.parent / "shared" / "data" / "cifar10-jpeg"


def make_cifar100(root: Path, n_train: int = 50, n_test: int = 20, *, bytes_keys: bool = False) -> dict:
    """Fabricated ``cifar-100-python/`` with fine and coarse labels."""
    folder = root / "cifar-100-python"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(1)
    out = {}
    for split, n in (("train", n_train), ("test", n_test)):
        data = rng.integers(0, 256, size=(n, 3072), dtype=np.uint8)
        fine = rng.integers(0, 100, size=n).tolist()
        dump_cifar_pickle(folder / split, {"filenames": [f"{split}_{i}.png" for i in range(n)], "batch_label": split,
                               "fine_labels": fine, "coarse_labels": [f // 5 for f in fine], "data": data}, bytes_keys)
        out[split], out[f"{split}_labels"] = data, np.array(fine)
    out["names"] = [f"fine{i}" for i in range(100)]
    dump_cifar_pickle(folder / "meta", {"fine_label_names": out["names"], "coarse_label_names": [f"coarse{i}" for i in range(20)]}, bytes_keys)
    return out


@pytest.mark.parametrize("bytes_keys", [False, True])
def test_read_cifar100_layout(tmp_path, bytes_keys):
    ref = make_cifar100(tmp_path, bytes_keys=bytes_keys)
    train, test, names = read_cifar(tmp_path, "cifar100")
    assert train.x.shape == (50, 3, 32, 32) and train.x.dtype == torch.uint8
    assert test.x.shape == (20, 3, 32, 32)
    assert torch.equal(train.y, torch.as_tensor(ref["train_labels"])) and train.y.dtype == torch.int64
    assert torch.equal(test.y, torch.as_tensor(ref["test_labels"]))
    assert names == tuple(ref["names"]) and all(isinstance(n, str) for n in names)
    # channel-major rows: pixel (c, h, w) of image i is data[i, c*1024 + h*32 + w]
    for i, c, h, w in [(0, 0, 0, 0), (3, 1, 5, 7), (49, 2, 31, 31), (17, 2, 0, 31)]:
        assert train.x[i, c, h, w] == ref["train"][i, c * 1024 + h * 32 + w]


@pytest.mark.parametrize("bytes_keys", [False, True])
def test_read_cifar10_layout(tmp_path, bytes_keys):
    ref = write_fake_cifar10(tmp_path, bytes_keys=bytes_keys)
    train, test, names = read_cifar(tmp_path, "cifar10")
    assert train.x.shape == (200, 3, 32, 32) and test.x.shape == (30, 3, 32, 32)
    assert torch.equal(train.y, torch.as_tensor(ref["train_labels"]))
    assert torch.equal(test.y, torch.as_tensor(ref["test_labels"]))
    assert names == tuple(CIFAR10_NAMES)
    assert torch.equal(train.x.reshape(200, -1), torch.as_tensor(ref["train"]))  # batches 1..5 in order
    assert train.x[41, 2, 3, 4] == ref["train"][41, 2 * 1024 + 3 * 32 + 4]


def test_read_cifar_missing_folder_and_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="data.root"):
        read_cifar(tmp_path, "cifar10")
    write_fake_cifar10(tmp_path)
    (tmp_path / "cifar-10-batches-py" / "data_batch_3").unlink()
    with pytest.raises(FileNotFoundError, match="data_batch_3 is missing"):
        read_cifar(tmp_path, "cifar10")


def test_download_without_network_is_one_line_runtime_error(tmp_path, monkeypatch):
    import torchvision

    calls = []

    def offline(*args, **kwargs):
        calls.append(kwargs)
        raise urllib.error.URLError("Temporary failure in name resolution")

    monkeypatch.setattr(torchvision.datasets, "CIFAR100", offline)
    with pytest.raises(RuntimeError) as err:
        read_cifar(tmp_path, "cifar100", download=True)
    msg = str(err.value)
    assert "\n" not in msg and "data.download" in msg and "URLError" in msg, msg
    assert calls and calls[0]["download"] is True and calls[0]["root"] == str(tmp_path)
    cfg = DataConfig(name="cifar100", download=True, num_classes=100)
    with pytest.raises(RuntimeError, match="data.download"):
        load_splits(cfg, tmp_path)


def _rows(x: torch.Tensor) -> set[bytes]:
    return {bytes(r.numpy()) for r in x.reshape(len(x), -1)}


def test_load_splits_class_subset_relabel_and_counts(tmp_path):
    ref = write_fake_cifar10(tmp_path)
    origin = {bytes(r): int(y) for r, y in zip(ref["train"], ref["train_labels"])}
    origin.update({bytes(r): int(y) for r, y in zip(ref["test"], ref["test_labels"])})
    classes = (7, 5, 9, 6, 8)
    cfg = DataConfig(name="cifar10", classes=classes, num_classes=5, train_per_class=4, val_size=10, split_seed=3)
    s = load_splits(cfg, tmp_path)
    assert s.class_names == tuple(CIFAR10_NAMES[c] for c in classes) and s.num_classes == 5
    assert len(s.val) == 10 and len(s.test) == 15  # 3 test images per class
    assert torch.bincount(s.train.y, minlength=5).tolist() == [4] * 5
    for split in (s.train, s.val, s.test):
        assert split.y.dtype == torch.int64
        for row, y in zip(split.x.reshape(len(split), -1), split.y):
            assert origin[bytes(row.numpy())] == classes[int(y)]  # relabelled in the given order
    train, val = _rows(s.train.x), _rows(s.val.x)
    assert len(train) == 20 and len(val) == 10 and train.isdisjoint(val)
    assert (train | val) <= {bytes(r) for r, y in zip(ref["train"], ref["train_labels"]) if y in classes}
    assert _rows(s.test.x).isdisjoint(train | val)


def test_load_splits_deterministic_in_split_seed(tmp_path):
    write_fake_cifar10(tmp_path)
    cfg = DataConfig(name="cifar10", classes=(0, 1, 2), num_classes=3, train_per_class=5, val_size=12, test_size=6, split_seed=0)
    a, b = load_splits(cfg, tmp_path), load_splits(cfg, tmp_path)
    for sa, sb in ((a.train, b.train), (a.val, b.val), (a.test, b.test)):
        assert torch.equal(sa.x, sb.x) and torch.equal(sa.y, sb.y)
    c = load_splits(DataConfig(**{**cfg.__dict__, "split_seed": 1}), tmp_path)
    assert _rows(c.val.x) != _rows(a.val.x)
    assert _rows(c.train.x) != _rows(a.train.x)
    assert len(c.test) == len(a.test) == 6 and _rows(c.test.x) != _rows(a.test.x)


def test_load_splits_rejects_bad_sizes(tmp_path):
    write_fake_cifar10(tmp_path)
    with pytest.raises(ValueError, match="data.num_classes"):
        load_splits(DataConfig(name="cifar10", classes=(0, 1), num_classes=10), tmp_path)
    with pytest.raises(ValueError, match="data.val_size"):
        load_splits(DataConfig(name="cifar10", classes=(0, 1), num_classes=2, val_size=40), tmp_path)


def test_pretrain_splits_use_pretrain_classes(tmp_path):
    write_fake_cifar10(tmp_path)
    cfg = Config.from_dict({
        "data": {"name": "cifar10", "root": str(tmp_path), "classes": [5, 6], "num_classes": 2, "val_size": 4},
        "pretrain": {"classes": [0, 1, 2]},
    })
    s = pretrain_splits(cfg)
    assert s.class_names == ("airplane", "automobile", "bird")
    assert len(s.train) + len(s.val) == 60 and len(s.val) == 4
    with pytest.raises(ValueError, match="no pretrain section"):
        pretrain_splits(Config())


def test_select_classes_and_per_class_subset():
    split = Split(torch.arange(12, dtype=torch.uint8).view(12, 1, 1, 1).expand(12, 3, 2, 2).clone(), torch.arange(12) % 4)
    sel = select_classes(split, (3, 1))
    assert sel.y.tolist() == [1, 0, 1, 0, 1, 0]
    assert sel.x[:, 0, 0, 0].tolist() == [1, 3, 5, 7, 9, 11]
    sub = per_class_subset(split, 2, generator=torch.Generator().manual_seed(0))
    assert torch.bincount(sub.y).tolist() == [2, 2, 2, 2]
    assert (sub.x[:, 0, 0, 0].long() % 4 == sub.y).all()


def test_synthetic_images_deterministic_and_class_conditional():
    a = synthetic_images(300, 5, 16, 1.5, seed=1)
    b = synthetic_images(300, 5, 16, 1.5, seed=1)
    assert torch.equal(a.x, b.x) and torch.equal(a.y, b.y)
    c = synthetic_images(300, 5, 16, 1.5, seed=2)
    assert not torch.equal(a.x, c.x)
    assert a.x.shape == (300, 3, 16, 16) and a.x.dtype == torch.uint8 and set(a.y.tolist()) == set(range(5))
    # nearest class mean fitted on seed 1 classifies the independent seed-2 images far above chance 0.2
    xa, xc = a.x.float().flatten(1), c.x.float().flatten(1)
    means = torch.stack([xa[a.y == k].mean(0) for k in range(5)])
    acc = (torch.cdist(xc, means).argmin(1) == c.y).float().mean().item()
    assert acc > 0.8, acc
    # with the class information removed (labels shuffled) the same classifier is at chance
    perm = torch.randperm(300, generator=torch.Generator().manual_seed(0))
    means = torch.stack([xa[a.y[perm] == k].mean(0) for k in range(5)])
    assert (torch.cdist(xc, means).argmin(1) == c.y).float().mean().item() < 0.4


def test_load_splits_synthetic():
    cfg = DataConfig(num_classes=4, synthetic=SyntheticConfig(n_train=40, n_val=20, n_test=30, native_size=8))
    s = load_splits(cfg, Path("/nonexistent"))
    assert (len(s.train), len(s.val), len(s.test)) == (40, 20, 30)
    assert s.class_names == ("class 0", "class 1", "class 2", "class 3")
    assert s.train.x.shape == (40, 3, 8, 8)
    assert not torch.equal(s.train.x[:20], s.val.x)
    t = load_splits(cfg, Path("/nonexistent"))
    assert torch.equal(s.test.x, t.test.x)
    u = load_splits(DataConfig(**{**cfg.__dict__, "split_seed": 1}), Path("/nonexistent"))
    assert not torch.equal(s.train.x, u.train.x)


def _pil_resize(x: torch.Tensor, size: tuple[int, int], resample) -> torch.Tensor:
    out = [
        torch.from_numpy(np.array(Image.fromarray(img.numpy(), mode="F").resize(size[::-1], resample)))
        for img in x.reshape(-1, *x.shape[-2:])
    ]
    return torch.stack(out).reshape(*x.shape[:2], *size)


@pytest.mark.parametrize(("interpolation", "resample"), [("bicubic", Image.BICUBIC), ("bilinear", Image.BILINEAR)])
@pytest.mark.parametrize("size", [(48, 48), (20, 12), (16, 16)])
def test_preprocess_matches_pil_resize_and_normalise(interpolation, resample, size):
    u = torch.randint(0, 256, (3, 3, 16, 16), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    mean, std = (0.1, 0.2, 0.3), (0.5, 0.25, 0.125)
    pre = Preprocess(mean, std, size, interpolation)
    got = pre(u)
    ref = _pil_resize(u.float() / 255, size, resample)
    ref = (ref - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)
    assert got.shape == (3, 3, *size) and got.dtype == torch.float32
    assert torch.allclose(got, ref, atol=1e-5)


def test_preprocess_from_data_config():
    pre = Preprocess.from_data_config({"mean": [0.5] * 3, "std": [0.25] * 3, "input_size": (3, 24, 24), "interpolation": "bilinear"})
    assert pre == Preprocess((0.5, 0.5, 0.5), (0.25, 0.25, 0.25), (24, 24), "bilinear")
    assert torch.allclose(Preprocess((0.5,) * 3, (0.25,) * 3, (2, 2))(torch.full((1, 3, 2, 2), 255, dtype=torch.uint8)), torch.full((1, 3, 2, 2), 2.0))


def test_augmentation_is_a_seeded_crop_and_flip():
    n = 6
    u = torch.randint(0, 256, (n, 3, 12, 12), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    pre = Preprocess((0.0,) * 3, (1.0,) * 3, (12, 12))
    a = pre(u, augment=True, generator=torch.Generator().manual_seed(5))
    b = pre(u, augment=True, generator=torch.Generator().manual_seed(5))
    c = pre(u, augment=True, generator=torch.Generator().manual_seed(6))
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    assert not torch.equal(a, pre(u))
    # every output is a 12x12 window of the 4-px reflect-padded image, possibly mirrored
    padded = torch.nn.functional.pad(u.float() / 255, (4, 4, 4, 4), mode="reflect")
    for i in range(n):
        windows = [padded[i, :, dy:dy + 12, dx:dx + 12] for dy in range(9) for dx in range(9)]
        assert any(torch.equal(a[i], w) or torch.equal(a[i], w.flip(2)) for w in windows), i


def test_batches_cover_every_example_once():
    n = 23
    split = Split(torch.randint(0, 256, (n, 3, 4, 4), dtype=torch.uint8, generator=torch.Generator().manual_seed(0)), torch.arange(n))
    pre = Preprocess((0.5,) * 3, (0.5,) * 3, (4, 4))
    out = list(batches(split, 5, preprocess=pre, device="cpu"))
    assert [len(y) for _, y in out] == [5, 5, 5, 5, 3]
    assert torch.cat([y for _, y in out]).tolist() == list(range(n))
    # preprocessed in batches of 5 vs all 23 at once: compared within float32 round-off (values in
    # [-1, 1]; another image differs by >= 2/255 somewhere), not bit for bit across batch sizes
    assert torch.allclose(torch.cat([x for x, _ in out]), pre(split.x), rtol=0, atol=1e-6)
    shuffled = list(batches(split, 5, preprocess=pre, device="cpu", shuffle=True, generator=torch.Generator().manual_seed(0)))
    ys = torch.cat([y for _, y in shuffled])
    assert sorted(ys.tolist()) == list(range(n)) and ys.tolist() != list(range(n))
    assert torch.allclose(torch.cat([x for x, _ in shuffled]), pre(split.x[ys]), rtol=0, atol=1e-6)
    again = torch.cat([y for _, y in batches(split, 5, preprocess=pre, device="cpu", shuffle=True, generator=torch.Generator().manual_seed(0))])
    assert torch.equal(ys, again)


def test_materialize_requires_the_pack(tmp_path):
    with pytest.raises(FileNotFoundError, match="materialize.py not found"):
        materialize_cifar10(tmp_path / "nothing", tmp_path)


@pytest.mark.slow
@pytest.mark.skipif(not JPEG_PACK.is_dir(), reason=f"CIFAR-10 JPEG pack not found at {JPEG_PACK}")
def test_real_cifar10_jpeg_copy(tmp_path):
    folder = materialize_cifar10(JPEG_PACK, tmp_path)
    assert folder == tmp_path / "cifar-10-batches-py" and folder.is_dir()
    train, test, names = read_cifar(tmp_path, "cifar10")
    assert names == tuple(CIFAR10_NAMES)
    assert train.x.shape == (50_000, 3, 32, 32) and test.x.shape == (10_000, 3, 32, 32)
    assert torch.bincount(train.y).tolist() == [5000] * 10
    assert torch.bincount(test.y).tolist() == [1000] * 10
    # channel order: the pack's README gives the per-channel means (125.3, 122.9, 113.9)
    means = train.x.double().mean(dim=(0, 2, 3))
    assert torch.allclose(means, torch.tensor([125.3, 122.9, 113.9], dtype=torch.float64), atol=0.3), means
    cfg = DataConfig(name="cifar10", classes=(5, 6, 7, 8, 9), num_classes=5, train_per_class=100, val_size=1000)
    s = load_splits(cfg, tmp_path)
    assert len(s.train) == 500 and torch.bincount(s.train.y).tolist() == [100] * 5
    assert len(s.val) == 1000 and len(s.test) == 5000
    assert s.class_names == ("dog", "frog", "horse", "ship", "truck")
    assert _rows(s.train.x).isdisjoint(_rows(s.val.x))
