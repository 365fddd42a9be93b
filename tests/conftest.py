"""Shared pytest fixtures: a tiny LoRA ViT away from its B=0 initialisation and a small batch."""

from __future__ import annotations

import pytest
import torch

from lib.config import LoraConfig, ModelConfig, load_params
from lib.model import add_lora, build_backbone, lora_modules
from lib.paths import PARAMS

TINY_VIT = ModelConfig(
    name="vit_tiny_patch16_224",
    kwargs=dict(img_size=16, patch_size=4, embed_dim=32, depth=3, num_heads=2),
)


def make_lora_vit(model_cfg: ModelConfig, *, num_classes: int, r: int, seed: int = 0) -> torch.nn.Module:
    """A LoRA ViT in eval mode with every LoRA ``B`` set to small seeded random values (not zero)."""
    model = add_lora(
        build_backbone(model_cfg, num_classes=num_classes, seed=seed, device="cpu"),
        LoraConfig(r=r),
        seed=seed,
    )
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for m in lora_modules(model):
            m.B.weight.copy_(0.05 * torch.randn(m.B.weight.shape, generator=gen))
    return model.eval()


def tiny_study_params(seeds: list[int]) -> dict:
    """The smoke profile shrunk to a 3-block ViT of width 16 on 16-px synthetic images (96 / 48 / 64),
    one epoch, K = 4: the tiny study of tests/test_study.py and tests/test_shift_study.py."""
    d = load_params(PARAMS / "smoke.yml")
    d["seeds"] = list(seeds)
    d["model"]["kwargs"] = dict(img_size=16, patch_size=8, embed_dim=16, depth=3, num_heads=2)
    d["data"]["synthetic"] = dict(n_train=96, n_val=48, n_test=64, native_size=16, noise=1.5)
    d["train"]["epochs"] = 1
    d["laplace"]["fit_size"] = 48
    d["predictive"]["n_samples"] = 4
    d["stats"].update(n_boot=60, n_boot_shapley=20)
    d["baselines"] = None  # not studied here; its ensembles would need as many seeds as their size
    return d


@pytest.fixture
def tiny_lora_vit() -> torch.nn.Module:
    """``vit_tiny_patch16_224`` shrunk to 16 px, 4 px patches (17 tokens), width 32, depth 3, 4 classes, LoRA r=2."""
    return make_lora_vit(TINY_VIT, num_classes=4, r=2)


@pytest.fixture
def tiny_batch() -> tuple[torch.Tensor, torch.Tensor]:
    """Seeded synthetic images (6, 3, 16, 16) and labels (6,) in 0..3."""
    gen = torch.Generator().manual_seed(123)
    return torch.randn(6, 3, 16, 16, generator=gen), torch.randint(0, 4, (6,), generator=gen)


def freeze_all_but_lora(model: torch.nn.Module, blocks: list[int] | None = None) -> list[torch.nn.Parameter]:
    """Only the LoRA weights (of ``blocks``, default all) require gradients; returns them in model order."""
    for p in model.parameters():
        p.requires_grad_(False)
    for m in lora_modules(model):
        if blocks is None or m.block in blocks:
            m.A.weight.requires_grad_(True)
            m.B.weight.requires_grad_(True)
    return [p for p in model.parameters() if p.requires_grad]


def lora_permutation(model: torch.nn.Module, params: list[torch.nn.Parameter], blocks: list[int] | None = None) -> torch.Tensor:
    """Indices into the flat vector of ``params`` (model order, as laplace-torch) in lib.laplace's order."""
    offset, o = {}, 0
    for p in params:
        offset[id(p)] = o
        o += p.numel()
    idx = [
        torch.arange(offset[id(lin.weight)], offset[id(lin.weight)] + lin.weight.numel())
        for m in lora_modules(model)
        if blocks is None or m.block in blocks
        for lin in (m.A, m.B)
    ]
    return torch.cat(idx)


