"""The shift chapter's figure: Ovadia-style boxes per severity (:cite:`ovadia2019can`) of the box
statistics that :func:`lib.shift.prepare_shift_boxes` computes (drawing only, in the book's style,
:mod:`lib.style`; kept apart from :mod:`lib.shift` so that no stage's code reaches matplotlib)."""

from __future__ import annotations

import matplotlib as mpl
import numpy as np
import pandas as pd
from matplotlib.axes import Axes
from matplotlib.figure import Figure

from lib.shift import METRICS
from lib.style import PALETTE, STYLE, WIDTH

_AXIS_LABELS = {"accuracy": "Accuracy (%)", "ece": "ECE (%)", "nll": "NLL (nats)", "brier": "Brier score"}
_PERCENT = {"accuracy", "ece"}


def plot_shift_boxes(data: pd.DataFrame, metric: str, ax: Axes | None = None) -> Figure:
    """Draw :func:`lib.shift.prepare_shift_boxes` output: one group of boxes per severity (0 = clean), one
    box per method in the Okabe-Ito colours of :mod:`lib.style`; accuracy and ECE in percent."""
    need = ["severity", "method", "q1", "med", "q3", "whislo", "whishi", "fliers", "mean"]
    if not isinstance(data, pd.DataFrame) or any(c not in data.columns for c in need):
        raise ValueError(f"plot_shift_boxes: data must be a prepare_shift_boxes DataFrame with columns {need}")
    if metric not in METRICS:
        raise ValueError(f"metric must be one of {METRICS}; got {metric!r}")
    scale = 100.0 if metric in _PERCENT else 1.0
    methods = list(dict.fromkeys(data["method"]))
    severities = sorted(data["severity"].unique())
    width = 0.8 / len(methods)
    with mpl.rc_context(STYLE):
        if ax is None:
            fig = Figure(figsize=(WIDTH, 3.0), layout="constrained")
            ax = fig.add_subplot()
        else:
            fig = ax.get_figure()
        for k, method in enumerate(methods):
            sub = data[data["method"] == method]
            stats = [{"med": r.med * scale, "q1": r.q1 * scale, "q3": r.q3 * scale, "whislo": r.whislo * scale,
                      "whishi": r.whishi * scale, "fliers": np.asarray(r.fliers) * scale, "mean": r.mean * scale}
                     for r in sub.itertuples()]
            pos = [severities.index(s) - 0.4 + width * (k + 0.5) for s in sub["severity"]]
            colour = PALETTE[k % len(PALETTE)]
            ax.bxp(stats, positions=pos, widths=width * 0.85, patch_artist=True, manage_ticks=False,
                   boxprops={"facecolor": colour, "edgecolor": colour, "alpha": 0.6},
                   medianprops={"color": "black"}, whiskerprops={"color": colour}, capprops={"color": colour},
                   flierprops={"markeredgecolor": colour, "markersize": 3})
            ax.plot([], [], color=colour, linewidth=6, alpha=0.6, label=method)
        ax.set_xticks(range(len(severities)), ["clean" if s == 0 else str(s) for s in severities])
        ax.set_xlim(-0.5, len(severities) - 0.5)
        ax.set_xlabel("Corruption severity")
        ax.set_ylabel(_AXIS_LABELS[metric])
        ax.legend(frameon=False, ncols=min(len(methods), 3), loc="lower center", bbox_to_anchor=(0.5, 1.0))
    return fig
