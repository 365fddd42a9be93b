"""Figures for the layer-attribution report (matplotlib; drawing only).

Every ``plot_*(data, ax=None, ...) -> Figure`` takes prepared data (``prepare_*`` outputs, or a
pandas DataFrame with the documented columns), draws it on ``ax`` (or on a new 6.5-inch-wide
figure when ``ax`` is None) and returns the Figure. Figures are built with
``matplotlib.figure.Figure`` (no pyplot state), fonts >= 8 pt at 6.5 in, the Okabe-Ito
colorblind-safe palette :cite:`okabe2008color` and ``cividis`` for heat maps, vector artists only
(PDF/SVG friendly), axis labels with units and no titles (captions live in the report).

ECE differences are stored as fractions and *displayed in percentage points* (x 100).
"""

from __future__ import annotations

import io
from typing import Mapping, Sequence

import matplotlib as mpl
import numpy as np
import pandas as pd
import torch
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from lib.calibration import ReliabilityData
from lib.stats import pareto_front

__all__ = [
    "PALETTE",
    "STYLE",
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

PALETTE = ["#0072B2", "#D55E00", "#009E73", "#CC79A7", "#E69F00", "#56B4E9", "#000000", "#F0E442"]
"""Okabe-Ito colorblind-safe palette (blue, vermillion, green, purple, orange, sky, black, yellow)."""

STYLE = {
    "font.size": 9,
    "axes.labelsize": 9,
    "axes.titlesize": 9,
    "xtick.labelsize": 8,
    "ytick.labelsize": 8,
    "legend.fontsize": 8,
    "axes.prop_cycle": mpl.cycler(color=PALETTE),
    "axes.spines.top": False,
    "axes.spines.right": False,
    "pdf.fonttype": 42,
    "svg.fonttype": "none",
}
"""rc settings applied while a figure is drawn."""

WIDTH = 6.5
DPI = 150


def figure_png(fig: Figure) -> bytes:
    """PNG bytes of ``fig`` at :data:`DPI` (how notebooks display the figures of this module)."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=DPI, bbox_inches="tight")
    return buf.getvalue()


def _register_notebook_display() -> None:
    """Let IPython display a bare ``Figure`` (no pyplot, any backend) as PNG."""
    try:
        from IPython import get_ipython
    except ImportError:
        return
    shell = get_ipython()
    if shell is not None:
        shell.display_formatter.formatters["image/png"].for_type(Figure, figure_png)


_register_notebook_display()
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


def _yerr(df: pd.DataFrame, value: str, lower: str, upper: str) -> np.ndarray:
    v = df[value].to_numpy(float)
    return np.abs(np.stack([v - df[lower].to_numpy(float), df[upper].to_numpy(float) - v])) * PP


def _label_ticks(ax: Axes, labels: Sequence) -> None:
    """One tick per bar/point, labelled; slanted when more than 6 (e.g. 12 transformer blocks)."""
    crowded = len(labels) > 6
    ax.set_xticks(np.arange(len(labels)), [str(v) for v in labels], rotation=45 if crowded else 0,
                  ha="right" if crowded else "center")


def plot_reliability(data: Mapping[str, ReliabilityData], ax: Sequence[Sequence[Axes]] | None = None) -> Figure:
    """Reliability diagrams as small multiples, one column per model, with count histograms.

    Args:
        data: ordered mapping model name -> :class:`lib.calibration.ReliabilityData` (e.g.
            ``{"Deterministic": ..., "Bayes (block 7)": ..., "All blocks": ...}``).
        ax: optional 2 x K grid of Axes (row 0 reliability, row 1 counts).

    Top row: per-bin accuracy (bars) vs mean confidence (markers) and the diagonal; the point mass
    at confidence 1 (see :mod:`lib.calibration`) is a diamond. Bottom row: examples per bin (log).
    """
    if not data:
        raise ValueError("plot_reliability: data must map at least one model name to ReliabilityData")
    k = len(data)
    with mpl.rc_context(STYLE):
        if ax is None:
            fig = Figure(figsize=(WIDTH, 3.2), layout="constrained")
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
                    edgecolor="white", linewidth=0.5, label="Accuracy")
            top.plot(conf[:m][has], acc[:m][has], "o", color=PALETTE[1], markersize=3, label="Mean confidence")
            top.vlines(conf[:m][has], np.minimum(acc[:m][has], conf[:m][has]),
                       np.maximum(acc[:m][has], conf[:m][has]), color=PALETTE[1], linewidth=1)
            if cnt[m] > 0:
                top.plot([1.0], [acc[m]], "D", color=PALETTE[3], markersize=4, label="Confidence = 1")
            top.plot([0, 1], [0, 1], "--", color="0.4", linewidth=0.8)
            top.set_xlim(0, 1)
            top.set_ylim(0, 1)
            top.set_title(name)
            top.text(0.04, 0.92, f"ECE = {rd.ece * PP:.2f} pp", transform=top.transAxes, fontsize=8, va="top")
            bottom.bar(edges[:-1], np.maximum(cnt[:m], 0), width=np.diff(edges), align="edge",
                       color="0.55", edgecolor="white", linewidth=0.5)
            bottom.set_yscale("symlog", linthresh=1)
            bottom.set_xlabel("Top-label confidence")
            if j == 0:
                top.set_ylabel("Accuracy (fraction)")
                bottom.set_ylabel("Count (examples)")
                top.legend(loc="upper left", bbox_to_anchor=(0.0, 0.86), frameon=False)
    return fig


def plot_delta_ranked(data: pd.DataFrame, ax: Axes | None = None) -> Figure:
    """Ranked bars of Delta_ECE(l) with CI error bars and a zero line (positive = improvement).

    Args:
        data: DataFrame with columns ``layer`` (str or int), ``delta``, ``lower``, ``upper``
            (fractions; e.g. from :func:`lib.stats.paired_bootstrap` + an interval).
    """
    _require(data, ["layer", "delta", "lower", "upper"], "plot_delta_ranked")
    df = data.sort_values("delta", ascending=False, kind="stable")
    with mpl.rc_context(STYLE):
        fig, ax = _new(ax, 2.6)
        x = np.arange(len(df))
        colors = [PALETTE[0] if v > 0 else PALETTE[1] for v in df["delta"]]
        ax.bar(x, df["delta"].to_numpy(float) * PP, color=colors, yerr=_yerr(df, "delta", "lower", "upper"),
               error_kw={"elinewidth": 0.8, "capsize": 2, "ecolor": "0.2"})
        ax.axhline(0, color="0.2", linewidth=0.8)
        _label_ticks(ax, df["layer"])
        ax.set_xlabel("Posterior (blocks with Laplace covariance), ranked")
        ax.set_ylabel(DELTA_LABEL)
    return fig


def plot_delta_scatter(data: pd.DataFrame, ax: Axes | None = None, xlabel: str = "Block depth (index)") -> Figure:
    """Scatter of Delta_ECE against a per-posterior quantity, with CI bars on both axes if given.

    Use for Delta_ECE vs depth, vs Delta accuracy, vs Delta NLL, vs prior precision / curvature
    trace: put that quantity in ``x`` and name it, with units, in ``xlabel``. Integer-valued ``x``
    (block indices) gets integer ticks; positive ``x`` spanning more than a factor of 20 (e.g.
    curvature traces) a log axis.

    Args:
        data: DataFrame with columns ``x``, ``delta``, ``lower``, ``upper``; optional
            ``x_lower``, ``x_upper`` (CI of x, same units as x) and ``label`` (point annotation).
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
        if "label" in data.columns:
            for xi, yi, lab in zip(x, data["delta"].to_numpy(float) * PP, data["label"]):
                ax.annotate(str(lab), (xi, yi), xytext=(3, 3), textcoords="offset points", fontsize=8)
        ax.axhline(0, color="0.2", linewidth=0.8)
        finite = x[np.isfinite(x)]
        if len(finite) and np.all(finite == np.round(finite)):
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        elif len(finite) and finite.min() > 0 and finite.max() > 20 * finite.min():
            ax.set_xscale("log")
        ax.set_xlabel(xlabel)
        ax.set_ylabel(DELTA_LABEL)
    return fig


def plot_rank_heatmap(data: pd.DataFrame, ax: Axes | None = None) -> Figure:
    """Heat map of bootstrap rank probabilities (layers x ranks).

    Args:
        data: DataFrame, index = layer names, columns = ranks 1..P, values = probabilities
            (e.g. ``pd.DataFrame(lib.stats.rank_probabilities(samples).numpy(), index=names,
            columns=range(1, P + 1))``).
    """
    if not isinstance(data, pd.DataFrame) or data.shape[0] == 0:
        raise ValueError("plot_rank_heatmap: data must be a non-empty DataFrame (index layers, columns ranks)")
    with mpl.rc_context(STYLE):
        fig, ax = _new(ax, 0.9 + 0.2 * data.shape[0])
        im = ax.imshow(data.to_numpy(float), cmap="cividis", vmin=0, vmax=1, aspect="auto", interpolation="nearest")
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


def plot_cumulative(data: pd.DataFrame, ax: Axes | None = None) -> Figure:
    """Delta_ECE of the first-k and last-k block posteriors vs k, with CI bands.

    Args:
        data: DataFrame with columns ``k`` and, for ``s`` in (``first_k``, ``last_k``), ``s``,
            ``s_lower``, ``s_upper`` (fractions).
    """
    cols = ["k"] + [f"{s}{suf}" for s in ("first_k", "last_k") for suf in ("", "_lower", "_upper")]
    _require(data, cols, "plot_cumulative")
    with mpl.rc_context(STYLE):
        fig, ax = _new(ax, 2.6)
        k = data["k"].to_numpy(float)
        for i, (s, lab) in enumerate((("first_k", "First k blocks"), ("last_k", "Last k blocks"))):
            ax.plot(k, data[s].to_numpy(float) * PP, "o-", color=PALETTE[i], markersize=3, label=lab)
            ax.fill_between(k, data[f"{s}_lower"].to_numpy(float) * PP, data[f"{s}_upper"].to_numpy(float) * PP,
                            color=PALETTE[i], alpha=0.2, linewidth=0)
        ax.axhline(0, color="0.2", linewidth=0.8)
        ax.set_xlabel("Number of blocks with Laplace covariance k")
        ax.set_ylabel(DELTA_LABEL)
        ax.legend(frameon=False)
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


def plot_pareto(data: pd.DataFrame, ax: Axes | None = None) -> Figure:
    """Extra latency per image (ms) vs Delta_ECE with the Pareto front highlighted (deployment chapter).

    Args:
        data: DataFrame from :func:`prepare_pareto` (columns ``name``, ``cost`` in ms per image,
            ``delta``, ``front``; optional ``lower``, ``upper`` for CI bars).
    """
    _require(data, ["name", "cost", "delta", "front"], "plot_pareto")
    with mpl.rc_context(STYLE):
        fig, ax = _new(ax, 2.8)
        front = data["front"].to_numpy(bool)
        yerr = _yerr(data, "delta", "lower", "upper") if {"lower", "upper"} <= set(data.columns) else None
        ax.errorbar(data["cost"], data["delta"] * PP, yerr=yerr, fmt="none", ecolor="0.6", elinewidth=0.7)
        ax.scatter(data["cost"][~front], data["delta"][~front] * PP, color="0.6", s=14, label="Dominated")
        f = data[front].sort_values("cost")
        ax.plot(f["cost"], f["delta"] * PP, "o-", color=PALETTE[1], markersize=5, label="Pareto front")
        for _, row in f.iterrows():
            ax.annotate(str(row["name"]), (row["cost"], row["delta"] * PP), xytext=(3, 3),
                        textcoords="offset points", fontsize=8)
        ax.set_xlabel("Extra latency (ms per image)")
        ax.set_ylabel(DELTA_LABEL)
        ax.legend(frameon=False, loc="lower right")
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
        if ax is None:
            fig = Figure(figsize=(WIDTH, 2.4), layout="constrained")
            axes = fig.subplots(1, len(columns), sharex=True, squeeze=False)[0]
        else:
            axes = list(ax)
            if len(axes) != len(columns):
                raise ValueError(f"plot_block_quantities: {len(columns)} quantities need {len(columns)} axes, got {len(axes)}")
            fig = axes[0].get_figure()
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
        if ax is None:
            fig = Figure(figsize=(WIDTH, 2.4), layout="constrained")
            axes = fig.subplots(1, len(approximations), sharey=True, squeeze=False)[0]
        else:
            axes = list(ax)
            if len(axes) != len(approximations):
                raise ValueError(f"plot_curvature_quality: {len(approximations)} approximations need "
                                 f"{len(approximations)} axes, got {len(axes)}")
            fig = axes[0].get_figure()
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
    """Latency per image of each block choice (bars) with the deterministic model as a line.

    Args:
        data: DataFrame with ``posterior``, ``ms_per_image``; the row ``"deterministic"`` is the line.
    """
    _require(data, ["posterior", "ms_per_image"], "plot_latency")
    with mpl.rc_context(STYLE):
        fig, ax = _new(ax, 2.8)
        det = data[data.posterior == "deterministic"].ms_per_image
        rest = data[data.posterior != "deterministic"]
        ax.bar(range(len(rest)), rest.ms_per_image, color=PALETTE[0])
        ax.set_xticks(range(len(rest)), rest.posterior, rotation=90)
        if len(det):
            ax.axhline(float(det.iloc[0]), color=PALETTE[1], linestyle="--", label="Deterministic (MAP)")
            ax.legend(frameon=False)
        ax.set_ylabel("Latency (ms per image)")
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
