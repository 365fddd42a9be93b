"""Figures for the layer-attribution report (matplotlib; drawing only).

Every ``plot_*(data, ax=None, ...) -> Figure`` takes prepared data (``prepare_*`` outputs, or a
pandas DataFrame with the documented columns), draws it on ``ax`` (or on a new 6.5-inch-wide
figure when ``ax`` is None) and returns the Figure. Figures are built with
``matplotlib.figure.Figure`` (no pyplot state), fonts >= 8 pt at 6.5 in, the Okabe-Ito
colorblind-safe palette :cite:`okabe2008color` (style: :mod:`lib.style`) and ``cividis`` for heat maps, vector artists only
(PDF/SVG friendly), axis labels with units and no titles (captions live in the report).

ECE differences are stored as fractions and *displayed in percentage points* (x 100).
"""

from __future__ import annotations

from typing import Mapping, Sequence

import matplotlib as mpl
import numpy as np
import pandas as pd
import torch
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from lib.calibration import ReliabilityData
from lib.names import display_name
from lib.stats import pareto_front
from lib.style import PALETTE, STYLE, WIDTH

__all__ = [
    "plot_reliability",
    "plot_delta_ranked",
    "plot_delta_scatter",
    "plot_rank_heatmap",
    "plot_shapley",
    "plot_cumulative",
    "plot_leave_one_out",
    "prepare_pareto",
    "prepare_pareto_from_tables",
    "plot_pareto",
    "prepare_training_curves",
    "plot_training_curves",
    "plot_block_quantities",
    "plot_curvature_quality",
    "plot_latency",
    "plot_delta_scatter_grid",
]

PP = 100.0  # fraction -> percentage points
DELTA_LABEL = "ΔECE = ECE$_\\mathrm{det}$ − ECE$_\\mathrm{Bayes}$ (pp)"


def _require(df: pd.DataFrame, columns: Sequence[str], fn: str) -> None:
    if not isinstance(df, pd.DataFrame):
        raise ValueError(f"{fn}: data must be a pandas DataFrame with columns {list(columns)}; got {type(df).__name__}")
    missing = [c for c in columns if c not in df.columns]
    if missing:
        raise ValueError(f"{fn}: data is missing columns {missing}; expected {list(columns)}")


def _new(ax: Axes | None, height: float) -> tuple[Figure, Axes]:
    if ax is not None:
        return ax.get_figure(), ax
    fig = Figure(figsize=(WIDTH, height), layout="constrained")
    return fig, fig.add_subplot()


def _new_row(ax: Sequence[Axes] | None, n: int, height: float, fn: str, what: str, **share) -> tuple[Figure, list[Axes]]:
    """A row of ``n`` panels (``share``: ``sharex``/``sharey``), or the ``n`` given axes (``what``
    names the panels in the error when their number is wrong)."""
    if ax is None:
        fig = Figure(figsize=(WIDTH, height), layout="constrained")
        return fig, list(fig.subplots(1, n, squeeze=False, **share)[0])
    axes = list(ax)
    if len(axes) != n:
        raise ValueError(f"{fn}: {n} {what} need {n} axes, got {len(axes)}")
    return axes[0].get_figure(), axes


def _yerr(df: pd.DataFrame, value: str, lower: str, upper: str) -> np.ndarray:
    v = df[value].to_numpy(float)
    return np.abs(np.stack([v - df[lower].to_numpy(float), df[upper].to_numpy(float) - v])) * PP


def _label_ticks(ax: Axes, labels: Sequence) -> None:
    """One tick per bar/point, labelled; slanted when more than 6 (e.g. 12 transformer blocks)."""
    crowded = len(labels) > 6
    ax.set_xticks(np.arange(len(labels)), [str(v) for v in labels], rotation=45 if crowded else 0,
                  ha="right" if crowded else "center")


_LABEL_SPOTS = [(dx * r, dy * r, ha, va) for r in (1, 2.5, 4.5) for dx, dy, ha, va in (
    (3, 3, "left", "bottom"), (3, -3, "left", "top"), (-3, 3, "right", "bottom"), (-3, -3, "right", "top"),
    (0, 4, "center", "bottom"), (0, -4, "center", "top"), (5, 0, "left", "center"), (-5, 0, "right", "center"))]
"""Candidate label positions around a point: offset (points) and alignment, nearest first."""


