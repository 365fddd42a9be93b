"""What every baseline of one seed returns, how it is stored in its stage, and how its cost is timed.

Every method is a function ``(cfg, run, device) -> BaselineResult`` of the profile (its
``baselines:`` section, :class:`lib.config.BaselinesConfig`), the seed's MAP run
(:func:`lib.pipeline.map_run`) and the device, computed once as a cached stage
(:func:`lib.artifacts.cached`) of the method's own module. A :class:`BaselineResult` holds one or
more *rows* (the predictives the method yields: MC dropout gives its MC predictive and the same
network without dropout; the ensemble one row per size), each with validation and test
probabilities ((N, C) float32) and its prediction cost, and the method's cost and training record.
The stage holds ``probs.pt`` (row → {"val", "test"}) and ``cost.json``.

Cost, measured on the first ``timing_batch`` test images with :func:`lib.deploy.time_call`
(median of ``timing_iters`` calls after one warm-up): ``ms_per_image`` of each row's prediction
and ``map_ms_per_image`` of the deterministic MAP forward pass on the same batch; ``peak_mib``,
the peak extra CUDA memory of the prediction (None on CPU); ``train_seconds``, the training beyond
the MAP model (the fine-tune, the post-hoc fit, or the ensemble's M − 1 further members);
``extra_params``, the floats stored beyond the MAP model (posterior factors, log α, further
members); ``training``, how the method was trained, as data for the chapter's sentence.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from lib.artifacts import Stage
from lib.config import BaselinesConfig, Config
from lib.deploy import time_call
from lib.pipeline import MapRun
from lib.train import autocast, predict_logits


@dataclass(frozen=True)
class Row:
    """One predictive of a method: probabilities on validation (Nv, C) and test (Nt, C), float32
    on CPU, and its measured cost per test image (``ms_per_image``, ``forward_passes``)."""

    val: torch.Tensor
    test: torch.Tensor
    ms_per_image: float
    forward_passes: int


@dataclass(frozen=True)
class BaselineResult:
    """One method of one seed: its ``rows`` (name → :class:`Row`), ``cost`` (module docstring) and ``stage``."""

    method: str
    rows: dict[str, Row]
    cost: dict
    stage: Stage


def baselines_config(cfg: Config) -> BaselinesConfig:
    """The profile's ``baselines`` section; a ValueError naming the key when the profile has none."""
    if cfg.baselines is None:
        raise ValueError(f"profile '{cfg.profile}' has no 'baselines' section in its params; add one "
                         "(see lib.config.BaselinesConfig)")
    return cfg.baselines


def baseline_seeds(cfg: Config) -> list[int]:
    """The study's seeds on which the baselines run: the first ``baselines.seeds`` of ``cfg.seeds`` (all when None)."""
    n = baselines_config(cfg).seeds
    return list(cfg.seeds if n is None else cfg.seeds[:n])


def timing_key(bc: BaselinesConfig) -> dict:
    """The timing settings as stage inputs."""
    return {"batch": bc.timing_batch, "iters": bc.timing_iters}


def save(st: Stage, rows: dict[str, Row], cost: dict) -> None:
    """Write ``probs.pt`` and ``cost.json`` (with each row's cost under ``cost["rows"]``) into ``st``."""
    torch.save({name: {"val": r.val, "test": r.test} for name, r in rows.items()}, st.file("probs.pt"))
    cost = {**cost, "rows": {name: {"ms_per_image": r.ms_per_image, "forward_passes": r.forward_passes}
                             for name, r in rows.items()}}
    st.file("cost.json").write_text(json.dumps(cost, indent=1))


def load(st: Stage, method: str) -> BaselineResult:
    """The :class:`BaselineResult` of method ``method`` stored in the done stage ``st``."""
    probs = torch.load(st.file("probs.pt"), weights_only=True)
    cost = json.loads(st.file("cost.json").read_text())
    rows = {name: Row(p["val"], p["test"], **cost["rows"][name]) for name, p in probs.items()}
    return BaselineResult(method, rows, cost, st)


def timing_batch(run: MapRun, bc: BaselinesConfig, device: torch.device) -> torch.Tensor:
    """The first ``timing_batch`` test images of ``run``, preprocessed, on ``device``."""
    return run.preprocess(run.splits.test.x[: bc.timing_batch].to(device))


def ms_per_image(fn: Callable[[], object], x: torch.Tensor, bc: BaselinesConfig,
                 device: torch.device) -> tuple[float, float | None]:
    """Median milliseconds per image of ``fn()`` on the batch ``x`` and its peak extra CUDA MiB."""
    t = time_call(fn, n_warmup=1, n_iters=bc.timing_iters, device=device)
    return 1e3 * t.median / len(x), t.peak_mib


def forward_ms(model: nn.Module, x: torch.Tensor, bc: BaselinesConfig, device: torch.device) -> float:
    """:func:`ms_per_image` of one deterministic forward pass of ``model`` in eval mode."""
    model.eval()

    def forward():
        with torch.no_grad(), autocast(device):
            return model(x)

    return ms_per_image(forward, x, bc, device)[0]


def deterministic_probs(model: nn.Module, run: MapRun, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax of ``model`` in eval mode on the validation and test splits of ``run``."""
    kw = dict(preprocess=run.preprocess, device=device)
    return (predict_logits(model, run.splits.val, **kw).softmax(-1), predict_logits(model, run.splits.test, **kw).softmax(-1))
