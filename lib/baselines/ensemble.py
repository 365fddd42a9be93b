"""LoRA deep ensembles: M independently seeded LoRA fine-tunes of the same backbone.

The predictive is the mean of the members' softmax outputs (lakshminarayanan2017simple),

    p(y | x) = (1/M) Σ_m softmax(f_m(x)),

each member ``f_m`` a LoRA + head fine-tune of one frozen backbone, as in LoRA-Ensemble
(muhlematter2024lora) and the ensemble baselines of Laplace-LoRA (yang2024bayesian) and BLoB
(wang2024blob). A member differs from the others only in its seed: the head and LoRA ``A``
initialisation and the data order (:func:`lib.pipeline.map_run`).

The members are the study's own MAP models: the ensemble of study seed ``s`` takes the study's
seeds in their order, starting at ``s`` and wrapping around (:func:`member_seeds`), so member 0
is the seed's MAP model itself and the study trains nothing for its ensembles. The price is that
the ensembles of different seeds share members (they are not independent across seeds), and an
ensemble cannot be larger than the study's number of seeds. Ensembles are nested: the M = 3
ensemble is the first three members of the M = 5 one (:func:`ensemble_probs` with ``m``).

Cost (:class:`EnsembleCost`), what a user who starts from one MAP model pays: M − 1 further
fine-tunes (the members' own training times, though the study reuses them), M forward passes per
image and M× the adapter storage.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Mapping, Sequence

import torch
from torch import nn

from lib.artifacts import cached
from lib.baselines.result import BaselineResult, Row, baselines_config, forward_ms, load, save, timing_batch, timing_key
from lib.config import Config
from lib.data import Preprocess, Split
from lib.model import count_parameters
from lib.pipeline import MapRun, map_run, numerics
from lib.train import predict_logits


@dataclass(frozen=True)
class EnsembleCost:
    """Cost of an M-member ensemble over one MAP model: ``extra_train_seconds``, the summed
    training time of members 1..M−1; ``forward_passes`` per test image (M); ``extra_params``
    ((M − 1) × one member's LoRA + head parameters)."""

    members: int
    extra_train_seconds: float
    forward_passes: int
    extra_params: int


def member_seeds(seed: int, m: int, seeds: Sequence[int]) -> list[int]:
    """The ``m`` members of study seed ``seed``: the study ``seeds`` in order from ``seed`` on,
    wrapping around (``member_seeds(2, 3, [0, 1, 2, 3]) == [2, 3, 0]``)."""
    seeds = list(seeds)
    if seed not in seeds:
        raise ValueError(f"seed {seed} is not one of the study's seeds {seeds}")
    if not 1 <= m <= len(seeds):
        raise ValueError(f"an ensemble of {m} members needs {m} study seeds, the profile has {len(seeds)} "
                         f"({seeds}); add seeds or lower baselines.ensemble.sizes")
    start = seeds.index(seed)
    return [seeds[(start + j) % len(seeds)] for j in range(m)]


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
    """Cost of the ensemble whose members trained with ``histories`` (one per member, member 0
    the MAP model itself; rows with ``seconds`` per epoch as :func:`lib.train.fit` returns) and
    have ``adapter_params`` trainable parameters each (``lib.model.count_parameters``: lora + head)."""
    m = len(histories)
    if m < 1:
        raise ValueError("histories is empty: an ensemble needs at least one member")
    seconds = float(sum(row["seconds"] for h in histories[1:] for row in h))
    return EnsembleCost(members=m, extra_train_seconds=seconds, forward_passes=m, extra_params=(m - 1) * adapter_params)


def ensemble_baseline(cfg: Config, run: MapRun, device: torch.device) -> BaselineResult:
    """The LoRA ensembles of ``baselines.ensemble.sizes`` for the seed of ``run`` (rows
    ``'LoRA ensemble, M = m'``, :mod:`lib.baselines.result`): the members are the study's MAP runs
    of :func:`member_seeds` (member 0 is ``run``). Cost per size in ``cost["sizes"]``
    (:class:`EnsembleCost` fields); ``train_seconds`` and ``extra_params`` are the largest size's;
    the prediction time is M × the measured MAP forward pass (the members run one after another)."""
    bc = baselines_config(cfg)
    ec = bc.ensemble
    seeds = member_seeds(run.seed, max(ec.sizes), cfg.seeds)
    runs = [run] + [map_run(cfg, s, device) for s in seeds[1:]]

    def compute(st) -> None:
        kw = dict(preprocess=run.preprocess, device=device)
        val = member_probs([r.model for r in runs], run.splits.val, **kw)
        test = member_probs([r.model for r in runs], run.splits.test, **kw)
        map_ms = forward_ms(run.model, timing_batch(run, bc, device), bc, device)
        n = count_parameters(run.model)
        rows, sizes = {}, {}
        for m in sorted(ec.sizes):
            sizes[str(m)] = dataclasses.asdict(ensemble_cost([r.history for r in runs[:m]], n["lora"] + n["head"]))
            rows[f"LoRA ensemble, M = {m}"] = Row(ensemble_probs(val, m), ensemble_probs(test, m), m * map_ms, m)
        largest = sizes[str(max(ec.sizes))]
        save(st, rows, {"train_seconds": largest["extra_train_seconds"], "extra_params": largest["extra_params"],
                        "peak_mib": None, "map_ms_per_image": map_ms, "sizes": sizes, "member_seeds": seeds,
                        "training": {"kind": "members are the study's MAP models", "member_seeds": seeds}})

    inputs = {"ensemble": dataclasses.asdict(ec), "timing": timing_key(bc), "numerics": numerics(device)}
    return load(cached("baseline_ensemble", inputs, code=__name__, compute=compute, upstream=[r.stage for r in runs]),
                "LoRA ensemble")
