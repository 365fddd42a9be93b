"""MC dropout on the LoRA adapters: peft's ``lora_dropout`` kept on at test time.

A LoRA map with adapter dropout computes ``y = W x + s · B A (m ⊙ x) / (1 − p)``, m_i ~ Bernoulli(1 − p)
(peft's ``lora_dropout``, an ``nn.Dropout`` on the adapter input). Trained with dropout rate p and
kept on at test time, K stochastic forward passes approximate the predictive of the variational
posterior that dropout defines (gal2016dropout):

    p(y | x) ≈ (1/K) Σ_k softmax(f(x; m_k)),

the baseline "MC dropout" of Laplace-LoRA (yang2024bayesian) and BLoB (wang2024blob). Only the
LoRA dropout modules run in train mode; the rest of the network (timm's attention, projection
and head dropout, stochastic depth) stays in eval mode (:func:`lora_dropout_on`). The masks come
from torch's global stream, forked and seeded with ``seed`` for the duration
(``torch.random.fork_rng``), so a call is deterministic and leaves the global stream as found.

Training. The dropout network starts from the MAP adapters of its seed (:func:`with_lora_dropout`
copies the MAP model and puts dropout of rate p on every LoRA input) and is fine-tuned briefly
with the MAP recipe (:mod:`lib.baselines.finetune`). The same network evaluated without dropout
(eval mode, :func:`lib.train.predict_logits`) is reported beside its MC predictive, which
separates the regularisation that training with dropout brings from the averaging over masks.
Cost: the brief fine-tune and K forward passes per image (K× inference).
"""

from __future__ import annotations

import copy
import dataclasses
import json
from contextlib import contextmanager
from typing import Iterator

import torch
from torch import nn

from lib.artifacts import cached
from lib.baselines.finetune import finetune_spec
from lib.baselines.result import (BaselineResult, Row, baselines_config, deterministic_probs, forward_ms, load,
                                  ms_per_image, save, timing_batch, timing_key)
from lib.config import Config
from lib.data import Preprocess, Split, batches
from lib.pipeline import MapRun, numerics
from lib.train import autocast, fit


def with_lora_dropout(model: nn.Module, rate: float) -> nn.Module:
    """A deep copy of the peft ``model`` whose LoRA maps get input dropout of ``rate`` (peft's
    ``lora_dropout``: every adapter's ``nn.Identity`` or ``nn.Dropout`` replaced by
    ``nn.Dropout(rate)``); the weights and everything else are copied unchanged, so in eval mode
    the copy computes exactly what ``model`` does."""
    if not 0.0 < rate < 1.0:
        raise ValueError(f"rate is {rate}; the LoRA dropout rate must be in (0, 1)")
    out = copy.deepcopy(model)
    found = False
    for module in out.modules():
        if hasattr(module, "lora_dropout") and hasattr(module, "lora_A"):
            for name in list(module.lora_dropout.keys()):
                module.lora_dropout[name] = nn.Dropout(rate)
                found = True
    if not found:
        raise ValueError("the model has no LoRA modules: wrap it with lib.model.add_lora first")
    return out


def lora_dropout_modules(model: nn.Module) -> list[nn.Dropout]:
    """The ``nn.Dropout`` modules of peft's LoRA layers (``lora_dropout[adapter]``); empty when
    the adapters were built with rate 0 (peft then uses ``nn.Identity``)."""
    out = []
    for module in model.modules():
        if hasattr(module, "lora_dropout") and hasattr(module, "lora_A"):
            for drop in module.lora_dropout.values():
                if isinstance(drop, nn.Dropout):
                    out.append(drop)
    return out


@contextmanager
def lora_dropout_on(model: nn.Module) -> Iterator[list[nn.Dropout]]:
    """The body runs with ``model`` in eval mode except its LoRA dropout modules (train mode);
    every module's own mode is restored afterwards, also when the body raises."""
    modules = list(model.modules())
    saved = [m.training for m in modules]
    drops = lora_dropout_modules(model)
    try:
        model.eval()
        for d in drops:
            d.train()
        yield drops
    finally:
        for m, t in zip(modules, saved):
            m.training = t


def _rng_devices(device: torch.device) -> list:
    return [device] if device.type == "cuda" else []


