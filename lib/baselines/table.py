"""The baseline table of one seed: every method's metrics, cost, paired intervals against MAP and
temperature scaling, the cost–calibration Pareto front, and the recommendation made on validation.

Per method m (rows; the MAP model and temperature scaling are rows too): test accuracy, ECE,
NLL, Brier (:func:`lib.calibration.calibration_summary`), validation ECE and NLL, the cost
``ms_per_image``, ``extra_ms`` (minus the MAP's), ``peak_mib``, ``train_seconds`` (training
beyond the MAP model) and ``extra_params`` (floats stored beyond it), and how it was tuned on
validation data (``tuning``, ``temperature``).

Equal tuning. The main method chooses its covariance scale κ_S on the validation NLL; so that
every method gets a validation step of the same kind, :func:`with_temperature` adds for each
baseline m the row ``'m + TS'``: a temperature T fitted on the validation NLL of m's predictive
and applied to its log-probabilities, ``p ∝ exp(log p_m / T)`` (:mod:`lib.temperature`,
guo2017calibration; for an ensemble this is calibration after pooling, rahaman2021uncertainty).
The untuned rows stay in the table. Against a reference r (MAP: ``*_map``, temperature scaling:
``*_ts``):

    ΔECE = ECE_r − ECE_m   (paired bootstrap over test images, :func:`lib.stats.paired_bootstrap`)
    ΔNLL = (1/N) Σ_n [−log p_r(y_n|x_n) + log p_m(y_n|x_n)]   (paired bootstrap of the mean)

positive = m better, with percentile intervals (efron1993introduction). ``pareto_ece`` /
``pareto_nll``: on the front of (extra ms, ECE) / (extra ms, NLL), both minimised
(:func:`lib.stats.pareto_front`). ``recommended``: the method of least validation
``select_by`` (NLL by default): chosen on validation data, its test row is the report.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Mapping

import pandas as pd
import torch
from torch import Tensor

from lib.calibration import calibration_summary, ece, nll
from lib.resample import bootstrap_counts
from lib.stats import paired_bootstrap, pareto_front, percentile_interval
from lib.temperature import apply_temperature, fit_temperature


@dataclass(frozen=True)
class MethodPredictions:
    """One method's probabilities on validation (Nv, C) and test (Nt, C), its cost (module
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
    of the log-probabilities of its validation predictive, applied to both splits
    (``softmax(log p / T)``); one extra parameter, the same prediction cost."""
    out = dict(methods)
    for name, m in methods.items():
        t = fit_temperature(_log(m.val), val_labels)
        out[name + TS_SUFFIX] = dataclasses.replace(
            m, val=apply_temperature(_log(m.val), t).to(m.val.dtype), test=apply_temperature(_log(m.test), t).to(m.test.dtype),
            extra_params=m.extra_params + 1, tuning="temperature", temperature=t)
    return out


def _log(p: Tensor) -> Tensor:
    return p.double().clamp_min(1e-300).log()


def _nll_per_example(probs: Tensor, labels: Tensor, eps: float = 1e-12) -> Tensor:
    return -probs.double().gather(1, labels[:, None]).squeeze(1).clamp_min(eps).log()


def paired_nll_bootstrap(probs_ref: Tensor, probs: Tensor, labels: Tensor, n_resamples: int,
                         generator: torch.Generator) -> tuple[Tensor, Tensor]:
    """ΔNLL = NLL_ref − NLL_m of each of P methods: estimate (P,) and replicates (R, P), each
    replicate resampling the N test images with :func:`lib.resample.bootstrap_counts` (the same
    resample for all methods). probs_ref (N, C), probs (P, N, C), labels (N,)."""
    d = _nll_per_example(probs_ref, labels)[None] - torch.stack([_nll_per_example(p, labels) for p in probs])  # (P, N)
    n = labels.shape[0]
    counts = bootstrap_counts(n, n_resamples, generator, torch.float64, labels.device)
    return d.mean(1), counts @ d.T / n


def baseline_table(methods: Mapping[str, MethodPredictions], val_labels: Tensor, test_labels: Tensor, *,
                   reference: str = "MAP", temperature: str = "temperature scaling", n_bins: int = 15,
                   n_resamples: int = 1000, seed: int = 0, alpha: float = 0.05,
                   select_by: str = "nll") -> pd.DataFrame:
    """One row per method of ``methods`` (which must hold ``reference`` and ``temperature``).

    Columns: method, accuracy, ece, nll, brier, val_ece, val_nll, ms_per_image, peak_mib,
    train_seconds, extra_params, tuning, temperature, extra_ms; for ref in (map, ts): d_ece_<ref>, d_ece_<ref>_lo, d_ece_<ref>_hi, d_nll_<ref>,
    d_nll_<ref>_lo, d_nll_<ref>_hi; pareto_ece, pareto_nll, recommended. Bootstrap streams: CPU
    generators seeded ``seed`` (ΔECE) and ``seed + 1`` (ΔNLL) per reference. Formulas: module docstring.
    """
    for key in (reference, temperature):
        if key not in methods:
            raise ValueError(f"methods has no '{key}' entry; give the MAP and temperature-scaling rows too "
                             f"(methods: {sorted(methods)})")
    if select_by not in ("nll", "ece"):
        raise ValueError(f"select_by is {select_by!r}; use 'nll' or 'ece'")
    names = list(methods)
    test = torch.stack([methods[k].test.double() for k in names])
    rows = []
    for name in names:
        m = methods[name]
        s = calibration_summary(m.test.double(), test_labels, n_bins)
        rows.append({"method": name, "accuracy": s["accuracy"], "ece": s["ece"], "nll": s["nll"], "brier": s["brier"],
                     "val_ece": float(ece(m.val.double(), val_labels, n_bins)), "val_nll": float(nll(m.val.double(), val_labels)),
                     "ms_per_image": m.ms_per_image, "peak_mib": m.peak_mib, "train_seconds": m.train_seconds,
                     "extra_params": m.extra_params, "tuning": m.tuning, "temperature": m.temperature})
    table = pd.DataFrame(rows)
    table["extra_ms"] = table.ms_per_image - methods[reference].ms_per_image
    for tag, ref in (("map", reference), ("ts", temperature)):
        boot = paired_bootstrap(methods[ref].test.double(), test, test_labels, n_resamples,
                                torch.Generator().manual_seed(seed), n_bins)
        lo, hi = percentile_interval(boot.samples, alpha)
        table[f"d_ece_{tag}"], table[f"d_ece_{tag}_lo"], table[f"d_ece_{tag}_hi"] = (
            boot.estimate.numpy(), lo.numpy(), hi.numpy())
        est, reps = paired_nll_bootstrap(methods[ref].test, test, test_labels, n_resamples,
                                         torch.Generator().manual_seed(seed + 1))
        lo, hi = percentile_interval(reps, alpha)
        table[f"d_nll_{tag}"], table[f"d_nll_{tag}_lo"], table[f"d_nll_{tag}_hi"] = est.numpy(), lo.numpy(), hi.numpy()
    extra = torch.tensor(table.extra_ms.to_numpy(), dtype=torch.float64)
    for metric in ("ece", "nll"):
        table[f"pareto_{metric}"] = pareto_front(extra, -torch.tensor(table[metric].to_numpy(), dtype=torch.float64)).numpy()
    table["recommended"] = table.method == table.method[table[f"val_{select_by}"].idxmin()]
    return table