def dense_ggn(model: torch.nn.Module, x: torch.Tensor, weights: list[torch.Tensor]) -> torch.Tensor:
    """Reference ``Σ_n J_nᵀ (diag p_n − p_n p_nᵀ) J_n`` (P × P, float64) by ``torch.func.jacrev``.

    ``weights``: parameter tensors of ``model`` (flattened in that order, row-major).
    """
    names = {id(p): n for n, p in model.named_parameters()}
    keys = [names[id(w)] for w in weights]

    def f(*ws):
        return torch.func.functional_call(model, dict(zip(keys, ws)), (x,))

    jac = torch.func.jacrev(f, argnums=tuple(range(len(weights))))(*[w.detach() for w in weights])
    J = torch.cat([j.reshape(*j.shape[:2], -1) for j in jac], dim=-1).double()
    p = f(*[w.detach() for w in weights]).double().softmax(-1)
    lam = torch.diag_embed(p) - p[:, :, None] * p[:, None, :]
    return torch.einsum("nca,ncd,ndb->ab", J, lam, J)


@pytest.fixture
def one_thread():
    """Run the test with one intra-op torch thread (tiny tensors are slower with a thread pool on a
    busy 2-core machine); restores the previous setting."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


CIFAR10_NAMES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


def dump_cifar_pickle(path, obj: dict, bytes_keys: bool = False) -> None:
    """Pickle ``obj`` (protocol 2) like the CIFAR files; ``bytes_keys`` makes keys and names bytes."""
    import pickle

    if bytes_keys:
        obj = {k.encode(): ([v.encode() for v in obj[k]] if k.endswith("names") else obj[k]) for k in obj}
    with open(path, "wb") as fh:
        pickle.dump(obj, fh, protocol=2)


def write_fake_cifar10(root, per_batch: int = 40, n_test: int = 30, *, bytes_keys: bool = False) -> dict:
    """Fabricated ``root/cifar-10-batches-py/`` of random uint8 images (labels of batch k: (i + k) % 10,
    test: i % 10); returns the arrays written (``train``, ``train_labels``, ``test``, ``test_labels``)."""
    import numpy as np

    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    xs, ys = [], []
    for k in range(1, 6):
        data = rng.integers(0, 256, size=(per_batch, 3072), dtype=np.uint8)
        labels = [(i + k) % 10 for i in range(per_batch)]
        dump_cifar_pickle(folder / f"data_batch_{k}", {
            "batch_label": f"training batch {k} of 5", "labels": labels, "data": data,
            "filenames": [f"img_{k}_{i}.png" for i in range(per_batch)],
        }, bytes_keys)
        xs.append(data)
        ys += labels
    test = rng.integers(0, 256, size=(n_test, 3072), dtype=np.uint8)
    test_labels = [i % 10 for i in range(n_test)]
    dump_cifar_pickle(folder / "test_batch", {
        "batch_label": "testing batch 1 of 1", "labels": test_labels, "data": test,
        "filenames": [f"t_{i}.png" for i in range(n_test)],
    }, bytes_keys)
    dump_cifar_pickle(folder / "batches.meta", {"label_names": CIFAR10_NAMES, "num_cases_per_batch": per_batch, "num_vis": 3072}, bytes_keys)
    return {"train": np.concatenate(xs), "train_labels": np.array(ys), "test": test, "test_labels": np.array(test_labels)}


def selection_frame(sel_se: list[float], boot_se: list[float], stable: list[float]):
    """A ``kappa_selection`` table (the columns of lib.attribution.scale_selection) of len(sel_se) - 1
    single blocks and the all-block posterior, with the given selection and bootstrap SEs and the
    share of resamples that select the same κ."""
    import pandas as pd

    n = len(sel_se)
    return pd.DataFrame({"posterior": [f"single {i}" for i in range(n - 1)] + ["all"], "kappa": [0.5] * n,
                         "stable": stable, "delta": [0.01] * n, "sel_lower": [0.0] * n, "sel_upper": [0.02] * n,
                         "sel_se": sel_se, "boot_se": boot_se,
                         "sel_share": [a / b for a, b in zip(sel_se, boot_se)], "lower": [-0.01] * n,
                         "upper": [0.03] * n, "n_val": [1000] * n})
