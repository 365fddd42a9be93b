"""The baselines by name, under one signature, and their rows as the inputs of the baseline table.

:data:`METHODS` maps each baseline to its function ``(cfg, run, device) -> BaselineResult``
(:mod:`lib.baselines.result`), each computed once as a cached stage of its own module, so a fix
to one method recomputes that method only. How each is trained, which the chapter states
(``cost["training"]`` of its result):

- last-layer Laplace is fitted post hoc on the MAP model (:mod:`lib.baselines.last_layer`);
- the LoRA ensembles' members are the study's MAP models, nothing is trained
  (:mod:`lib.baselines.ensemble`);
- MC dropout and the variational LoRA start from the seed's MAP adapters and are fine-tuned
  briefly with the MAP recipe (:mod:`lib.baselines.finetune`, :mod:`lib.baselines.mc_dropout`,
  :mod:`lib.baselines.variational`); "continued MAP" is the same fine-tune without a method, the
  control that separates a trained baseline's gain from that of its extra epochs.

The per-block importance scores are :func:`lib.baselines.importance.importance_scores`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from lib.baselines.ensemble import ensemble_baseline
from lib.baselines.finetune import continued_map_baseline
from lib.baselines.last_layer import last_layer_baseline
from lib.baselines.mc_dropout import mc_dropout_baseline
from lib.baselines.result import BaselineResult
from lib.baselines.table import MethodPredictions
from lib.baselines.variational import variational_baseline
from lib.config import Config
from lib.pipeline import MapRun

METHODS: dict[str, Callable[[Config, MapRun, torch.device], BaselineResult]] = {
    "last-layer Laplace": last_layer_baseline,
    "LoRA ensemble": ensemble_baseline,
    "MC dropout": mc_dropout_baseline,
    "variational LoRA": variational_baseline,
    "continued MAP": continued_map_baseline,
}
"""Baseline name → its function ``(cfg, run, device) -> BaselineResult``."""


def method_predictions(results: Sequence[BaselineResult]) -> dict[str, MethodPredictions]:
    """The rows of ``results`` as :class:`~lib.baselines.table.MethodPredictions` for
    :func:`~lib.baselines.table.baseline_table` (each row carries its method's training time,
    extra parameters and peak memory), in order."""
    out = {}
    for res in results:
        for name, row in res.rows.items():
            out[name] = MethodPredictions(val=row.val, test=row.test, ms_per_image=row.ms_per_image,
                                          peak_mib=res.cost["peak_mib"], train_seconds=res.cost["train_seconds"],
                                          extra_params=res.cost["extra_params"])
    return out
