"""The baseline table: every method's metrics and cost, averaged over the training seeds, with
paired intervals against MAP and temperature scaling and the cost–calibration Pareto front.

Per method m (rows; the MAP model and temperature scaling are rows too): test accuracy, ECE,
NLL, Brier (:func:`lib.calibration.calibration_summary`), validation ECE and NLL, each the mean
over the S seeds; the cost ``ms_per_image``, ``extra_ms`` (minus the MAP's), ``peak_mib``,
``train_seconds`` (training beyond the MAP model) and ``extra_params`` (floats stored beyond it);
and how it was tuned on validation data (``tuning``, ``temperature``). A method's probabilities
are (N, C) for one seed or (S, N, C) for S seeds that share the validation and test images.

Equal tuning. The main method chooses its covariance scale κ_S on the validation NLL; so that
every method gets a validation step of the same kind, :func:`with_temperature` adds for each
baseline m the row ``'m + TS'``: a temperature T fitted (per seed) on the validation NLL of m's
predictive and applied to its log-probabilities, ``p ∝ exp(log p_m / T)`` (:mod:`lib.temperature`,
guo2017calibration; for an ensemble this is calibration after pooling, rahaman2021uncertainty).
The untuned rows stay in the table. Against a reference r (MAP: ``*_map``, temperature scaling:
``*_ts``), with s the seeds:

    ΔECE = (1/S) Σ_s [ECE_r,s − ECE_m,s]
    ΔNLL = (1/S) Σ_s (1/N) Σ_n [−log p_r,s(y_n|x_n) + log p_m,s(y_n|x_n)]

positive = m better, with basic intervals (davison1997bootstrap; :func:`lib.stats.basic_interval`,
which subtracts binned ECE's upward bias once instead of adding it) of a paired bootstrap over the test images
(efron1993introduction): each replicate draws one resample of the N test images
(:func:`lib.resample.bootstrap_counts`) that every seed, method and reference share, and computes
the ECEs with :func:`lib.calibration.ece_from_weights`. The intervals reflect the test images
with the seeds' training runs held fixed. ``pareto_ece`` / ``pareto_nll``: on the front of
(extra ms, ECE) / (extra ms, NLL), both minimised (:func:`lib.stats.pareto_front`).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Mapping

import pandas as pd
import torch
from torch import Tensor

from lib.calibration import calibration_summary, ece, ece_from_weights, nll, top_label
from lib.interval import Interval
from lib.resample import bootstrap_counts
from lib.stats import basic_interval, pareto_front
from lib.temperature import apply_temperature, fit_temperature


@dataclass(frozen=True)
class MethodPredictions:
    """One method's probabilities on validation (Nv, C) and test (Nt, C) (or (S, Nv, C), (S, Nt, C)
    for S seeds), its cost (module
    docstring) and its validation tuning (``tuning``: ``'none'``, ``'temperature'`` or a
    description such as ``'κ_S on validation NLL'``; ``temperature``: the fitted T, or None)."""

    val: Tensor
    test: Tensor
    ms_per_image: float
    peak_mib: float | None = None
    train_seconds: float = 0.0
    extra_params: int = 0
    tuning: str = "none"
    temperature: float | None = None


TS_SUFFIX = " + TS"
"""Suffix of the temperature-scaled rows of :func:`with_temperature`."""


def with_temperature(methods: Mapping[str, MethodPredictions], val_labels: Tensor) -> dict[str, MethodPredictions]:
    """``methods`` followed by ``'<name> + TS'`` for each: T = :func:`lib.temperature.fit_temperature`
    of the log-probabilities of its validation predictive (one T per seed), applied to both splits
    (``softmax(log p / T)``); one extra parameter, the same prediction cost. ``temperature`` of the
    row is the mean of the seeds' T."""
    out = dict(methods)
    for name, m in methods.items():
        seeded = m.val.ndim == 3
        val, test = (m.val, m.test) if seeded else (m.val[None], m.test[None])
        ts = [fit_temperature(_log(v), val_labels) for v in val]
        scaled = [(apply_temperature(_log(v), t).to(v.dtype), apply_temperature(_log(u), t).to(u.dtype))
                  for v, u, t in zip(val, test, ts)]
        v, u = (torch.stack(x) for x in zip(*scaled))
        out[name + TS_SUFFIX] = dataclasses.replace(
            m, val=v if seeded else v[0], test=u if seeded else u[0], extra_params=m.extra_params + 1,
            tuning="temperature", temperature=sum(ts) / len(ts))
    return out


def _log(p: Tensor) -> Tensor:
    return p.double().clamp_min(1e-300).log()


def _nll_per_example(probs: Tensor, labels: Tensor, eps: float = 1e-12) -> Tensor:
    return -probs.double().gather(1, labels[:, None]).squeeze(1).clamp_min(eps).log()