def _label_box(px: np.ndarray, spot: tuple, w: float, h: float, pt: float) -> np.ndarray:
    """Display-space box (x0, y0, x1, y1) of a ``w`` × ``h`` px label at ``spot`` of point ``px``."""
    dx, dy, ha, va = spot
    x0 = px[0] + dx * pt - {"left": 0.0, "center": w / 2, "right": w}[ha]
    y0 = px[1] + dy * pt - {"bottom": 0.0, "center": h / 2, "top": h}[va]
    return np.array([x0, y0, x0 + w, y0 + h])


def _overlap(a: np.ndarray, b: np.ndarray) -> float:
    return max(0.0, min(a[2], b[2]) - max(a[0], b[0])) * max(0.0, min(a[3], b[3]) - max(a[1], b[1]))


def label_points(ax: Axes, x: Sequence[float], y: Sequence[float], labels: Sequence, fontsize: float = 8) -> list:
    """Annotate every point ``(x, y)`` with its label so that no two labels and no label and marker
    overlap where avoidable: labels are placed greedily (points in order of their y value, highest
    first) at the first of :data:`_LABEL_SPOTS` that collides with nothing placed before and stays
    inside the axes, else at the spot with the least overlap. Returns the annotations."""
    fig = ax.get_figure()
    fig.draw_without_rendering()  # final layout, so data → display coordinates hold
    pts = ax.transData.transform(np.column_stack([np.asarray(x, float), np.asarray(y, float)]))
    pt = fig.dpi / 72
    marker = 3 * pt
    boxes = [np.array([p[0] - marker, p[1] - marker, p[0] + marker, p[1] + marker]) for p in pts]
    frame = ax.get_window_extent()
    out = []
    for i in np.argsort(-pts[:, 1], kind="stable"):
        text = str(labels[i])
        w, h = 0.62 * fontsize * len(text) * pt, 1.05 * fontsize * pt
        best, best_cost = None, np.inf
        for spot in _LABEL_SPOTS:
            box = _label_box(pts[i], spot, w, h, pt)
            inside = box[0] >= frame.x0 and box[2] <= frame.x1 and box[1] >= frame.y0 and box[3] <= frame.y1
            cost = sum(_overlap(box, b) for b in boxes) + (0.0 if inside else w * h)
            if cost < best_cost:
                best, best_cost = (spot, box), cost
            if cost == 0:
                break
        (dx, dy, ha, va), box = best
        boxes.append(box)
        ann = ax.annotate(text, (x[i], y[i]), xytext=(dx, dy), textcoords="offset points", ha=ha, va=va,
                          fontsize=fontsize)
        ann.set_in_layout(False)
        out.append(ann)
    return out


