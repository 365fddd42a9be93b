"""The baselines of one training seed as cached stages: validation and test probabilities and cost.

Every method is a function ``(cfg, bc, run, device) -> BaselineResult`` of the profile, the
baselines settings, the seed's MAP run (:func:`lib.pipeline.map_run`) and the device, listed by
name in :data:`METHODS`. A :class:`BaselineResult` holds one or more *rows* (the predictives the
method yields: MC dropout gives its MC predictive and the same network without dropout; the
ensemble one row per size), each with validation and test probabilities ((N, C) float32) and its
prediction cost, and the method's cost and training record. Its stage (:mod:`lib.artifacts`)
holds ``probs.pt`` (row → {"val", "test"}) and ``cost.json``; keys hash the method's settings, the
device numerics and the upstream MAP stage(s), so the study reuses them and a changed setting
recomputes only its own method.

Training (``cost["training"]``), so that the chapter can state it: last-layer Laplace is fitted
post hoc on the MAP model; the ensemble's members are the study's MAP models (nothing trained;
:mod:`lib.baselines.ensemble`); MC dropout and the variational LoRA start from the seed's MAP
adapters and are fine-tuned briefly with the MAP recipe (:mod:`lib.baselines.finetune`).

Cost, measured on the first ``timing_batch`` test images with :func:`lib.deploy.time_call`
(median of ``timing_iters`` calls after one warm-up): ``ms_per_image`` of each row's prediction
and ``map_ms_per_image`` of the deterministic MAP forward pass on the same batch; ``peak_mib``,
the peak extra CUDA memory of the prediction (None on CPU); ``train_seconds``, the extra training
beyond the MAP model (the fine-tune, the post-hoc fit, or the ensemble's M − 1 further members);
``extra_params``, the floats stored beyond the MAP model (posterior factors, log α, further members).
"""

from __future__ import annotations

import copy
import dataclasses
import json
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from lib.artifacts import Stage, stage
from lib.baselines.ensemble import EnsembleConfig, ensemble_cost, ensemble_probs, member_probs, member_seeds
from lib.baselines.finetune import FinetuneConfig, finetune_spec
from lib.baselines.importance import adalora_sensitivity, fisher_trace, update_norm
from lib.baselines.last_layer import LastLayerConfig, fit_last_layer, last_layer_probs
from lib.baselines.mc_dropout import McDropoutConfig, mc_dropout_probs, mc_dropout_samples, with_lora_dropout
from lib.baselines.table import MethodPredictions
from lib.baselines.variational import VariationalConfig, VariationalLoRA, fit_variational, variational_probs
from lib.config import Config, _at_least, _build
from lib.data import Preprocess, Split, batches
from lib.deploy import time_call
from lib.model import count_parameters, lora_modules
from lib.pipeline import MapRun, map_run, numerics
from lib.train import autocast, fit, predict_logits, prior_precision


@dataclass(frozen=True)
class BaselinesConfig:
    """All baselines' settings (a params section ``baselines:``): the brief ``finetune`` of the
    trained baselines, each method's own section, the timing batch (first ``timing_batch`` test
    images, ``timing_iters`` timed calls) and the importance scores' data (the first
    ``importance_batches`` training minibatches of ``importance_batch_size`` images; the Fisher
    trace on the first ``fisher_examples`` of their images)."""

    finetune: FinetuneConfig = FinetuneConfig()
    last_layer: LastLayerConfig = LastLayerConfig()
    ensemble: EnsembleConfig = EnsembleConfig()
    mc_dropout: McDropoutConfig = McDropoutConfig()
    variational: VariationalConfig = VariationalConfig()
    timing_batch: int = _at_least(64, 1)
    timing_iters: int = _at_least(5, 1)
    importance_batches: int = _at_least(64, 1)
    importance_batch_size: int = _at_least(32, 1)
    fisher_examples: int = _at_least(512, 1)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], source: str = "params") -> "BaselinesConfig":
        """Build from a mapping, rejecting unknown keys and out-of-range values (``ParamsError``)."""
        return _build(cls, d, source, "baselines.")


@dataclass(frozen=True)
class Row:
    """One predictive of a method: probabilities on validation (Nv, C) and test (Nt, C), float32
    on CPU, and its measured cost per test image (``ms_per_image``, ``forward_passes``)."""

    val: torch.Tensor
    test: torch.Tensor
    ms_per_image: float
    forward_passes: int


@dataclass
class BaselineResult:
    """One method of one seed: its ``rows`` (name → :class:`Row`), ``cost`` (module docstring:
    ``train_seconds``, ``extra_params``, ``peak_mib``, ``map_ms_per_image``, ``training``, and the
    method's own entries) and its ``stage``."""

    method: str
    rows: dict[str, Row]
    cost: dict
    stage: Stage