def _seeded(p: Tensor) -> Tensor:
    """(N, C) → (1, N, C); (S, N, C) unchanged."""
    if p.ndim not in (2, 3):
        raise ValueError(f"probabilities must be (N, C) or (S, N, C); got {tuple(p.shape)}")
    return p if p.ndim == 3 else p[None]


def paired_nll_bootstrap(probs_ref: Tensor, probs: Tensor, labels: Tensor, n_resamples: int,
                         generator: torch.Generator) -> tuple[Tensor, Tensor]:
    """ΔNLL = NLL_ref − NLL_m of each of P methods: estimate (P,) and replicates (R, P), each
    replicate resampling the N test images with :func:`lib.resample.bootstrap_counts` (the same
    resample for all methods and seeds). probs_ref (N, C) or (S, N, C), probs (P, N, C) or
    (P, S, N, C), labels (N,); with seeds, the per-example differences are averaged over them."""
    ref = _seeded(probs_ref)
    per = torch.stack([_seeded(p) for p in probs])  # (P, S, N, C)
    d = torch.stack([(_nll_per_example(r, labels)[None] - torch.stack([_nll_per_example(p, labels) for p in ps]))
                     for r, ps in zip(ref, per.transpose(0, 1))]).mean(0)  # (P, N)
    n = labels.shape[0]
    counts = bootstrap_counts(n, n_resamples, generator, torch.float64, labels.device)
    return d.mean(1), counts @ d.T / n


def paired_ece_bootstrap(probs_ref: Tensor, probs: Tensor, labels: Tensor, n_resamples: int,
                         generator: torch.Generator, n_bins: int = 15,
                         chunk_size: int = 256) -> tuple[Tensor, Tensor]:
    """ΔECE = (1/S) Σ_s [ECE_ref,s − ECE_m,s] of each of P methods: estimate (P,) and replicates
    (R, P), every replicate one resample of the N test images shared by all seeds, methods and the
    reference (:func:`lib.calibration.ece_from_weights`). Shapes as :func:`paired_nll_bootstrap`."""
    ref = _seeded(probs_ref)
    per = torch.stack([_seeded(p) for p in probs])  # (P, S, N, C)
    s_count, n = ref.shape[0], labels.shape[0]
    conf, corr = zip(*(top_label(p.double(), labels) for p in (*ref, *per.flatten(0, 1))))
    conf, corr = torch.stack(conf), torch.stack(corr)  # (S + P S, N)

    def gain(w: Tensor) -> Tensor:
        e = ece_from_weights(conf, corr, w, n_bins)  # (R, S + P S)
        return (e[:, :s_count, None] - e[:, s_count:].reshape(-1, per.shape[0], s_count).transpose(1, 2)).mean(1)

    est = gain(torch.ones(1, n, dtype=torch.float64, device=labels.device))[0]
    reps = torch.cat([gain(bootstrap_counts(n, min(chunk_size, n_resamples - start), generator, torch.float64,
                                            labels.device)) for start in range(0, n_resamples, chunk_size)])
    return est, reps


def baseline_table(methods: Mapping[str, MethodPredictions], val_labels: Tensor, test_labels: Tensor, *,
                   reference: str = "MAP", temperature: str = "temperature scaling", n_bins: int = 15,
                   n_resamples: int = 1000, seed: int = 0, alpha: float = 0.05,
                   select_by: str = "nll") -> pd.DataFrame:
    """One row per method of ``methods`` (which must hold ``reference`` and ``temperature``; all
    with the same number of seeds).

    Columns: method, accuracy, ece, nll, brier, val_ece, val_nll (seed means), ms_per_image,
    peak_mib, train_seconds, extra_params, tuning, temperature, extra_ms; for ref in (map, ts):
    d_ece_<ref>, d_ece_<ref>_lo, d_ece_<ref>_hi, d_nll_<ref>, d_nll_<ref>_lo, d_nll_<ref>_hi;
    pareto_ece, pareto_nll; ``recommended``, the method of least validation ``select_by`` (NLL by
    default). Bootstrap: one CPU generator seeded ``seed`` per reference and metric, so ΔECE and
    ΔNLL against either reference use the same test-image resamples. Formulas: module docstring.
    """
    for key in (reference, temperature):
        if key not in methods:
            raise ValueError(f"methods has no '{key}' entry; give the MAP and temperature-scaling rows too "
                             f"(methods: {sorted(methods)})")
    if select_by not in ("nll", "ece"):
        raise ValueError(f"select_by is {select_by!r}; use 'nll' or 'ece'")
    names = list(methods)
    seeds = {k: _seeded(methods[k].test).shape[0] for k in names}
    if len(set(seeds.values())) != 1:
        raise ValueError(f"every method needs the same number of seeds; got {seeds}")
    test = torch.stack([_seeded(methods[k].test).double() for k in names])  # (P, S, N, C)
    rows = []
    for name in names:
        m = methods[name]
        per_seed = [calibration_summary(p.double(), test_labels, n_bins) for p in _seeded(m.test)]
        mean = {k: sum(s[k] for s in per_seed) / len(per_seed) for k in ("accuracy", "ece", "nll", "brier")}
        val = _seeded(m.val).double()
        rows.append({"method": name, **mean,
                     "val_ece": float(sum(ece(v, val_labels, n_bins) for v in val) / len(val)),
                     "val_nll": float(sum(nll(v, val_labels) for v in val) / len(val)),
                     "ms_per_image": m.ms_per_image, "peak_mib": m.peak_mib, "train_seconds": m.train_seconds,
                     "extra_params": m.extra_params, "tuning": m.tuning, "temperature": m.temperature})
    table = pd.DataFrame(rows)
    table["extra_ms"] = table.ms_per_image - methods[reference].ms_per_image
    for tag, ref in (("map", reference), ("ts", temperature)):
        r = _seeded(methods[ref].test).double()
        for metric, boot in (("ece", lambda g: paired_ece_bootstrap(r, test, test_labels, n_resamples, g, n_bins)),
                             ("nll", lambda g: paired_nll_bootstrap(r, test, test_labels, n_resamples, g))):
            est, reps = boot(torch.Generator().manual_seed(seed))
            lo, hi = basic_interval(reps, est, alpha)
            col = f"d_{metric}_{tag}"
            table[col], table[f"{col}_lo"], table[f"{col}_hi"] = est.numpy(), lo.numpy(), hi.numpy()
    extra = torch.tensor(table.extra_ms.to_numpy(), dtype=torch.float64)
    for metric in ("ece", "nll"):
        table[f"pareto_{metric}"] = pareto_front(extra, -torch.tensor(table[metric].to_numpy(), dtype=torch.float64)).numpy()
    table["recommended"] = table.method == table.method[table[f"val_{select_by}"].idxmin()]
    return table


