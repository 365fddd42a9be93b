"""The brief fine-tune from the MAP adapters that the trained baselines (MC dropout, variational LoRA) run.

Why a warm start. A baseline trained its own way (another optimiser, no prior, fewer epochs)
differs from the MAP model in two things at once, the recipe and the method, and the table cannot
tell them apart. Training each baseline from scratch with the MAP recipe (``train:``) removes the
confound at the cost of one full fine-tune per method and seed; starting from the MAP adapters of
the same seed and fine-tuning briefly with the same recipe removes it too, and on the 2-core CPU
it is what fits the book's budget (a full fine-tune of the CPU profile is about 280 s per seed; the
trained baselines need it on ≥ 3 seeds each). The baseline then differs from the MAP model by its
method and by ``epochs`` more epochs of training, which the chapter states.

The recipe is the MAP's (:mod:`lib.train`): Adam with the coupled L2 prior λ = ``train.weight_decay``,
linear warm-up over ``warmup_epochs`` then cosine decay to 0, gradient clipping ``train.grad_clip``,
augmentation ``train.augment``, batch size ``train.batch_size``; only the number of epochs and the
peak learning rate (``lr``, default ``train.lr``) are the fine-tune's own.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

from lib.config import TrainConfig, _above, _at_least, _build
from lib.train import FitSpec


@dataclass(frozen=True)
class FinetuneConfig:
    """``epochs`` of the fine-tune, its peak ``lr`` (None: ``train.lr``) and ``warmup_epochs``."""

    epochs: int = _at_least(6, 1)
    lr: float | None = _above(None, 0.0)
    warmup_epochs: float = _at_least(0.5, 0.0)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], source: str = "params") -> "FinetuneConfig":
        """Build from a mapping, rejecting unknown keys and out-of-range values (``ParamsError``)."""
        return _build(cls, d, source, "finetune.")


def finetune_spec(train: TrainConfig, ft: FinetuneConfig) -> FitSpec:
    """The :class:`lib.train.FitSpec` of the fine-tune: the MAP recipe of ``train`` with the
    epochs, peak learning rate and warm-up of ``ft`` (module docstring)."""
    return FitSpec(epochs=ft.epochs, batch_size=train.batch_size, lr=train.lr if ft.lr is None else ft.lr,
                   warmup_epochs=ft.warmup_epochs, grad_clip=train.grad_clip, augment=train.augment,
                   l2=train.weight_decay, compile=train.compile)