@torch.no_grad()
def mc_dropout_samples(model: nn.Module, x: torch.Tensor, *, samples: int, seed: int) -> torch.Tensor:
    """Per-pass probabilities ``softmax(f(x; m_k))``, k = 1..K, of a preprocessed batch ``x``
    (B, 3, H, W): (K, B, C) float32 on ``x``'s device. Seeded (module docstring)."""
    if samples < 1:
        raise ValueError(f"samples is {samples}; MC dropout needs at least one pass")
    device = x.device
    with torch.random.fork_rng(devices=_rng_devices(device)), lora_dropout_on(model):
        torch.manual_seed(seed)
        out = []
        for _ in range(samples):
            with autocast(device):
                out.append(model(x).float().softmax(-1))
    return torch.stack(out)


@torch.no_grad()
def mc_dropout_probs(model: nn.Module, split: Split, *, samples: int, seed: int, preprocess: Preprocess,
                     device: torch.device | str, batch_size: int = 256) -> torch.Tensor:
    """The MC-dropout predictive ``(1/K) Σ_k softmax(f(x; m_k))`` over ``split``: (N, C), float32
    on CPU. The masks are drawn from one stream seeded with ``seed`` for the whole split, batch
    after batch (the result depends on ``batch_size`` only through which masks fall on which image)."""
    if samples < 1:
        raise ValueError(f"samples is {samples}; MC dropout needs at least one pass")
    device = torch.device(device)
    if not lora_dropout_modules(model):
        raise ValueError("the model has no LoRA dropout (rate 0): make it with with_lora_dropout(model, p)")
    out = []
    with torch.random.fork_rng(devices=_rng_devices(device)), lora_dropout_on(model):
        torch.manual_seed(seed)
        for x, _ in batches(split, batch_size, preprocess=preprocess, device=device):
            acc = torch.zeros((), device=device)
            for _ in range(samples):
                with autocast(device):
                    acc = acc + model(x).float().softmax(-1)
            out.append((acc / samples).cpu())
    return torch.cat(out)


def mc_dropout_baseline(cfg: Config, run: MapRun, device: torch.device) -> BaselineResult:
    """MC dropout with LoRA dropout ``baselines.mc_dropout.rate`` (:mod:`lib.baselines.result`):
    the MAP model of ``run`` with dropout on every LoRA input (:func:`with_lora_dropout`),
    fine-tuned with the MAP recipe for ``baselines.finetune.epochs`` (masks and data order seeded
    by the run's seed; resumable from ``checkpoint.pt``), then two rows: ``'MC dropout'``
    (``mc_dropout.samples`` passes, masks seeded by the seed) and ``'MC dropout, no dropout at
    test'`` (the same network in eval mode). Record: ``history.json``."""
    bc = baselines_config(cfg)
    mc, spec = bc.mc_dropout, finetune_spec(cfg.train, bc.finetune)

    def compute(st) -> None:
        model = with_lora_dropout(run.model, mc.rate)
        trainable = [p for p in model.parameters() if p.requires_grad]
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            torch.manual_seed(run.seed)
            history = fit(model, trainable, run.splits.train, run.splits.val, spec, preprocess=run.preprocess,
                          device=device, seed=run.seed, ckpt=st.file("checkpoint.pt"), desc=f"MC dropout seed {run.seed}")
        st.file("history.json").write_text(json.dumps(history, indent=1))
        kw = dict(samples=mc.samples, seed=run.seed, preprocess=run.preprocess, device=device)
        x = timing_batch(run, bc, device)
        ms, mem = ms_per_image(lambda: mc_dropout_samples(model, x, samples=mc.samples, seed=run.seed), x, bc, device)
        rows = {"MC dropout": Row(mc_dropout_probs(model, run.splits.val, **kw),
                                  mc_dropout_probs(model, run.splits.test, **kw), ms, mc.samples),
                "MC dropout, no dropout at test": Row(*deterministic_probs(model, run, device),
                                                      forward_ms(model, x, bc, device), 1)}
        save(st, rows, {"train_seconds": sum(r["seconds"] for r in history), "extra_params": 0, "peak_mib": mem,
                        "map_ms_per_image": forward_ms(run.model, x, bc, device),
                        "training": {"kind": "fine-tuned from the MAP adapters", **dataclasses.asdict(spec)}})

    inputs = {"mc_dropout": dataclasses.asdict(mc), "finetune": dataclasses.asdict(spec), "timing": timing_key(bc),
              "numerics": numerics(device)}
    return load(cached("baseline_mc_dropout", inputs, code=__name__, compute=compute, upstream=[run.stage]), "MC dropout")