def _timing_batch(split: Split, bc: BaselinesConfig, pre: Preprocess, device: torch.device) -> torch.Tensor:
    return pre(split.x[: bc.timing_batch].to(device))


def _ms(fn: Callable[[], object], x: torch.Tensor, bc: BaselinesConfig, device: torch.device) -> tuple[float, float | None]:
    t = time_call(fn, n_warmup=1, n_iters=bc.timing_iters, device=device)
    return 1e3 * t.median / len(x), t.peak_mib


def _map_ms(model: nn.Module, x: torch.Tensor, bc: BaselinesConfig, device: torch.device) -> float:
    model.eval()

    def forward():
        with torch.no_grad(), autocast(device):
            return model(x)

    return _ms(forward, x, bc, device)[0]


def _load(st: Stage, method: str) -> BaselineResult:
    probs = torch.load(st.file("probs.pt"), weights_only=True)
    cost = json.loads(st.file("cost.json").read_text())
    rows = {name: Row(p["val"], p["test"], **cost["rows"][name]) for name, p in probs.items()}
    return BaselineResult(method, rows, cost, st)


def _save(st: Stage, method: str, rows: dict[str, Row], cost: dict) -> BaselineResult:
    torch.save({name: {"val": r.val, "test": r.test} for name, r in rows.items()}, st.file("probs.pt"))
    cost = {**cost, "rows": {name: {"ms_per_image": r.ms_per_image, "forward_passes": r.forward_passes}
                             for name, r in rows.items()}}
    st.file("cost.json").write_text(json.dumps(cost, indent=1))
    st.mark_done()
    return BaselineResult(method, rows, cost, st)


def _posterior_floats(precision: Any) -> int:
    """Floats that laplace-torch keeps for a posterior precision: the matrix itself (``full``), or
    the eigenvectors and eigenvalues of its Kronecker factors (``kron``)."""
    if isinstance(precision, torch.Tensor):
        return precision.numel()
    return sum(t.numel() for group in (precision.eigenvectors, precision.eigenvalues) for fs in group for t in fs)