def plot_reliability(data: Mapping[str, ReliabilityData], ax: Sequence[Sequence[Axes]] | None = None) -> Figure:
    """Reliability diagrams as small multiples, one column per model, with count histograms.

    Args:
        data: ordered mapping model name -> :class:`lib.calibration.ReliabilityData` (e.g.
            ``{"Deterministic": ..., "Bayes (block 7)": ..., "All blocks": ...}``).
        ax: optional 2 x K grid of Axes (row 0 reliability, row 1 counts).

    Top row: per-bin accuracy as bars over the bin; a dot at (mean confidence, accuracy) of each
    bin, whose vertical segment to the diagonal is the bin's calibration gap (accuracy − mean
    confidence); the point mass at confidence 1 (see :mod:`lib.calibration`) is a diamond. The
    legend sits above the panels, clear of the bars. Bottom row: examples per bin (log).
    """
    if not data:
        raise ValueError("plot_reliability: data must map at least one model name to ReliabilityData")
    k = len(data)
    with mpl.rc_context(STYLE):
        if ax is None:
            fig = Figure(figsize=(WIDTH, 3.5), layout="constrained")
            axes = fig.subplots(2, k, sharex=True, squeeze=False, gridspec_kw={"height_ratios": [3, 1]})
        else:
            axes = np.asarray(ax, dtype=object).reshape(2, k)
            fig = axes[0, 0].get_figure()
        for j, (name, rd) in enumerate(data.items()):
            top, bottom = axes[0, j], axes[1, j]
            edges = rd.edges.numpy()
            m = len(edges) - 1
            acc, conf, cnt = rd.accuracy.numpy(), rd.confidence.numpy(), rd.count.numpy()
            has = cnt[:m] > 0
            left, width = edges[:-1][has], np.diff(edges)[has]
            top.bar(left, acc[:m][has], width=width, align="edge", color=PALETTE[0], alpha=0.8,
                    edgecolor="white", linewidth=0.5, label="Accuracy of the bin")
            top.plot(conf[:m][has], acc[:m][has], "o", color=PALETTE[1], markersize=3,
                     label="Accuracy at the bin's mean confidence")
            top.vlines(conf[:m][has], np.minimum(acc[:m][has], conf[:m][has]),
                       np.maximum(acc[:m][has], conf[:m][has]), color=PALETTE[1], linewidth=1,
                       label="Gap to the diagonal")
            if cnt[m] > 0:
                top.plot([1.0], [acc[m]], "D", color=PALETTE[3], markersize=4, label="Confidence = 1")
            top.plot([0, 1], [0, 1], "--", color="0.4", linewidth=0.8, label="Perfect calibration")
            top.set_xlim(0, 1)
            top.set_ylim(0, 1)
            top.set_title(name)
            top.text(0.04, 0.96, f"ECE = {rd.ece * PP:.2f}%", transform=top.transAxes, fontsize=8, va="top")
            bottom.bar(edges[:-1], np.maximum(cnt[:m], 0), width=np.diff(edges), align="edge",
                       color="0.55", edgecolor="white", linewidth=0.5)
            bottom.set_yscale("symlog", linthresh=1)
            bottom.set_xlabel("Top-label confidence")
            if j == 0:
                top.set_ylabel("Accuracy (fraction)")
                bottom.set_ylabel("Count (examples)")
        handles, labels = axes[0, 0].get_legend_handles_labels()
        for a in axes[0, 1:]:  # a diamond drawn in another panel only
            for h, lab in zip(*a.get_legend_handles_labels()):
                if lab not in labels:
                    handles.append(h)
                    labels.append(lab)
        fig.legend(handles, labels, loc="outside upper center", ncol=min(len(labels), 3), frameon=False)
    return fig


ALL_BLOCKS = "all blocks"
"""The ``layer`` of the all-block posterior in :func:`plot_delta_ranked` data."""


def plot_delta_ranked(data: pd.DataFrame, ax: Axes | None = None, reference: float | None = None,
                      reference_label: str = "Temperature scaling") -> Figure:
    """Ranked bars of Delta_ECE(l) with CI error bars and a zero line (positive = improvement).

    The all-block posterior (``layer == "all blocks"``), when present, is drawn first, hatched in
    grey and separated from the ranked single blocks by a vertical line; ``reference`` (a
    fraction, e.g. temperature scaling's ECE_det − ECE_TS) is drawn as a dashed horizontal line
    labelled ``reference_label``.

    Args:
        data: DataFrame with columns ``layer`` (str or int), ``delta``, ``lower``, ``upper``
            (fractions; e.g. from :func:`lib.stats.paired_bootstrap` + an interval).
    """
    _require(data, ["layer", "delta", "lower", "upper"], "plot_delta_ranked")
    ranked = data.sort_values("delta", ascending=False, kind="stable")
    is_all = ranked["layer"].astype(str) == ALL_BLOCKS
    df = pd.concat([ranked[is_all], ranked[~is_all]])
    n_all = int(is_all.sum())
    own = ax is None
    with mpl.rc_context(STYLE):
        fig, ax = _new(ax, 2.8)
        x = np.arange(len(df))
        colors = [PALETTE[0] if v > 0 else PALETTE[1] for v in df["delta"]]
        bars = ax.bar(x, df["delta"].to_numpy(float) * PP, color=colors, yerr=_yerr(df, "delta", "lower", "upper"),
                      error_kw={"elinewidth": 0.8, "capsize": 2, "ecolor": "0.2"})
        for bar in bars.patches[:n_all]:
            bar.set_facecolor("0.6")
            bar.set_hatch("//")
            bar.set_edgecolor("0.25")
            bar.set_label("All blocks")
        if n_all and len(df) > n_all:
            ax.axvline(n_all - 0.5, color="0.3", linewidth=0.8, linestyle=":")
        ax.axhline(0, color="0.2", linewidth=0.8)
        if reference is not None:
            ax.axhline(reference * PP, color=PALETTE[2], linestyle="--", linewidth=1.2,
                       label=f"{reference_label} ({reference * PP:+.2f} pp)".replace("-", "−"))
        _label_ticks(ax, df["layer"])
        ax.set_xlabel("Posterior (blocks with Laplace covariance); single blocks ranked")
        ax.set_ylabel(DELTA_LABEL)
        if n_all or reference is not None:  # above the axes, clear of bars and reference line
            if own:
                fig.legend(*ax.get_legend_handles_labels(), loc="outside upper center", ncol=2, frameon=False)
            else:
                ax.legend(frameon=False)
    return fig


