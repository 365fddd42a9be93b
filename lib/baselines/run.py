"""The baselines of one training seed as cached stages: validation and test probabilities and cost.

Each function returns a :class:`BaselineResult` whose stage (:mod:`lib.artifacts`) holds
``val_probs.pt`` and ``test_probs.pt`` ((N, C) float32, or (M, N, C) member probabilities for
the ensemble), ``cost.json`` and the method's own record. Keys hash the method's settings, the
device numerics and the upstream MAP stage(s), as :mod:`lib.pipeline` does, so the study reuses
them and a changed setting recomputes only its own method.

Cost, measured on the first ``timing_batch`` test images with :func:`lib.deploy.time_call`
(median of ``timing_iters`` calls after one warm-up; peak extra CUDA memory, None on CPU):
``ms_per_image`` of the method's prediction and ``map_ms_per_image`` of the deterministic
forward pass on the same batch; ``train_seconds`` of its fine-tuning (summed over members for
the ensemble) or of its post-hoc fit. The ensemble's prediction cost is M deterministic forward
passes (computed as M × the measured one: the members run one after the other).
"""

from __future__ import annotations

import dataclasses
import json
import time
from dataclasses import dataclass
from typing import Any, Mapping

import torch
from torch import nn

from lib.artifacts import Stage, stage
from lib.baselines.ensemble import EnsembleConfig, ensemble_cost, member_probs, member_seeds
from lib.baselines.importance import adalora_sensitivity, fisher_and_gradient, update_norm
from lib.baselines.last_layer import LastLayerConfig, fit_last_layer, last_layer_probs
from lib.baselines.mc_dropout import McDropoutConfig, mc_dropout_probs, mc_dropout_samples
from lib.baselines.variational import VariationalConfig, VariationalLoRA, fit_variational, variational_probs
from lib.config import Config, _at_least, _build
from lib.data import Preprocess, Split, batches, splits_for
from lib.deploy import time_call
from lib.model import add_lora, build_backbone, count_parameters, data_config
from lib.pipeline import MapRun, _data_identity, _finetune_model_cfg, backbone_stage, map_run, numerics
from lib.train import autocast, prior_precision


@dataclass(frozen=True)
class BaselinesConfig:
    """All baselines' settings (a params section ``baselines:``), the timing batch (first
    ``timing_batch`` test images, ``timing_iters`` timed calls) and the importance scores' data
    (the first ``importance_batches`` training minibatches of ``importance_batch_size`` images)."""

    last_layer: LastLayerConfig = LastLayerConfig()
    ensemble: EnsembleConfig = EnsembleConfig()
    mc_dropout: McDropoutConfig = McDropoutConfig()
    variational: VariationalConfig = VariationalConfig()
    timing_batch: int = _at_least(64, 1)
    timing_iters: int = _at_least(5, 1)
    importance_batches: int = _at_least(8, 1)
    importance_batch_size: int = _at_least(32, 1)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], source: str = "params") -> "BaselinesConfig":
        """Build from a mapping, rejecting unknown keys and out-of-range values (``ParamsError``)."""
        return _build(cls, d, source, "baselines.")


@dataclass
class BaselineResult:
    """One method of one seed: probabilities on validation and test, cost, and its stage."""

    method: str
    val_probs: torch.Tensor
    test_probs: torch.Tensor
    cost: dict
    stage: Stage


def _timing_batch(split: Split, bc: BaselinesConfig, pre: Preprocess, device: torch.device) -> torch.Tensor:
    return pre(split.x[: bc.timing_batch].to(device))


def _ms(fn, x: torch.Tensor, bc: BaselinesConfig, device: torch.device) -> tuple[float, float | None]:
    sec, mem = time_call(fn, n_warmup=1, n_iters=bc.timing_iters, device=device)
    return 1e3 * sec / len(x), mem


def _map_ms(model: nn.Module, x: torch.Tensor, bc: BaselinesConfig, device: torch.device) -> float:
    model.eval()

    def forward():
        with torch.no_grad(), autocast(device):
            return model(x)

    return _ms(forward, x, bc, device)[0]


def _load(st: Stage, method: str) -> BaselineResult:
    return BaselineResult(method, torch.load(st.file("val_probs.pt"), weights_only=True),
                          torch.load(st.file("test_probs.pt"), weights_only=True),
                          json.loads(st.file("cost.json").read_text()), st)