@dataclass(frozen=True)
class Recommendation:
    """What the paired intervals of a :func:`baseline_table` support (:func:`recommend`).

    Attributes:
        method: the recommended row: the cheapest method whose ECE is significantly below
            temperature scaling's (``basis='beats temperature scaling'``); else temperature scaling
            when it is significantly below MAP's (``'temperature scaling'``); else MAP (``'none'``).
        basis: which of the three cases holds.
        versus_map: ECE_MAP − ECE_method with its paired interval (:class:`lib.interval.Interval`).
        versus_ts: ECE_TS − ECE_method (zero-width for temperature scaling itself).
        temperature_gain: ECE_MAP − ECE_TS, temperature scaling's own gain (what the ``'none'``
            case rests on: there ``versus_map`` is the MAP row's, zero-width).
        nll_versus_ts: NLL_TS − NLL_method.
        extra_ms, train_seconds, extra_params: the method's cost over the MAP model.
        beat_ts: every row significantly better calibrated than temperature scaling (ECE), cheapest first.
        lose_to_ts: every row that temperature scaling calibrates significantly better.
    """

    method: str
    basis: str
    versus_map: Interval
    versus_ts: Interval
    temperature_gain: Interval
    nll_versus_ts: Interval
    extra_ms: float
    train_seconds: float
    extra_params: int
    beat_ts: tuple[str, ...]
    lose_to_ts: tuple[str, ...]


def recommend(table: pd.DataFrame, alpha: float, reference: str = "MAP",
              temperature: str = "temperature scaling") -> Recommendation:
    """The method a :func:`baseline_table` supports, leading with the paired intervals (see
    :class:`Recommendation`): a method is preferred to temperature scaling only when its ECE is
    significantly lower (``d_ece_ts_lo > 0``) and its NLL not significantly higher
    (``d_nll_ts_hi ≥ 0``); ties in cost (``extra_ms``, then ``train_seconds``) go to the smaller ECE."""
    t = table.set_index("method")
    for key in (reference, temperature):
        if key not in t.index:
            raise ValueError(f"table has no '{key}' row; pass the output of baseline_table")

    def iv(name: str, col: str) -> Interval:
        return Interval.from_row(t.loc[name], alpha, estimate=col, lower=f"{col}_lo", upper=f"{col}_hi")

    beat = t[(t.d_ece_ts_lo > 0) & (t.d_nll_ts_hi >= 0)].sort_values(["extra_ms", "train_seconds", "ece"], kind="stable")
    lose = t[t.d_ece_ts_hi < 0]
    if len(beat):
        method, basis = str(beat.index[0]), "beats temperature scaling"
    elif iv(temperature, "d_ece_map").side == "above":
        method, basis = temperature, "temperature scaling"
    else:
        method, basis = reference, "none"
    row = t.loc[method]
    return Recommendation(method, basis, iv(method, "d_ece_map"), iv(method, "d_ece_ts"), iv(temperature, "d_ece_map"),
                          iv(method, "d_nll_ts"),
                          float(row.extra_ms), float(row.train_seconds), int(row.extra_params),
                          tuple(map(str, beat.index)), tuple(map(str, lose.index)))