def plot_delta_scatter(data: pd.DataFrame, ax: Axes | None = None, xlabel: str = "Block depth (index)") -> Figure:
    """Scatter of Delta_ECE against a per-posterior quantity, with CI bars on both axes if given.

    Use for Delta_ECE vs depth, vs Delta accuracy, vs Delta NLL, vs prior precision / curvature
    trace: put that quantity in ``x`` and name it, with units, in ``xlabel``. Integer-valued ``x``
    (block indices) gets integer ticks; positive ``x`` spanning more than a factor of 20 (e.g.
    curvature traces) a log axis.

    Args:
        data: DataFrame with columns ``x``, ``delta``, ``lower``, ``upper``; optional
            ``x_lower``, ``x_upper`` (CI of x, same units as x) and ``label`` (point annotation,
            placed by :func:`label_points` so that labels do not collide).
    """
    _require(data, ["x", "delta", "lower", "upper"], "plot_delta_scatter")
    if not xlabel:
        raise ValueError("plot_delta_scatter: xlabel must name the x quantity and its unit")
    with mpl.rc_context(STYLE):
        fig, ax = _new(ax, 2.6)
        x = data["x"].to_numpy(float)
        xerr = None
        if {"x_lower", "x_upper"} <= set(data.columns):
            xerr = np.abs(np.stack([x - data["x_lower"].to_numpy(float), data["x_upper"].to_numpy(float) - x]))
        ax.errorbar(x, data["delta"].to_numpy(float) * PP, yerr=_yerr(data, "delta", "lower", "upper"), xerr=xerr,
                    fmt="o", color=PALETTE[0], markersize=4, elinewidth=0.8, capsize=2)
        ax.axhline(0, color="0.2", linewidth=0.8)
        finite = x[np.isfinite(x)]
        if len(finite) and np.all(finite == np.round(finite)):
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        elif len(finite) and finite.min() > 0 and finite.max() > 20 * finite.min():
            ax.set_xscale("log")
        ax.set_xlabel(xlabel)
        ax.set_ylabel(DELTA_LABEL)
        if "label" in data.columns:
            label_points(ax, x, data["delta"].to_numpy(float) * PP, list(data["label"]))
    return fig


def plot_rank_heatmap(data: pd.DataFrame, ax: Axes | None = None) -> Figure:
    """Heat map of bootstrap rank probabilities (layers x ranks), each cell annotated with its
    probability in percent (blank below 0.5%); the colour scale (viridis) runs from 0 to the
    largest probability, so that small differences stay visible.

    Args:
        data: DataFrame, index = layer names, columns = ranks 1..P, values = probabilities
            (e.g. ``pd.DataFrame(lib.stats.rank_probabilities(samples).numpy(), index=names,
            columns=range(1, P + 1))``).
    """
    if not isinstance(data, pd.DataFrame) or data.shape[0] == 0:
        raise ValueError("plot_rank_heatmap: data must be a non-empty DataFrame (index layers, columns ranks)")
    values = data.to_numpy(float)
    vmax = max(float(np.nanmax(values)), 1e-12)
    cmap = mpl.colormaps["viridis"]
    with mpl.rc_context(STYLE):
        fig, ax = _new(ax, 1.0 + 0.26 * data.shape[0])
        im = ax.imshow(values, cmap=cmap, vmin=0, vmax=vmax, aspect="auto", interpolation="nearest")
        for (i, j), v in np.ndenumerate(values):
            if v >= 0.005:
                dark = np.dot(cmap(v / vmax)[:3], [0.299, 0.587, 0.114]) < 0.5
                ax.text(j, i, f"{100 * v:.0f}", ha="center", va="center", fontsize=8,
                        color="white" if dark else "black")
        ax.set_xticks(np.arange(data.shape[1]), [str(c) for c in data.columns])
        ax.set_yticks(np.arange(data.shape[0]), [str(i) for i in data.index])
        ax.set_xlabel("Rank (1 = largest ΔECE)")
        ax.set_ylabel("Posterior (blocks)")
        cb = fig.colorbar(im, ax=ax, shrink=0.9)
        cb.set_label("Bootstrap probability")
    return fig


