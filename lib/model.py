"""timm Vision Transformers with peft LoRA adapters on every block's projections.

LoRA (hu2022lora) adds ``ΔW = (α/r)·B·A`` to the frozen weight ``W`` of each targeted linear map:
``qkv`` and ``proj`` of the attention and ``fc1``/``fc2`` of the MLP of every transformer block
(dosovitskiy2021image). The patch-embedding ``patch_embed.proj`` is never targeted although a
bare ``proj`` pattern would match it. The classifier head is replaced and trained in full.
"""

from __future__ import annotations

import hashlib
import re
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import safetensors.torch
import timm
import torch
from peft import LoraConfig as PeftLoraConfig
from peft import PeftModel, get_peft_model
from torch import nn

from lib.config import LoraConfig, ModelConfig
from lib.paths import ROOT

TARGET_PATHS = {"qkv": "attn.qkv", "proj": "attn.proj", "fc1": "mlp.fc1", "fc2": "mlp.fc2"}
_BLOCK_RE = re.compile(r"(?:^|\.)blocks\.(\d+)\.(attn\.qkv|attn\.proj|mlp\.fc1|mlp\.fc2)(?:\.|$)")


@dataclass(frozen=True)
class LoraModule:
    """One LoRA-adapted linear map: ``y = W x + scaling · B(A(x))``.

    ``A``: ``nn.Linear(in, r)``, ``B``: ``nn.Linear(r, out)`` (no biases); ``block`` is the
    transformer block index, ``kind`` one of ``qkv``, ``proj``, ``fc1``, ``fc2``.
    """

    name: str
    block: int
    kind: str
    A: nn.Linear
    B: nn.Linear
    scaling: float


@dataclass(frozen=True)
class ViTParts:
    """A ViT split as ``logits = head(blocks[L-1](…blocks[0](embed(x))))``.

    ``embed``: images (B, 3, H, W) → tokens (B, T, D); ``head``: tokens (B, T, D) → logits (B, C).
    """

    embed: Callable[[torch.Tensor], torch.Tensor]
    blocks: list[nn.Module]
    head: Callable[[torch.Tensor], torch.Tensor]


def build_backbone(
    cfg: ModelConfig, num_classes: int, *, seed: int, device: torch.device | str, init_seed: int = 0
) -> nn.Module:
    """Create ``cfg.name`` from timm with a fresh ``num_classes`` head drawn from ``seed``.

    Weights: ``cfg.checkpoint`` (a local timm-format state-dict file, relative to the repo root or
    absolute) takes precedence over ``cfg.pretrained`` (download from the hub); otherwise the
    random initialisation drawn from ``init_seed`` (the same backbone for every training seed).
    The classifier head is always re-initialised, also when the checkpoint's head has the same shape.
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(init_seed)
        model = _create(cfg)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model.reset_classifier(num_classes)
    return model.to(device)


def _create(cfg: ModelConfig) -> nn.Module:
    kwargs = dict(cfg.kwargs)
    if cfg.checkpoint is not None:
        ckpt = Path(cfg.checkpoint).expanduser()
        ckpt = ckpt if ckpt.is_absolute() else ROOT / ckpt
        if not ckpt.is_file():
            raise FileNotFoundError(
                f"model.checkpoint '{cfg.checkpoint}' not found ({ckpt}); point it at a timm "
                "state-dict file or set it to null and model.pretrained: true"
            )
        if cfg.checkpoint_sha256 is not None:
            actual = file_sha256(ckpt)
            if actual != cfg.checkpoint_sha256:
                raise ValueError(
                    f"model.checkpoint '{cfg.checkpoint}' has SHA-256 {actual}, not model.checkpoint_sha256 "
                    f"{cfg.checkpoint_sha256}: the file was replaced or damaged; restore it (git checkout -- "
                    f"{cfg.checkpoint}) or, for a backbone you retrained (python -m lib.backbone), put its new "
                    "SHA-256 into the params file"
                )
        model = timm.create_model(cfg.name, pretrained=False, **kwargs)
        if ckpt.suffix == ".safetensors":
            state = safetensors.torch.load_file(ckpt, device="cpu")
        else:
            state = torch.load(ckpt, map_location="cpu", weights_only=True)
            state = state.get("state_dict", state) if isinstance(state, dict) else state
        state = {k: v for k, v in state.items() if not k.startswith("head.")}
        own = {k: v for k, v in model.state_dict().items() if not k.startswith("head.")}
        missing = sorted(set(own) - set(state))
        unexpected = sorted(set(state) - set(own))
        mismatched = sorted(k for k in set(own) & set(state) if own[k].shape != state[k].shape)
        if missing or unexpected or mismatched:
            raise ValueError(
                f"model.checkpoint '{cfg.checkpoint}' does not fit {cfg.name} {kwargs}: "
                f"missing {missing[:3]}, unexpected {unexpected[:3]}, wrong shape {mismatched[:3]}"
            )
        model.load_state_dict(state, strict=False)
    else:
        model = timm.create_model(cfg.name, pretrained=cfg.pretrained, **kwargs)
    return model


def file_sha256(path: Path) -> str:
    """Hex SHA-256 of a file's bytes (read in 1 MiB chunks)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def data_config(model: nn.Module) -> dict:
    """Preprocessing of the model's pretrained config (mean, std, interpolation, input size).

    Uses timm's ``resolve_model_data_config``; the input size is the model's own ``img_size``.
    """
    vit = unwrap(model)
    cfg = timm.data.resolve_model_data_config(vit)
    h, w = vit.patch_embed.img_size
    return {
        "mean": tuple(cfg["mean"]),
        "std": tuple(cfg["std"]),
        "interpolation": cfg.get("interpolation", "bicubic"),
        "input_size": (3, h, w),
    }