def _save(st: Stage, method: str, val: torch.Tensor, test: torch.Tensor, cost: dict) -> BaselineResult:
    torch.save(val, st.file("val_probs.pt"))
    torch.save(test, st.file("test_probs.pt"))
    st.file("cost.json").write_text(json.dumps(cost, indent=1))
    st.mark_done()
    return BaselineResult(method, val, test, cost, st)


def last_layer_run(cfg: Config, bc: BaselinesConfig, run: MapRun, device: torch.device) -> BaselineResult:
    """laplace-torch's last-layer Laplace on the MAP model of ``run`` (:mod:`lib.baselines.last_layer`);
    the marginal-likelihood search starts from δ = λ·N of the MAP training unless
    ``last_layer.prior_init`` is set. Record: ``prior.json`` (tuned δ)."""
    lc = bc.last_layer
    st = stage("baseline_last_layer", {"last_layer": dataclasses.asdict(lc), "numerics": numerics(device)},
               upstream=[run.stage])
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
    cost = {"train_seconds": fit_seconds, "ms_per_image": ms, "peak_mib": mem,
            "map_ms_per_image": _map_ms(run.model, x, bc, device), "forward_passes": 1}
    return _save(st, "last-layer Laplace", val, test, cost)


def ensemble_run(cfg: Config, bc: BaselinesConfig, seed: int, device: torch.device) -> BaselineResult:
    """The largest ensemble of ``ensemble.sizes`` for study seed ``seed``: its members are the
    cached MAP runs of :func:`~lib.baselines.ensemble.member_seeds` (member 0 is the seed's MAP).
    ``val_probs``/``test_probs`` are the member probabilities (M, N, C): pass them to
    :func:`~lib.baselines.ensemble.ensemble_probs` with each size. Cost per size in ``cost.json``
    (``sizes``: M → :class:`~lib.baselines.ensemble.EnsembleCost` fields and ``ms_per_image``)."""
    ec = bc.ensemble
    seeds = member_seeds(seed, max(ec.sizes), ec.seed_stride)
    runs = [map_run(cfg, s, device) for s in seeds]
    st = stage("baseline_ensemble", {"ensemble": dataclasses.asdict(ec), "numerics": numerics(device)},
               upstream=[r.stage for r in runs])
    if st.done:
        return _load(st, "LoRA ensemble")
    first = runs[0]
    kw = dict(preprocess=first.preprocess, device=device)
    val = member_probs([r.model for r in runs], first.splits.val, **kw)
    test = member_probs([r.model for r in runs], first.splits.test, **kw)
    x = _timing_batch(first.splits.test, bc, first.preprocess, device)
    map_ms = _map_ms(first.model, x, bc, device)
    n = count_parameters(first.model)
    n_params, histories = n["lora"] + n["head"], [r.history for r in runs]
    sizes = {}
    for m in ec.sizes:
        c = dataclasses.asdict(ensemble_cost(histories[:m], n_params))
        sizes[str(m)] = {**c, "ms_per_image": m * map_ms}
    cost = {"sizes": sizes, "map_ms_per_image": map_ms, "member_seeds": seeds}
    return _save(st, "LoRA ensemble", val, test, cost)


def mc_dropout_run(cfg: Config, bc: BaselinesConfig, seed: int, device: torch.device) -> BaselineResult:
    """Fine-tune with LoRA dropout ``mc_dropout.rate`` (``map_run(..., lora_dropout=rate)``, its
    own cached stage) and predict with ``mc_dropout.samples`` passes, masks seeded by ``seed``."""
    mc = bc.mc_dropout
    run = map_run(cfg, seed, device, lora_dropout=mc.rate)
    st = stage("baseline_mc_dropout", {"mc_dropout": dataclasses.asdict(mc), "numerics": numerics(device)},
               upstream=[run.stage])
    if st.done:
        return _load(st, "MC dropout")
    kw = dict(samples=mc.samples, seed=seed, preprocess=run.preprocess, device=device)
    val = mc_dropout_probs(run.model, run.splits.val, **kw)
    test = mc_dropout_probs(run.model, run.splits.test, **kw)
    x = _timing_batch(run.splits.test, bc, run.preprocess, device)
    ms, mem = _ms(lambda: mc_dropout_samples(run.model, x, samples=mc.samples, seed=seed), x, bc, device)
    cost = {"train_seconds": sum(r["seconds"] for r in run.history), "ms_per_image": ms, "peak_mib": mem,
            "map_ms_per_image": _map_ms(run.model, x, bc, device), "forward_passes": mc.samples}
    return _save(st, "MC dropout", val, test, cost)