def plot_shapley(data: pd.DataFrame, ax: Axes | None = None) -> Figure:
    """Shapley values of blocks for v(S) = ECE_det - ECE(S), with CI bars, in block order.

    Args:
        data: DataFrame with columns ``layer``, ``phi``, ``lower``, ``upper`` (fractions).
    """
    _require(data, ["layer", "phi", "lower", "upper"], "plot_shapley")
    with mpl.rc_context(STYLE):
        fig, ax = _new(ax, 2.6)
        x = np.arange(len(data))
        ax.bar(x, data["phi"].to_numpy(float) * PP, color=PALETTE[2], yerr=_yerr(data, "phi", "lower", "upper"),
               error_kw={"elinewidth": 0.8, "capsize": 2, "ecolor": "0.2"})
        ax.axhline(0, color="0.2", linewidth=0.8)
        _label_ticks(ax, data["layer"])
        ax.set_xlabel("Transformer block")
        ax.set_ylabel("Shapley value of ΔECE (pp)")
    return fig


def plot_cumulative(data: pd.DataFrame, ax: Sequence[Axes] | None = None) -> Figure:
    """Delta_ECE of the first-k (left panel) and last-k (right panel) block posteriors vs k, with
    CI error bars; the panels share the y axis, so that the two series can be compared without
    their intervals overlapping.

    Args:
        data: DataFrame with columns ``k`` and, for ``s`` in (``first_k``, ``last_k``), ``s``,
            ``s_lower``, ``s_upper`` (fractions).
        ax: optional pair of Axes (first k, last k).
    """
    cols = ["k"] + [f"{s}{suf}" for s in ("first_k", "last_k") for suf in ("", "_lower", "_upper")]
    _require(data, cols, "plot_cumulative")
    with mpl.rc_context(STYLE):
        if ax is None:
            fig = Figure(figsize=(WIDTH, 2.6), layout="constrained")
            axes = fig.subplots(1, 2, sharey=True)
        else:
            axes = list(ax)
            if len(axes) != 2:
                raise ValueError(f"plot_cumulative: needs 2 axes (first k, last k), got {len(axes)}")
            fig = axes[0].get_figure()
        k = data["k"].to_numpy(float)
        for i, (a, s, title) in enumerate(zip(axes, ("first_k", "last_k"),
                                              ("First k blocks (from the input)", "Last k blocks (from the output)"))):
            a.errorbar(k, data[s].to_numpy(float) * PP, yerr=_yerr(data, s, f"{s}_lower", f"{s}_upper"), fmt="o-",
                       color=PALETTE[i], markersize=3, elinewidth=0.8, capsize=2)
            a.axhline(0, color="0.2", linewidth=0.8)
            a.set_title(title)
            a.xaxis.set_major_locator(MaxNLocator(integer=True))
            a.set_xlabel("Number of Bayesian blocks k")
        axes[0].set_ylabel(DELTA_LABEL)
    return fig


def plot_leave_one_out(data: pd.DataFrame, ax: Axes | None = None, reference: float | None = None) -> Figure:
    """Delta_ECE of leave-one-out posteriors (all blocks but l) vs the left-out block l.

    Args:
        data: DataFrame with columns ``layer``, ``delta``, ``lower``, ``upper`` (fractions).
        reference: Delta_ECE of the all-blocks posterior (fraction), drawn as a dashed line.
    """
    _require(data, ["layer", "delta", "lower", "upper"], "plot_leave_one_out")
    with mpl.rc_context(STYLE):
        fig, ax = _new(ax, 2.6)
        x = np.arange(len(data))
        ax.errorbar(x, data["delta"].to_numpy(float) * PP, yerr=_yerr(data, "delta", "lower", "upper"), fmt="o-",
                    color=PALETTE[0], markersize=4, elinewidth=0.8, capsize=2, label="All blocks but l")
        if reference is not None:
            ax.axhline(reference * PP, color=PALETTE[1], linestyle="--", linewidth=1, label="All blocks")
        ax.axhline(0, color="0.2", linewidth=0.8)
        _label_ticks(ax, data["layer"])
        ax.set_xlabel("Left-out block l")
        ax.set_ylabel(DELTA_LABEL)
        ax.legend(frameon=False)
    return fig


