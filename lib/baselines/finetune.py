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
peak learning rate (``lr``, default ``train.lr``) are the fine-tune's own
(``baselines.finetune``, :class:`lib.config.FinetuneConfig`).

The control for those extra epochs is :func:`continued_map_baseline`: the same fine-tune of the
MAP adapters without any method (no dropout, no gates). A trained baseline's gain over it is the
method's; its gain over the MAP model alone may be the extra training's.
"""

from __future__ import annotations

import copy
import dataclasses
import json

import torch

from lib.artifacts import cached
from lib.baselines.result import (BaselineResult, Row, baselines_config, deterministic_probs, forward_ms, load, save,
                                  timing_batch, timing_key)
from lib.config import Config, FinetuneConfig, TrainConfig
from lib.pipeline import MapRun, numerics
from lib.train import FitSpec, fit


def finetune_spec(train: TrainConfig, ft: FinetuneConfig) -> FitSpec:
    """The :class:`lib.train.FitSpec` of the fine-tune: the MAP recipe of ``train`` with the
    epochs, peak learning rate and warm-up of ``ft`` (module docstring)."""
    return FitSpec(epochs=ft.epochs, batch_size=train.batch_size, lr=train.lr if ft.lr is None else ft.lr,
                   warmup_epochs=ft.warmup_epochs, grad_clip=train.grad_clip, augment=train.augment,
                   l2=train.weight_decay, compile=train.compile)


def continued_map_baseline(cfg: Config, run: MapRun, device: torch.device) -> BaselineResult:
    """The control of the trained baselines: a copy of the MAP model of ``run`` fine-tuned for
    ``baselines.finetune.epochs`` more with the MAP recipe (:func:`finetune_spec`; data order
    seeded by the run's seed; resumable), one row ``'MAP, fine-tuned further'``
    (:mod:`lib.baselines.result`). Record: ``history.json``."""
    bc = baselines_config(cfg)
    spec = finetune_spec(cfg.train, bc.finetune)

    def compute(st) -> None:
        model = copy.deepcopy(run.model)
        trainable = [p for p in model.parameters() if p.requires_grad]
        history = fit(model, trainable, run.splits.train, run.splits.val, spec, preprocess=run.preprocess,
                      device=device, seed=run.seed, ckpt=st.file("checkpoint.pt"), desc=f"MAP further, seed {run.seed}")
        st.file("history.json").write_text(json.dumps(history, indent=1))
        x = timing_batch(run, bc, device)
        ms = forward_ms(model, x, bc, device)
        save(st, {"MAP, fine-tuned further": Row(*deterministic_probs(model, run, device), ms, 1)},
             {"train_seconds": sum(r["seconds"] for r in history), "extra_params": 0, "peak_mib": None,
              "map_ms_per_image": forward_ms(run.model, x, bc, device),
              "training": {"kind": "fine-tuned from the MAP adapters", **dataclasses.asdict(spec)}})

    inputs = {"finetune": dataclasses.asdict(spec), "timing": timing_key(bc), "numerics": numerics(device)}
    return load(cached("baseline_continued_map", inputs, code=__name__, compute=compute, upstream=[run.stage]),
                "continued MAP")