def _deterministic(model: nn.Module, run: MapRun, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    kw = dict(preprocess=run.preprocess, device=device)
    return (predict_logits(model, run.splits.val, **kw).softmax(-1), predict_logits(model, run.splits.test, **kw).softmax(-1))


def last_layer_run(cfg: Config, bc: BaselinesConfig, run: MapRun, device: torch.device) -> BaselineResult:
    """laplace-torch's last-layer Laplace on the MAP model of ``run`` (:mod:`lib.baselines.last_layer`);
    the marginal-likelihood search starts from δ = λ·N of the MAP training unless
    ``last_layer.prior_init`` is set. Record: ``prior.json`` (tuned δ)."""
    lc = bc.last_layer
    st = stage("baseline_last_layer", {"last_layer": dataclasses.asdict(lc), "timing": _timing_key(bc),
                                       "numerics": numerics(device)}, upstream=[run.stage])
    if st.done:
        return _load(st, "last-layer Laplace")
    pre = run.preprocess
    t0 = time.perf_counter()
    la = fit_last_layer(run.model, run.splits.train, lc, preprocess=pre, device=device,
                        prior_init=prior_precision(cfg.train.weight_decay, len(run.splits.train)))
    fit_seconds = time.perf_counter() - t0
    st.file("prior.json").write_text(json.dumps({"prior_precision": la.prior_precision.tolist()}))
    val = last_layer_probs(la, run.splits.val, preprocess=pre, device=device, batch_size=lc.batch_size)
    test = last_layer_probs(la, run.splits.test, preprocess=pre, device=device, batch_size=lc.batch_size)
    x = _timing_batch(run.splits.test, bc, pre, device)

    def predict():
        with torch.no_grad():
            return la(x, pred_type="glm", link_approx="probit")

    ms, mem = _ms(predict, x, bc, device)
    cost = {"train_seconds": fit_seconds, "extra_params": _posterior_floats(la.posterior_precision),
            "peak_mib": mem, "map_ms_per_image": _map_ms(run.model, x, bc, device),
            "training": {"kind": "post hoc", "fit": "GGN of the head on the training set, δ by marginal likelihood"}}
    return _save(st, "last-layer Laplace", {"last-layer Laplace": Row(val, test, ms, 1)}, cost)


def ensemble_run(cfg: Config, bc: BaselinesConfig, run: MapRun, device: torch.device) -> BaselineResult:
    """The LoRA ensembles of ``ensemble.sizes`` for the seed of ``run``: the members are the
    study's MAP runs of :func:`~lib.baselines.ensemble.member_seeds` (member 0 is ``run``), one
    row ``'LoRA ensemble, M = m'`` per size. Cost per size in ``cost["sizes"]``
    (:class:`~lib.baselines.ensemble.EnsembleCost` fields); the method-level ``train_seconds`` and
    ``extra_params`` are those of the largest size."""
    ec = bc.ensemble
    seeds = member_seeds(run.seed, max(ec.sizes), cfg.seeds)
    runs = [run] + [map_run(cfg, s, device) for s in seeds[1:]]
    st = stage("baseline_ensemble", {"ensemble": dataclasses.asdict(ec), "timing": _timing_key(bc),
                                     "numerics": numerics(device)}, upstream=[r.stage for r in runs])
    if st.done:
        return _load(st, "LoRA ensemble")
    kw = dict(preprocess=run.preprocess, device=device)
    val = member_probs([r.model for r in runs], run.splits.val, **kw)
    test = member_probs([r.model for r in runs], run.splits.test, **kw)
    x = _timing_batch(run.splits.test, bc, run.preprocess, device)
    map_ms = _map_ms(run.model, x, bc, device)
    n = count_parameters(run.model)
    rows, sizes = {}, {}
    for m in sorted(ec.sizes):
        sizes[str(m)] = dataclasses.asdict(ensemble_cost([r.history for r in runs[:m]], n["lora"] + n["head"]))
        rows[f"LoRA ensemble, M = {m}"] = Row(ensemble_probs(val, m), ensemble_probs(test, m), m * map_ms, m)
    largest = sizes[str(max(ec.sizes))]
    cost = {"train_seconds": largest["extra_train_seconds"], "extra_params": largest["extra_params"], "peak_mib": None,
            "map_ms_per_image": map_ms, "sizes": sizes, "member_seeds": seeds,
            "training": {"kind": "members are the study's MAP models", "member_seeds": seeds}}
    return _save(st, "LoRA ensemble", rows, cost)


def mc_dropout_run(cfg: Config, bc: BaselinesConfig, run: MapRun, device: torch.device) -> BaselineResult:
    """MC dropout with LoRA dropout ``mc_dropout.rate``: the MAP model of ``run`` with dropout on
    every LoRA input (:func:`~lib.baselines.mc_dropout.with_lora_dropout`), fine-tuned with the MAP
    recipe for ``finetune.epochs`` (masks and data order seeded by the run's seed; resumable), then
    two rows: ``'MC dropout'`` (``mc_dropout.samples`` passes, masks seeded by the seed) and
    ``'MC dropout, no dropout at test'`` (the same network in eval mode). Record: ``history.json``."""
    mc, spec = bc.mc_dropout, finetune_spec(cfg.train, bc.finetune)
    st = stage("baseline_mc_dropout", {"mc_dropout": dataclasses.asdict(mc), "finetune": dataclasses.asdict(spec),
                                       "timing": _timing_key(bc), "numerics": numerics(device)}, upstream=[run.stage])
    if st.done:
        return _load(st, "MC dropout")
    model = with_lora_dropout(run.model, mc.rate)
    trainable = [p for p in model.parameters() if p.requires_grad]
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(run.seed)
        history = fit(model, trainable, run.splits.train, run.splits.val, spec, preprocess=run.preprocess,
                      device=device, seed=run.seed, ckpt=st.file("checkpoint.pt"), desc=f"MC dropout seed {run.seed}")
    st.file("history.json").write_text(json.dumps(history, indent=1))
    kw = dict(samples=mc.samples, seed=run.seed, preprocess=run.preprocess, device=device)
    x = _timing_batch(run.splits.test, bc, run.preprocess, device)
    ms, mem = _ms(lambda: mc_dropout_samples(model, x, samples=mc.samples, seed=run.seed), x, bc, device)
    det_ms = _map_ms(model, x, bc, device)
    rows = {"MC dropout": Row(mc_dropout_probs(model, run.splits.val, **kw), mc_dropout_probs(model, run.splits.test, **kw),
                              ms, mc.samples),
            "MC dropout, no dropout at test": Row(*_deterministic(model, run, device), det_ms, 1)}
    cost = {"train_seconds": sum(r["seconds"] for r in history), "extra_params": 0, "peak_mib": mem,
            "map_ms_per_image": _map_ms(run.model, x, bc, device),
            "training": {"kind": "fine-tuned from the MAP adapters", **dataclasses.asdict(spec)}}
    return _save(st, "MC dropout", rows, cost)


def variational_run(cfg: Config, bc: BaselinesConfig, run: MapRun, device: torch.device) -> BaselineResult:
    """The variational LoRA (:mod:`lib.baselines.variational`) started from the MAP adapters of
    ``run`` with every log α at ``variational.init_log_alpha``, fine-tuned with the MAP recipe for
    ``finetune.epochs`` (gate noise and data order seeded by the run's seed), then two rows:
    ``'variational LoRA'`` (the MC predictive of ``variational.samples`` gate draws) and
    ``'variational LoRA, mean gates'``. Records: ``history.json``, ``prune_log.json`` (per LoRA map
    and pruning: kept ranks, log α; :func:`~lib.baselines.variational.pruning_table` for the chapter)."""
    vc, spec = bc.variational, finetune_spec(cfg.train, bc.finetune)
    st = stage("baseline_variational", {"variational": dataclasses.asdict(vc), "finetune": dataclasses.asdict(spec),
                                        "timing": _timing_key(bc), "numerics": numerics(device)}, upstream=[run.stage])
    if st.done:
        return _load(st, "variational LoRA")
    model = copy.deepcopy(run.model)
    vlora = VariationalLoRA(model, init_log_alpha=vc.init_log_alpha,
                            generator=torch.Generator(device=device).manual_seed(run.seed))
    ranks_before = sum(vlora.ranks().values())
    history, log = fit_variational(model, vlora, run.splits.train, spec, vc, preprocess=run.preprocess,
                                   device=device, seed=run.seed)
    st.file("history.json").write_text(json.dumps(history, indent=1))
    st.file("prune_log.json").write_text(json.dumps(log, indent=1))
    kw = dict(samples=vc.samples, seed=run.seed, preprocess=run.preprocess, device=device)
    x = _timing_batch(run.splits.test, bc, run.preprocess, device)

    def predict():
        with torch.no_grad(), vlora.mode(True):
            for _ in range(vc.samples):
                with autocast(device):
                    model(x)

    ms, mem = _ms(predict, x, bc, device)
    with vlora.mode(False):
        mean_ms = _map_ms(model, x, bc, device)
    rows = {"variational LoRA": Row(variational_probs(model, vlora, run.splits.val, **kw),
                                    variational_probs(model, vlora, run.splits.test, **kw), ms, vc.samples),
            "variational LoRA, mean gates": Row(variational_probs(model, vlora, run.splits.val, mean=True, **kw),
                                                variational_probs(model, vlora, run.splits.test, mean=True, **kw),
                                                mean_ms, 1)}
    ranks = sum(vlora.ranks().values())
    saved = sum((cfg.lora.r - m.A.weight.shape[0]) * (m.A.weight.shape[1] + m.B.weight.shape[0]) for m in lora_modules(model))
    cost = {"train_seconds": sum(r["seconds"] for r in history), "peak_mib": mem, "extra_params": ranks - saved,
            "map_ms_per_image": _map_ms(run.model, x, bc, device), "ranks_before": ranks_before, "ranks": ranks,
            "training": {"kind": "fine-tuned from the MAP adapters", **dataclasses.asdict(spec)}}
    return _save(st, "variational LoRA", rows, cost)


def method_predictions(results: list[BaselineResult]) -> dict[str, MethodPredictions]:
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


def _timing_key(bc: BaselinesConfig) -> dict:
    return {"batch": bc.timing_batch, "iters": bc.timing_iters}


METHODS: dict[str, Callable[[Config, BaselinesConfig, MapRun, torch.device], BaselineResult]] = {
    "last-layer Laplace": last_layer_run,
    "LoRA ensemble": ensemble_run,
    "MC dropout": mc_dropout_run,
    "variational LoRA": variational_run,
}
"""Baseline name → its function ``(cfg, bc, run, device) -> BaselineResult``."""


def importance_run(bc: BaselinesConfig, run: MapRun, device: torch.device) -> tuple[Stage, dict[str, torch.Tensor]]:
    """Per-block importance scores of the MAP model of ``run`` (:mod:`lib.baselines.importance`):
    ``{'AdaLoRA sensitivity', 'Fisher trace', 'LoRA update norm'}`` → (L,) float64. AdaLoRA's
    score runs over the first ``importance_batches`` training minibatches (in order, no
    augmentation), the Fisher trace over the first ``fisher_examples`` of their images. File: ``scores.pt``."""
    st = stage("baseline_importance", {"batches": bc.importance_batches, "batch_size": bc.importance_batch_size,
                                       "fisher_examples": bc.fisher_examples, "numerics": numerics(device)},
               upstream=[run.stage])
    if st.done:
        return st, torch.load(st.file("scores.pt"), weights_only=True)
    data = []
    for x, y in batches(run.splits.train, bc.importance_batch_size, preprocess=run.preprocess, device=device):
        if len(data) == bc.importance_batches:
            break
        data.append((x, y))
    fisher_data, left = [], bc.fisher_examples
    for x, y in data:
        if left <= 0:
            break
        fisher_data.append((x[:left], y[:left]))
        left -= len(y)
    scores = {"AdaLoRA sensitivity": adalora_sensitivity(run.model, data), "Fisher trace": fisher_trace(run.model, fisher_data),
              "LoRA update norm": update_norm(run.model)}
    torch.save(scores, st.file("scores.pt"))
    st.mark_done()
    return st, scores