def prepare_pareto(names: Sequence[str], cost: torch.Tensor, delta: torch.Tensor,
                   lower: torch.Tensor | None = None, upper: torch.Tensor | None = None) -> pd.DataFrame:
    """DataFrame for :func:`plot_pareto`: columns ``name``, ``cost``, ``delta``, [``lower``,
    ``upper``], ``front`` (bool, :func:`lib.stats.pareto_front` minimising cost, maximising delta)."""
    if len(names) != cost.shape[0] or cost.shape != delta.shape:
        raise ValueError("prepare_pareto: names, cost and delta must have the same length")
    df = pd.DataFrame({"name": list(names), "cost": cost.cpu().numpy(), "delta": delta.cpu().numpy()})
    if lower is not None and upper is not None:
        df["lower"], df["upper"] = lower.cpu().numpy(), upper.cpu().numpy()
    df["front"] = pareto_front(cost.cpu(), delta.cpu()).numpy()
    return df


def prepare_pareto_from_tables(latency: pd.DataFrame, table: pd.DataFrame) -> pd.DataFrame:
    """:func:`prepare_pareto` of every posterior that is both priced and attributed.

    ``latency``: :func:`lib.deploy.latency_table` rows (``posterior``, ``extra_ms``: extra latency per
    image over the deterministic model); ``table``: :func:`lib.attribution.attribution` rows
    (``posterior``, ``delta``, ``lower``, ``upper``). Rows follow ``latency``'s order.
    """
    _require(latency, ["posterior", "extra_ms"], "prepare_pareto_from_tables (latency)")
    _require(table, ["posterior", "delta", "lower", "upper"], "prepare_pareto_from_tables (table)")
    t = table.set_index("posterior")
    priced = latency[latency.posterior != "deterministic"].set_index("posterior")
    names = [n for n in priced.index if n in t.index]
    if not names:
        raise ValueError("prepare_pareto_from_tables: no posterior is both in the latency table and in the attribution table")
    col = lambda df, c: torch.tensor(df.loc[names, c].to_numpy(dtype=float))  # noqa: E731
    return prepare_pareto(names, col(priced, "extra_ms"), col(t, "delta"), col(t, "lower"), col(t, "upper"))


PARETO_KINDS = {"single": ("o", "single block ℓ (label ℓ)"), "first": ("^", "first k blocks (label Fk)"),
                "last": ("v", "last k blocks (label Lk)"), "all": ("*", "all blocks")}
"""Marker and legend entry of each kind of priced block choice in :func:`plot_pareto`."""


def short_name(name: str) -> str:
    """Point label of a priced block choice: ``single 3`` → ``3``, ``first 4`` → ``F4``,
    ``last 2`` → ``L2``, ``all`` → ``all`` (the legend of :func:`plot_pareto` explains them)."""
    kind, _, k = str(name).partition(" ")
    return {"single": k, "first": f"F{k}", "last": f"L{k}"}.get(kind, str(name))


