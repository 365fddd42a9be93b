"""Shared pytest fixtures: a tiny LoRA ViT away from its B=0 initialisation and a small batch."""

from __future__ import annotations

import pytest
import torch

from lib.config import LoraConfig, ModelConfig
from lib.model import add_lora, build_backbone, lora_modules

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
