"""How large a profile's study is: its backbone (blocks, parameters, tokens) and where its weights come from.

The Summary and the setup chapter state the scale of the study from these values, so that no
number of blocks, parameters or pre-training images is typed into the prose. The architecture is
built on PyTorch's ``meta`` device (shapes only: no weights are drawn, loaded or downloaded), so
the scale of any profile, also one for a GPU, is known on any machine.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import timm
import torch

from lib.backbone import BackboneRecord
from lib.config import Config, load_params, params_path

REFERENCE_PROFILE = "vit-b16-cifar100"
"""The reference setting of the question: an ImageNet-pre-trained ViT-B/16 with LoRA on CIFAR-100."""

GPU_PROFILES = ("cifar10-transfer", REFERENCE_PROFILE)
"""The larger settings, for a machine with a GPU: the project's own pre-training at patch 4 (65
tokens), and the reference setting."""

Weights = Literal["random", "hub", "project"]
"""Where a backbone's weights come from: a random initialisation (frozen), pre-trained weights from
the timm hub, or pre-trained from scratch by this project (``pretrain`` section)."""


@dataclass(frozen=True)
class ModelScale:
    """The scale of a profile's study.

    ``blocks``: transformer blocks; ``parameters``: the backbone's parameters, the classification
    head left out (fine-tuning draws a new one); ``tokens``: patches plus prefix tokens of one
    image; ``weights``: :data:`Weights`; ``pretrain_images``: images of one pre-training epoch and
    ``pretrain_epochs`` (from the backbone's record, None where it is not at hand); ``synthetic``:
    whether the data are the synthetic images; ``reference``: whether this is :data:`REFERENCE_PROFILE`.
    """

    profile: str
    blocks: int
    parameters: int
    tokens: int
    weights: Weights
    pretrain_images: int | None
    pretrain_epochs: int | None
    synthetic: bool
    reference: bool


def model_scale(cfg: Config, backbone: BackboneRecord | None = None) -> ModelScale:
    """The :class:`ModelScale` of ``cfg``; ``backbone`` (:func:`lib.backbone.backbone_record`, e.g.
    :attr:`lib.study.Study.backbone`) supplies the pre-training images and epochs."""
    with torch.device("meta"):
        model = timm.create_model(cfg.model.name, pretrained=False, **cfg.model.kwargs)
    parameters = sum(p.numel() for name, p in model.named_parameters() if not name.startswith("head."))
    weights: Weights = "project" if cfg.pretrain is not None else "hub" if cfg.model.pretrained else "random"
    return ModelScale(
        profile=cfg.profile, blocks=len(model.blocks), parameters=parameters,
        tokens=model.patch_embed.num_patches + model.num_prefix_tokens, weights=weights,
        pretrain_images=None if backbone is None else backbone.images,
        pretrain_epochs=None if backbone is None else backbone.epochs,
        synthetic=cfg.data.name == "synthetic", reference=cfg.profile == REFERENCE_PROFILE,
    )


def profile_scale(profile: str) -> ModelScale:
    """:func:`model_scale` of ``params/<profile>.yml`` (its data need not be present)."""
    params = load_params(params_path(profile), check_data=False)
    return model_scale(Config.from_dict(params, source=f"params/{profile}.yml"))