def plot_pareto(data: pd.DataFrame, ax: Axes | None = None) -> Figure:
    """Extra latency per image (ms) vs Delta_ECE of every priced block choice, each point labelled
    (:func:`short_name`, marker by kind), with the Pareto front drawn as a line (deployment chapter).

    Args:
        data: DataFrame from :func:`prepare_pareto` (columns ``name``, ``cost`` in ms per image,
            ``delta``, ``front``; optional ``lower``, ``upper`` for CI bars).
    """
    _require(data, ["name", "cost", "delta", "front"], "plot_pareto")
    own = ax is None
    with mpl.rc_context(STYLE):
        fig, ax = _new(ax, 3.4)
        front = data["front"].to_numpy(bool)
        yerr = _yerr(data, "delta", "lower", "upper") if {"lower", "upper"} <= set(data.columns) else None
        ax.errorbar(data["cost"], data["delta"] * PP, yerr=yerr, fmt="none", ecolor="0.75", elinewidth=0.7)
        kinds = data["name"].astype(str).str.split().str[0]
        for kind, (marker, label) in PARETO_KINDS.items():
            sel = (kinds == kind).to_numpy()
            if sel.any():
                ax.scatter(data["cost"][sel], data["delta"][sel] * PP, marker=marker, s=26 if kind == "all" else 16,
                           color=[PALETTE[1] if f else "0.45" for f in front[sel]], label=label, zorder=3)
        f = data[front].sort_values("cost")
        ax.plot(f["cost"], f["delta"] * PP, "-", color=PALETTE[1], linewidth=1.2, label="Pareto front", zorder=2)
        ax.set_xlabel("Extra latency (ms per image)")
        ax.set_ylabel(DELTA_LABEL)
        handles, labels = ax.get_legend_handles_labels()
        leg = (fig.legend(handles, labels, loc="outside upper center", ncol=3, frameon=False) if own
               else ax.legend(handles, labels, frameon=False))
        for h in leg.legend_handles[:-1]:  # markers by kind in one colour; the front's colour is the line's
            h.set_color("0.45")
        label_points(ax, data["cost"].to_numpy(float), data["delta"].to_numpy(float) * PP,
                     [short_name(n) for n in data["name"]])
    return fig


def prepare_training_curves(histories: Mapping[str, Sequence[Mapping]]) -> pd.DataFrame:
    """Long DataFrame (``run``, ``epoch``, ``train_loss``, ``val_loss``, ``val_acc``) from
    :func:`lib.train.fit` histories keyed by run name (e.g. ``"pre-training"``, ``"seed 0"``)."""
    rows = [{"run": run, **{k: h[k] for k in ("epoch", "train_loss", "val_loss", "val_acc")}}
            for run, hist in histories.items() for h in hist]
    if not rows:
        raise ValueError("prepare_training_curves: histories are empty")
    return pd.DataFrame(rows)


def plot_training_curves(data: pd.DataFrame, ax: Sequence[Axes] | None = None) -> Figure:
    """Training and validation loss (left) and validation accuracy (right) per epoch and run."""
    _require(data, ["run", "epoch", "train_loss", "val_loss", "val_acc"], "plot_training_curves")
    with mpl.rc_context(STYLE):
        if ax is None:
            fig = Figure(figsize=(WIDTH, 2.6), layout="constrained")
            axes = fig.subplots(1, 2)
        else:
            axes = list(ax)
            fig = axes[0].get_figure()
        for i, (run, d) in enumerate(data.groupby("run", sort=False)):
            c = PALETTE[i % len(PALETTE)]
            axes[0].plot(d.epoch, d.train_loss, "-", color=c, label=f"{run} (train)")
            axes[0].plot(d.epoch, d.val_loss, "--", color=c, label=f"{run} (val.)")
            axes[1].plot(d.epoch, d.val_acc * 100, "-", color=c, label=run)
        axes[0].set_xlabel("Epoch")
        axes[0].set_ylabel("Cross-entropy (nats)")
        axes[1].set_xlabel("Epoch")
        axes[1].set_ylabel("Validation accuracy (%)")
        axes[0].legend(frameon=False, ncol=1 if data.run.nunique() < 3 else 2, fontsize=7)
    return fig


def plot_block_quantities(data: pd.DataFrame, columns: Sequence[tuple[str, str]], ax: Sequence[Axes] | None = None) -> Figure:
    """Per-block bars of several posterior quantities, one panel each, with seed ranges.

    Args:
        data: DataFrame with ``block`` and, for each ``(column, label)`` in ``columns``, ``column``
            (mean over seeds) and optional ``column_min``/``column_max`` (range over seeds).
        columns: the quantities to draw and their axis labels (log scale).
    """
    _require(data, ["block", *[c for c, _ in columns]], "plot_block_quantities")
    with mpl.rc_context(STYLE):
        fig, axes = _new_row(ax, len(columns), 2.4, "plot_block_quantities", "quantities", sharex=True)
        for a, (col, label) in zip(axes, columns):
            v = data[col].to_numpy(float)
            err = None
            if {f"{col}_min", f"{col}_max"} <= set(data.columns):
                err = np.abs(np.stack([v - data[f"{col}_min"].to_numpy(float), data[f"{col}_max"].to_numpy(float) - v]))
            a.bar(data.block, v, yerr=err, color=PALETTE[0], ecolor="0.3", capsize=1.5)
            a.set_yscale("log")
            a.set_xlabel("Block")
            a.set_ylabel(label)
    return fig


