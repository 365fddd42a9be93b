"""The baselines chapter's figure: calibration gain against prediction cost of every method of the
baseline table (:func:`lib.baselines.table.baseline_table`), drawing only, in the book's style."""

from __future__ import annotations

import matplotlib as mpl
import pandas as pd
import torch
from matplotlib.axes import Axes
from matplotlib.figure import Figure

from lib.baselines.table import TS_SUFFIX
from lib.figures import DELTA_LABEL, PP, label_points
from lib.stats import pareto_front
from lib.style import PALETTE, STYLE, WIDTH

SHORT = {"MAP": "MAP", "temperature scaling": "TS", "last-layer Laplace": "LLLA", "MC dropout": "MCD",
         "MC dropout, no dropout at test": "MCD det", "variational LoRA": "VL", "variational LoRA, mean gates": "VL mean",
         "MAP, fine-tuned further": "MAP+ft", "rank-wise Gaussian-dropout LoRA": "GDL",
         "rank-wise Gaussian-dropout LoRA, mean gates": "GDL mean"}
"""Point labels of the methods of :data:`lib.baselines.run.METHODS` and the reference rows (GDL: the
variational LoRA under its true name when it pruned nothing, :data:`lib.baselines.study.UNPRUNED`)."""


def short_method(name: str) -> str:
    """The point label of a baseline-table row: :data:`SHORT`, ``'Laplace, <label>'`` → ``'LA <label>'``
    (its first word), ``'LoRA ensemble, M = m'`` → ``'Ens m'``, and ``' + TS'`` appended as ``'+TS'``."""
    base, tuned = (name[: -len(TS_SUFFIX)], True) if name.endswith(TS_SUFFIX) else (name, False)
    if base in SHORT:
        out = SHORT[base]
    elif base.startswith("Laplace, "):
        out = "LA " + base[len("Laplace, "):].split()[0]
    elif base.startswith("LoRA ensemble, M = "):
        out = "Ens " + base.rsplit(" ", 1)[-1]
    else:
        out = base
    return out + ("+TS" if tuned else "")


def prepare_baseline_pareto(table: pd.DataFrame) -> pd.DataFrame:
    """One point per row of a baseline table: ``method``, ``label`` (:func:`short_method`), ``cost``
    (extra ms per image over MAP), ``delta``, ``lower``, ``upper`` (ΔECE over MAP with its paired
    interval), ``tuned`` (a ``+ TS`` row or temperature scaling), ``front`` (Pareto front minimising
    cost and maximising ΔECE, :func:`lib.stats.pareto_front`)."""
    need = ["method", "extra_ms", "d_ece_map", "d_ece_map_lo", "d_ece_map_hi", "tuning"]
    missing = [c for c in need if c not in table.columns]
    if missing:
        raise ValueError(f"prepare_baseline_pareto: table lacks columns {missing}; pass a baseline_table")
    out = pd.DataFrame({"method": table.method, "label": table.method.map(short_method), "cost": table.extra_ms,
                        "delta": table.d_ece_map, "lower": table.d_ece_map_lo, "upper": table.d_ece_map_hi,
                        "tuned": table.tuning == "temperature"})
    out["front"] = pareto_front(torch.tensor(out.cost.to_numpy(float)), torch.tensor(out.delta.to_numpy(float))).numpy()
    return out.reset_index(drop=True)


def plot_baseline_pareto(data: pd.DataFrame, ax: Axes | None = None) -> Figure:
    """ΔECE over MAP (pp, paired intervals as bars) against extra latency per image of every method of
    :func:`prepare_baseline_pareto`, temperature-tuned rows as filled squares, the others as circles,
    the Pareto front as a line; each point labelled."""
    need = ["label", "cost", "delta", "lower", "upper", "tuned", "front"]
    if not isinstance(data, pd.DataFrame) or any(c not in data.columns for c in need):
        raise ValueError(f"plot_baseline_pareto: data must be a prepare_baseline_pareto DataFrame with columns {need}")
    with mpl.rc_context(STYLE):
        if ax is None:
            fig = Figure(figsize=(WIDTH, 3.4), layout="constrained")
            ax = fig.add_subplot()
        else:
            fig = ax.get_figure()
        yerr = [(data.delta - data.lower) * PP, (data.upper - data.delta) * PP]
        ax.errorbar(data.cost, data.delta * PP, yerr=yerr, fmt="none", ecolor="0.75", elinewidth=0.7)
        for tuned, (marker, label) in {False: ("o", "as trained"), True: ("s", "temperature on validation")}.items():
            sel = (data.tuned == tuned).to_numpy()
            ax.scatter(data.cost[sel], data.delta[sel] * PP, marker=marker, s=18, label=label, zorder=3,
                       color=[PALETTE[1] if f else "0.45" for f in data.front[sel]])
        f = data[data.front].sort_values("cost")
        ax.plot(f.cost, f.delta * PP, "-", color=PALETTE[1], linewidth=1.2, label="Pareto front", zorder=2)
        ax.axhline(0.0, color="0.6", linewidth=0.6, linestyle="--")
        ax.set_xlabel("Extra latency over MAP (ms per image)")
        ax.set_ylabel(DELTA_LABEL)
        ax.legend(frameon=False, fontsize="small")
        label_points(ax, data.cost.to_numpy(float), data.delta.to_numpy(float) * PP, list(data.label))
    return fig