def add_lora(model: nn.Module, cfg: LoraConfig, *, seed: int) -> PeftModel:
    """Wrap ``model`` with peft LoRA on ``cfg.targets`` of every block; head trained in full.

    Only the LoRA factors and the head require gradients. LoRA ``A`` is initialised from ``seed``
    (peft's Kaiming-uniform), ``B`` at zero so the adapted model starts equal to the backbone.
    No adapter dropout (the MAP network is deterministic, see :class:`lib.config.ModelConfig`);
    the MC-dropout baseline adds it to a copy (:func:`lib.baselines.mc_dropout.with_lora_dropout`).
    """
    unknown = set(cfg.targets) - set(TARGET_PATHS)
    if unknown:
        raise ValueError(f"lora.targets has {sorted(unknown)}; valid targets: {sorted(TARGET_PATHS)}")
    paths = "|".join(re.escape(TARGET_PATHS[t]) for t in cfg.targets)
    peft_cfg = PeftLoraConfig(
        r=cfg.r,
        lora_alpha=cfg.alpha,
        lora_dropout=0.0,
        target_modules=rf".*blocks\.\d+\.({paths})",
        modules_to_save=["head"],
        bias="none",
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        peft_model = get_peft_model(model, peft_cfg)
    return peft_model


def unwrap(model: nn.Module) -> nn.Module:
    """The timm VisionTransformer inside a peft wrapper (or the model itself)."""
    if isinstance(model, PeftModel):
        return model.base_model.model
    return model


def lora_modules(model: nn.Module) -> list[LoraModule]:
    """Every LoRA-adapted linear map, ordered by block then by name."""
    out = []
    for name, module in model.named_modules():
        if not (hasattr(module, "lora_A") and hasattr(module, "lora_B")):
            continue
        match = _BLOCK_RE.search(name)
        if match is None:
            raise ValueError(f"LoRA module '{name}' is not inside a transformer block")
        adapter = module.active_adapters[0]
        out.append(
            LoraModule(
                name=name,
                block=int(match.group(1)),
                kind=match.group(2).split(".")[1],
                A=module.lora_A[adapter],
                B=module.lora_B[adapter],
                scaling=float(module.scaling[adapter]),
            )
        )
    return sorted(out, key=lambda m: (m.block, m.name))


def lora_block_index(model: nn.Module) -> dict[str, int]:
    """Map every LoRA parameter name (as in ``model.named_parameters()``) to its block index."""
    ids = {}
    for m in lora_modules(model):
        for p in (m.A.weight, m.B.weight):
            ids[id(p)] = m.block
    return {name: ids[id(p)] for name, p in model.named_parameters() if id(p) in ids}


def n_blocks(model: nn.Module) -> int:
    """Number of transformer blocks."""
    return len(unwrap(model).blocks)


def vit_parts(model: nn.Module) -> ViTParts:
    """Split a (peft-wrapped) timm ViT into embedding, blocks and head (see :class:`ViTParts`)."""
    vit = unwrap(model)

    def embed(x: torch.Tensor) -> torch.Tensor:
        return vit.norm_pre(vit.patch_drop(vit._pos_embed(vit.patch_embed(x))))

    def head(h: torch.Tensor) -> torch.Tensor:
        return vit.forward_head(vit.norm(h))

    return ViTParts(embed=embed, blocks=list(vit.blocks), head=head)


def set_fused_attention(model: nn.Module, enabled: bool) -> None:
    """Switch timm's fused SDPA attention on or off (forward-mode AD needs it off)."""
    for module in unwrap(model).modules():
        if hasattr(module, "fused_attn"):
            module.fused_attn = enabled


@contextmanager
def fused_attention_off(model: nn.Module) -> Iterator[None]:
    """Run the body with timm's fused SDPA attention off (forward-mode AD needs it off), then
    restore every attention module's own setting, also when the body raises."""
    attn = [m for m in unwrap(model).modules() if hasattr(m, "fused_attn")]
    saved = [m.fused_attn for m in attn]
    try:
        for m in attn:
            m.fused_attn = False
        yield
    finally:
        for m, f in zip(attn, saved):
            m.fused_attn = f


def count_parameters(model: nn.Module) -> dict[str, int]:
    """Numbers of LoRA, head and frozen parameters."""
    lora = sum(m.A.weight.numel() + m.B.weight.numel() for m in lora_modules(model))
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    return {"lora": lora, "head": trainable - lora, "frozen": total - trainable, "total": total}