def plot_curvature_quality(data: pd.DataFrame, ax: Sequence[Axes] | None = None) -> Figure:
    """Trace ratio ``tr Ĝ / tr G`` of each approximation against the exact block GGN, per block.

    One log-scale panel per approximation (in order of appearance), one line per module (and
    ``block``) over the block index, mean over seeds, with a dotted line at 1 (correct scale).

    Args:
        data: the table of :func:`lib.laplace.quality.prepare_curvature_quality` (columns
            ``approximation``, ``module``, ``block``, ``trace_ratio``).
    """
    _require(data, ["approximation", "module", "block", "trace_ratio"], "plot_curvature_quality")
    approximations = list(dict.fromkeys(data.approximation))
    modules = list(dict.fromkeys(data.module))
    mean = data.groupby(["approximation", "module", "block"]).trace_ratio.mean()
    with mpl.rc_context(STYLE):
        fig, axes = _new_row(ax, len(approximations), 2.4, "plot_curvature_quality", "approximations", sharey=True)
        for a, name in zip(axes, approximations):
            for i, m in enumerate(modules):
                series = mean[name, m]
                a.plot(series.index, series.to_numpy(float), marker="o", ms=3, color=PALETTE[i % len(PALETTE)],
                       label=m, ls="--" if m == "block" else "-")
            a.axhline(1.0, color="0.4", lw=0.8, ls=":")
            a.set_yscale("log")
            a.set_title(name)
            a.set_xlabel("Block")
            a.xaxis.set_major_locator(MaxNLocator(integer=True))
        axes[0].set_ylabel("tr(approx) / tr(exact GGN)")
        axes[-1].legend(frameon=False)
    return fig


def plot_latency(data: pd.DataFrame, ax: Axes | None = None) -> Figure:
    """Latency per image of each block choice: the median (bars) with its inter-quartile range
    (error bars, when ``ms_q25``/``ms_q75`` are given), the deterministic model as a line.

    Args:
        data: DataFrame with ``posterior``, ``ms_per_image`` (median) and optional ``ms_q25``,
            ``ms_q75`` (:func:`lib.deploy.latency_table`); the row ``"deterministic"`` is the line.
            Tick labels are the posteriors' reader names (:func:`lib.names.display_name`).
    """
    _require(data, ["posterior", "ms_per_image"], "plot_latency")
    with mpl.rc_context(STYLE):
        fig, ax = _new(ax, 3.0)
        det = data[data.posterior == "deterministic"]
        rest = data[data.posterior != "deterministic"]
        med = rest.ms_per_image.to_numpy(float)
        yerr = None
        if {"ms_q25", "ms_q75"} <= set(data.columns):
            yerr = np.abs(np.stack([med - rest.ms_q25.to_numpy(float), rest.ms_q75.to_numpy(float) - med]))
        ax.bar(range(len(rest)), med, yerr=yerr, color=PALETTE[0],
               error_kw={"elinewidth": 0.8, "capsize": 1.5, "ecolor": "0.2"})
        ax.set_xticks(range(len(rest)), [display_name(n) for n in rest.posterior], rotation=90)
        if len(det):
            ax.axhline(float(det.ms_per_image.iloc[0]), color=PALETTE[1], linestyle="--", label="Deterministic (MAP)")
            ax.legend(frameon=False)
        ax.set_ylabel("Latency (ms per image; median, IQR)" if yerr is not None else "Latency (ms per image)")
    return fig


def plot_delta_scatter_grid(panels: Mapping[str, pd.DataFrame]) -> Figure:
    """Several :func:`plot_delta_scatter` panels side by side (2 per row), keyed by x-axis label."""
    if not panels:
        raise ValueError("plot_delta_scatter_grid: panels must not be empty")
    rows = (len(panels) + 1) // 2
    with mpl.rc_context(STYLE):
        fig = Figure(figsize=(WIDTH, 2.5 * rows), layout="constrained")
        axes = fig.subplots(rows, 2, squeeze=False).ravel()
        for a, (xlabel, df) in zip(axes, panels.items()):
            plot_delta_scatter(df, ax=a, xlabel=xlabel)
        for a in axes[len(panels):]:
            a.set_visible(False)
    return fig