def variational_run(cfg: Config, bc: BaselinesConfig, seed: int, device: torch.device) -> BaselineResult:
    """Fine-tune the variational LoRA (:mod:`lib.baselines.variational`) from the same backbone,
    LoRA and head initialisation as the MAP run of ``seed``; gate noise seeded by ``seed``.
    Records: ``history.json``, ``prune_log.json`` (per module and pruning: kept ranks, log α)."""
    vc = bc.variational
    backbone = backbone_stage(cfg, device)
    st = stage("baseline_variational",
               {"data": _data_identity(cfg), **cfg.section("model", "lora"), "variational": dataclasses.asdict(vc),
                "seed": seed, "numerics": numerics(device)},
               upstream=[backbone] if backbone else [])
    if st.done:
        return _load(st, "variational LoRA")
    splits = splits_for(cfg)
    model = build_backbone(_finetune_model_cfg(cfg, backbone), splits.num_classes, seed=seed, device=device)
    model.requires_grad_(False)
    model = add_lora(model, cfg.lora, seed=seed).to(device)
    pre = Preprocess.from_data_config(data_config(model))
    vlora = VariationalLoRA(model, init_log_alpha=vc.init_log_alpha,
                            generator=torch.Generator(device=device).manual_seed(seed))
    t0 = time.perf_counter()
    history, log = fit_variational(model, vlora, splits.train, vc, preprocess=pre, device=device, seed=seed)
    train_seconds = time.perf_counter() - t0
    st.file("history.json").write_text(json.dumps(history, indent=1))
    st.file("prune_log.json").write_text(json.dumps(log, indent=1))
    kw = dict(samples=vc.samples, seed=seed, preprocess=pre, device=device)
    val = variational_probs(model, vlora, splits.val, **kw)
    test = variational_probs(model, vlora, splits.test, **kw)
    x = _timing_batch(splits.test, bc, pre, device)

    def predict():
        with torch.no_grad(), vlora.mode(True):
            for _ in range(vc.samples):
                with autocast(device):
                    model(x)

    ms, mem = _ms(predict, x, bc, device)
    with vlora.mode(False):
        map_ms = _map_ms(model, x, bc, device)
    cost = {"train_seconds": train_seconds, "ms_per_image": ms, "peak_mib": mem, "map_ms_per_image": map_ms,
            "forward_passes": vc.samples, "ranks": sum(vlora.ranks().values())}
    return _save(st, "variational LoRA", val, test, cost)


def importance_run(bc: BaselinesConfig, run: MapRun, device: torch.device) -> tuple[Stage, dict[str, torch.Tensor]]:
    """Per-block importance scores of the MAP model of ``run`` (:mod:`lib.baselines.importance`):
    ``{'AdaLoRA sensitivity', 'Fisher trace', 'gradient norm', 'LoRA update norm'}`` → (L,)
    float64, from the first ``importance_batches`` training minibatches (in order). File: ``scores.pt``."""
    st = stage("baseline_importance", {"batches": bc.importance_batches, "batch_size": bc.importance_batch_size,
                                       "numerics": numerics(device)}, upstream=[run.stage])
    if st.done:
        return st, torch.load(st.file("scores.pt"), weights_only=True)
    data = []
    for x, y in batches(run.splits.train, bc.importance_batch_size, preprocess=run.preprocess, device=device):
        if len(data) == bc.importance_batches:
            break
        data.append((x, y))
    fisher, grad = fisher_and_gradient(run.model, data)
    scores = {"AdaLoRA sensitivity": adalora_sensitivity(run.model, data), "Fisher trace": fisher,
              "gradient norm": grad, "LoRA update norm": update_norm(run.model)}
    torch.save(scores, st.file("scores.pt"))
    st.mark_done()
    return st, scores
