"""The study's first stages: ``backbone`` (pre-training, where a profile does not ship it) → ``map`` (one per
training seed), cached by :func:`lib.artifacts.cached`; the later stages are in :mod:`lib.stages`.

Each stage's key hashes exactly the params it depends on, its upstream keys and the source of
this module's import closure (config, data, model, training; not the statistics), so a changed
value or a fix to the training code retrains what depends on it and nothing else, and nothing is
reused silently.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass

import torch
from torch import nn

from lib.artifacts import Stage, cached
from lib.config import Config, ModelConfig
from lib.data import Preprocess, Splits, pretrain_splits, splits_for
from lib.model import add_lora, build_backbone, data_config
from lib.train import FitSpec, amp_dtype, fit, predict_logits


@dataclass
class MapRun:
    """A trained MAP model of one seed with its data, preprocessing and training history."""

    seed: int
    model: nn.Module
    splits: Splits
    preprocess: Preprocess
    history: list[dict]
    stage: Stage


def resolve_device(cfg: Config) -> torch.device:
    """``device: auto`` picks CUDA when available; ``cuda`` without a GPU is an error."""
    if cfg.device == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("params device is 'cuda' but no GPU is visible; set device: auto or cpu")
    if cfg.device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(cfg.device)


def numerics(device: torch.device) -> dict:
    """What a stage's numbers depend on besides its params: the device type (its kernels and random
    streams differ) and the autocast precision (bf16 on CUDA, none on CPU). Part of every stage key,
    so that results computed on a GPU are never reused on a CPU or the reverse."""
    amp = amp_dtype(device)
    return {"device": device.type, "autocast": None if amp is None else str(amp).removeprefix("torch.")}


def _data_identity(cfg: Config) -> dict:
    data = cfg.section("data")["data"]
    data.pop("root")
    data.pop("download")
    return data


def pretrain_stage(cfg: Config, device: torch.device) -> Stage:
    """Pre-train the backbone from scratch on ``pretrain.classes`` (a ValueError without a pretrain section).

    The full ViT is trained with AdamW (decoupled decay), label smoothing, crop/flip augmentation
    and a cosine schedule; the saved file ``backbone.pt`` is a timm state dict whose head is
    discarded when fine-tuning. The model section's ``checkpoint`` fields are not inputs: they
    name where a profile ships the result of this stage (:mod:`lib.backbone`).
    """
    if cfg.pretrain is None:
        raise ValueError(f"params for profile '{cfg.profile}' have no pretrain section; add one to pre-train a backbone")
    p = cfg.pretrain
    model_cfg = dataclasses.replace(cfg.model, checkpoint=None, checkpoint_sha256=None)

    def pretrain(st: Stage) -> None:
        splits = pretrain_splits(cfg)
        model = build_backbone(model_cfg, splits.num_classes, seed=p.seed, device=device, init_seed=p.seed)
        pre = Preprocess.from_data_config(data_config(model))
        spec = FitSpec(
            epochs=p.epochs, batch_size=p.batch_size, lr=p.lr, warmup_epochs=p.warmup_epochs, grad_clip=1.0,
            augment=p.augment, decoupled_wd=p.weight_decay, label_smoothing=p.label_smoothing,
            compile=p.compile,
        )
        history = fit(model, [q for q in model.parameters()], splits.train, splits.val, spec,
                      preprocess=pre, device=device, seed=p.seed, ckpt=st.file("checkpoint.pt"), desc="pretrain")
        torch.save(model.state_dict(), st.file("backbone.pt"))
        st.file("history.json").write_text(json.dumps(history, indent=1))

    return cached("backbone", {"data": _data_identity(cfg), "model": dataclasses.asdict(model_cfg),
                               "pretrain": dataclasses.asdict(p), "numerics": numerics(device)},
                  code=__name__, compute=pretrain)


def backbone_stage(cfg: Config, device: torch.device) -> Stage | None:
    """The pre-training stage that fine-tuning starts from: None when the profile has no pretrain
    section or ships the pre-trained backbone as ``model.checkpoint`` (then fine-tuning loads that file)."""
    if cfg.pretrain is None or cfg.model.checkpoint is not None:
        return None
    return pretrain_stage(cfg, device)


def _finetune_model_cfg(cfg: Config, backbone: Stage | None) -> ModelConfig:
    if backbone is None:
        return cfg.model
    return dataclasses.replace(cfg.model, pretrained=False, checkpoint=str(backbone.file("backbone.pt")))


def map_run(cfg: Config, seed: int, device: torch.device) -> MapRun:
    """Train (or load) the LoRA MAP model of one seed; saves the trainable weights and history."""
    backbone = backbone_stage(cfg, device)
    splits = splits_for(cfg)
    model = build_backbone(_finetune_model_cfg(cfg, backbone), splits.num_classes, seed=seed, device=device)
    model.requires_grad_(False)
    model = add_lora(model, cfg.lora, seed=seed).to(device)
    pre = Preprocess.from_data_config(data_config(model))
    trainable = [p for p in model.parameters() if p.requires_grad]

    def train(st: Stage) -> None:
        t = cfg.train
        spec = FitSpec(epochs=t.epochs, batch_size=t.batch_size, lr=t.lr, warmup_epochs=t.warmup_epochs,
                       grad_clip=t.grad_clip, augment=t.augment, l2=t.weight_decay, compile=t.compile)
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            torch.manual_seed(seed)
            history = fit(model, trainable, splits.train, splits.val, spec, preprocess=pre, device=device,
                          seed=seed, ckpt=st.file("checkpoint.pt"), desc=f"LoRA seed {seed}")
        torch.save([p.detach().cpu() for p in trainable], st.file("map.pt"))
        st.file("history.json").write_text(json.dumps(history, indent=1))
        for name, split in (("val", splits.val), ("test", splits.test)):
            torch.save(predict_logits(model, split, preprocess=pre, device=device), st.file(f"{name}_logits.pt"))

    st = cached(
        "map",
        {"data": _data_identity(cfg), **cfg.section("model", "lora", "train"), "seed": seed,
         "numerics": numerics(device)},
        code=__name__, compute=train, upstream=[backbone] if backbone else [],
    )
    # The saved weights, whether trained just now or earlier: one path, the same numbers.
    state = torch.load(st.file("map.pt"), map_location=device, weights_only=True)
    with torch.no_grad():
        for p, saved in zip(trainable, state):
            p.copy_(saved)
    model.eval()
    return MapRun(seed, model, splits, pre, json.loads(st.file("history.json").read_text()), st)
