"""LoRA deep ensembles: M independently seeded LoRA fine-tunes of the same backbone.

The predictive is the mean of the members' softmax outputs (lakshminarayanan2017simple),

    p(y | x) = (1/M) Σ_m softmax(f_m(x)),

each member ``f_m`` a LoRA + head fine-tune of one frozen backbone, as in LoRA-Ensemble
(muhlematter2024lora) and the ensemble baselines of Laplace-LoRA (yang2024bayesian) and BLoB
(wang2024blob). A member differs from the others only in its seed: the head and LoRA ``A``
initialisation and the data order (:func:`lib.pipeline.map_run`), so member ``j`` of study seed
``s`` is the cached MAP run of seed ``s + j·stride`` (:func:`member_seeds`; member 0 is the MAP
model itself). Ensembles are nested: the M = 3 ensemble is the first three members of the M = 5
one (:func:`ensemble_probs` with ``m``), so the two sizes share their training cost.

Cost (:class:`EnsembleCost`): M× training (M fine-tunes), M× inference (M forward passes per
image) and M× adapter storage, relative to the one MAP model.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Mapping, Sequence

import torch
from torch import nn

from lib.config import _at_least, _build
from lib.data import Preprocess, Split
from lib.train import predict_logits


@dataclass(frozen=True)
class EnsembleConfig:
    """``sizes``: the ensemble sizes M reported (nested, the largest is trained); ``seed_stride``:
    member ``j`` of study seed ``s`` is trained with seed ``s + j·seed_stride``. A stride larger
    than the seed range keeps every ensemble's members apart from the other study seeds' MAP
    models (independent ensembles, (M − 1)× extra fine-tunes per seed); stride 1 with contiguous
    study seeds reuses their MAP runs as members (overlapping ensembles, only M − 1 extra
    fine-tunes in all: the cheap choice under a time budget)."""

    sizes: tuple[int, ...] = (3, 5)
    seed_stride: int = _at_least(1000, 1)

    def __post_init__(self) -> None:
        if not self.sizes or any(m < 1 for m in self.sizes):
            raise ValueError(f"ensemble.sizes is {list(self.sizes)}; give one or more sizes M ≥ 1")

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], source: str = "params") -> "EnsembleConfig":
        """Build from a mapping, rejecting unknown keys and out-of-range values (``ParamsError``)."""
        return _build(cls, d, source, "ensemble.")


@dataclass(frozen=True)
class EnsembleCost:
    """Cost of an M-member ensemble: ``train_seconds`` summed over the members' fine-tunes,
    ``forward_passes`` per test image (M), ``adapter_params`` (M × one member's LoRA + head
    parameters) and the factors relative to one MAP model (M for all three)."""

    members: int
    train_seconds: float
    forward_passes: int
    adapter_params: int
    train_factor: float
    inference_factor: float


def member_seeds(seed: int, m: int, stride: int) -> list[int]:
    """Seeds of the ``m`` members of study seed ``seed``: ``seed + j·stride``, j = 0..m−1."""
    if m < 1:
        raise ValueError(f"m is {m}; an ensemble needs at least one member")
    if stride < 1:
        raise ValueError(f"stride is {stride}; use a positive seed stride")
    return [seed + j * stride for j in range(m)]


def train_members(run: Callable[[int], Any], seed: int, m: int, stride: int) -> list[Any]:
    """Train (or load from cache) the ``m`` members: ``run(s)`` for every seed of
    :func:`member_seeds` (in the study ``run = lambda s: map_run(cfg, s, device)``, which caches
    each member as the MAP stage of its seed)."""
    return [run(s) for s in member_seeds(seed, m, stride)]


def member_probs(models: Sequence[nn.Module], split: Split, *, preprocess: Preprocess, device: torch.device,
                 batch_size: int = 256) -> torch.Tensor:
    """Softmax outputs of every member on ``split``: (M, N, C), float32 on CPU (each member's
    deterministic logits in eval mode, as :func:`lib.train.predict_logits`)."""
    if not models:
        raise ValueError("models is empty: an ensemble needs at least one member")
    return torch.stack([predict_logits(m, split, preprocess=preprocess, device=device, batch_size=batch_size).softmax(-1)
                        for m in models])


def ensemble_probs(probs: torch.Tensor, m: int | None = None) -> torch.Tensor:
    """The ensemble predictive ``(1/M) Σ_m p_m`` of the first ``m`` members (all by default).

    ``probs``: (M_total, N, C) member probabilities; returns (N, C). Formula and citation: module
    docstring.
    """
    if probs.ndim != 3:
        raise ValueError(f"probs must have shape (M, N, C); got {tuple(probs.shape)}")
    m = probs.shape[0] if m is None else m
    if not 1 <= m <= probs.shape[0]:
        raise ValueError(f"m is {m}; choose 1 ≤ m ≤ {probs.shape[0]} (the members available)")
    return probs[:m].mean(0)


def ensemble_cost(histories: Sequence[Sequence[Mapping[str, float]]], adapter_params: int) -> EnsembleCost:
    """Cost of the ensemble whose members trained with ``histories`` (one per member, rows with
    ``seconds`` per epoch as :func:`lib.train.fit` returns) and have ``adapter_params`` trainable
    parameters each (``lib.model.count_parameters``: lora + head)."""
    m = len(histories)
    if m < 1:
        raise ValueError("histories is empty: an ensemble needs at least one member")
    seconds = float(sum(row["seconds"] for h in histories for row in h))
    return EnsembleCost(members=m, train_seconds=seconds, forward_passes=m, adapter_params=m * adapter_params,
                        train_factor=float(m), inference_factor=float(m))
