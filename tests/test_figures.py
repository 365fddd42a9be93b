"""Tests for lib.figures: every plot function runs on small data and draws what it should."""

import io

import matplotlib
import numpy as np
import pandas as pd
import pytest
import torch
from matplotlib.container import BarContainer
from matplotlib.figure import Figure

from lib.calibration import prepare_reliability
from lib.figures import (
    plot_block_quantities,
    plot_curvature_quality,
    plot_cumulative,
    plot_delta_ranked,
    plot_delta_scatter,
    plot_delta_scatter_grid,
    plot_latency,
    plot_leave_one_out,
    plot_pareto,
    plot_rank_heatmap,
    plot_reliability,
    plot_shapley,
    plot_training_curves,
    prepare_pareto,
    prepare_training_curves,
)
from lib.stats import rank_probabilities
from lib.style import PALETTE

matplotlib.use("Agg")
L = 5


def _delta_frame(gen):
    delta = torch.randn(L, generator=gen).numpy() * 0.01
    return pd.DataFrame({"layer": [f"b{i}" for i in range(L)], "delta": delta,
                         "lower": delta - 0.004, "upper": delta + 0.004})


def _bars(ax):
    return [p for c in ax.containers if isinstance(c, BarContainer) for p in c.patches]


def _check_text(fig):
    for ax in fig.axes:
        for lab in (ax.get_xlabel(), ax.get_ylabel()):
            if lab:
                assert len(lab) > 3
        for t in ax.get_xticklabels() + ax.get_yticklabels():
            assert t.get_fontsize() >= 8
    buf = io.BytesIO()
    fig.savefig(buf, format="pdf")
    assert buf.tell() > 1000


def test_plot_reliability_small_multiples():
    gen = torch.Generator().manual_seed(0)
    probs = (2 * torch.randn(300, 4, generator=gen)).softmax(1)
    labels = torch.randint(0, 4, (300,), generator=gen)
    probs[:2] = torch.nn.functional.one_hot(labels[:2], 4).float()
    data = {name: prepare_reliability(probs ** t / (probs ** t).sum(1, keepdim=True), labels, 10)
            for name, t in [("Deterministic", 1.0), ("Bayes (block 3)", 0.7), ("All blocks", 0.5)]}
    fig = plot_reliability(data)
    assert isinstance(fig, Figure)
    assert len(fig.axes) == 6
    for j, rd in enumerate(data.values()):
        top, bottom = fig.axes[j], fig.axes[3 + j]
        assert len(_bars(top)) == int((rd.count[:10] > 0).sum())
        assert len(_bars(bottom)) == 10
        assert bottom.get_xlabel() == "Top-label confidence"
    assert fig.axes[0].get_ylabel() and fig.axes[3].get_ylabel()
    assert [ax.get_title() for ax in fig.axes[:3]] == list(data)
    for j, rd in enumerate(data.values()):  # dots: (mean confidence, accuracy) of the bins that have images
        has = (rd.count[:10] > 0).numpy()
        dots = [ln for ln in fig.axes[j].get_lines() if ln.get_label() == "Accuracy at the bin's mean confidence"][0]
        assert np.allclose(dots.get_xdata(), rd.confidence[:10].numpy()[has])
        assert np.allclose(dots.get_ydata(), rd.accuracy[:10].numpy()[has])
    (legend,) = fig.legends
    assert {t.get_text() for t in legend.get_texts()} == {"Accuracy of the bin", "Accuracy at the bin's mean confidence",
                                                          "Gap to the diagonal", "Confidence = 1", "Perfect calibration"}
    fig.draw_without_rendering()
    box = legend.get_window_extent()
    assert all(not box.overlaps(ax.get_window_extent()) for ax in fig.axes)  # above the panels, off the bars
    _check_text(fig)


def test_plot_delta_ranked_bars_sorted_with_zero_line():
    df = _delta_frame(torch.Generator().manual_seed(1))
    fig = plot_delta_ranked(df)
    ax = fig.axes[0]
    heights = [b.get_height() for b in _bars(ax)]
    assert len(heights) == L
    assert np.allclose(heights, np.sort(df["delta"].to_numpy())[::-1] * 100)
    assert any(np.allclose(line.get_ydata(), 0) for line in ax.get_lines())
    assert [t.get_text() for t in ax.get_xticklabels()] == list(df.sort_values("delta", ascending=False)["layer"])
    assert "pp" in ax.get_ylabel() and ax.get_xlabel()
    assert ax.get_legend() is None and not fig.legends  # nothing to set apart
    _check_text(fig)


def test_answer_figure_sets_the_all_block_bar_apart_and_draws_temperature_scaling():
    df = _delta_frame(torch.Generator().manual_seed(1))
    df.loc[len(df)] = ["all blocks", 0.5 * df.delta.max(), 0.0, df.delta.max()]
    fig = plot_delta_ranked(df, reference=0.0097)
    ax = fig.axes[0]
    ticks = [t.get_text() for t in ax.get_xticklabels()]
    singles = df[df.layer != "all blocks"].sort_values("delta", ascending=False)
    assert ticks == ["all blocks", *singles.layer]  # first, then the single blocks ranked
    bars = _bars(ax)
    assert bars[0].get_hatch() == "//" and all(not b.get_hatch() for b in bars[1:])
    assert bars[0].get_facecolor() != bars[1].get_facecolor()
    assert np.isclose(bars[0].get_height(), 50 * df.delta.iloc[:-1].max())
    assert any(np.allclose(line.get_xdata(), 0.5) for line in ax.get_lines())  # separator after the first bar
    ref = [line for line in ax.get_lines() if line.get_label().startswith("Temperature scaling")]
    assert len(ref) == 1 and np.allclose(ref[0].get_ydata(), 0.97) and "+0.97 pp" in ref[0].get_label()
    (legend,) = fig.legends
    assert {t.get_text() for t in legend.get_texts()} == {"Temperature scaling (+0.97 pp)", "All blocks"}
    fig.draw_without_rendering()
    assert not legend.get_window_extent().overlaps(ax.get_window_extent())
    _check_text(fig)


@pytest.mark.parametrize("xlabel", ["Block depth (index)", "ΔAccuracy (pp)", "ΔNLL (nats)", "Prior precision (1)"])
def test_plot_delta_scatter(xlabel):
    df = _delta_frame(torch.Generator().manual_seed(2)).assign(x=np.arange(L, dtype=float))
    df["x_lower"], df["x_upper"], df["label"] = df["x"] - 0.2, df["x"] + 0.2, df["layer"]
    fig = plot_delta_scatter(df, xlabel=xlabel)
    ax = fig.axes[0]
    assert ax.get_xlabel() == xlabel
    pts = ax.get_lines()[0]
    assert len(pts.get_xdata()) == L
    assert sorted(t.get_text() for t in ax.texts) == sorted(df["layer"])
    with pytest.raises(ValueError, match="missing columns"):
        plot_delta_scatter(df.drop(columns=["upper"]), xlabel=xlabel)
    _check_text(fig)


def test_scatter_labels_do_not_collide():
    """Twelve points, several nearly on top of each other (as blocks 0/1 and 3/4 of the real book):
    every label is drawn, inside the axes, and no two labels overlap."""
    x = np.array([0.067, 0.074, 0.0, -0.033, -0.034, 0.007, 0.1, -0.04, -0.02, -0.02, 0.034, 0.08])
    delta = np.array([0.0085, 0.0085, 0.0061, 0.0079, 0.0080, 0.0032, 0.0089, 0.0077, 0.0054, 0.0019, 0.0079, 0.0101])
    df = pd.DataFrame({"x": x, "delta": delta, "lower": delta - 0.006, "upper": delta + 0.004, "label": range(12)})
    fig = plot_delta_scatter(df, xlabel="Δ accuracy (pp)")
    ax = fig.axes[0]
    fig.draw_without_rendering()
    boxes = [t.get_window_extent() for t in ax.texts]
    assert sorted(int(t.get_text()) for t in ax.texts) == list(range(12))
    overlaps = [(ax.texts[i].get_text(), ax.texts[j].get_text()) for i in range(12) for j in range(i + 1, 12)
                if boxes[i].overlaps(boxes[j])]
    assert not overlaps, overlaps
    frame = ax.get_window_extent()
    assert all(frame.x0 - 1 <= b.x0 and b.x1 <= frame.x1 + 1 for b in boxes)


def test_scatter_axis_follows_the_quantity():
    """Block indices get integer ticks; a positive quantity spanning > 20x (curvature traces) a log axis;
    anything else stays linear."""
    base = _delta_frame(torch.Generator().manual_seed(6))
    blocks = plot_delta_scatter(base.assign(x=np.arange(L, dtype=float)), xlabel="Block depth (index)").axes[0]
    assert blocks.get_xscale() == "linear"
    assert all(float(t) == round(float(t)) for t in blocks.get_xticks())
    trace = plot_delta_scatter(base.assign(x=np.geomspace(1.5, 4000.0, L)), xlabel="Curvature trace").axes[0]
    assert trace.get_xscale() == "log"
    acc = plot_delta_scatter(base.assign(x=np.linspace(-0.2, 1.6, L)), xlabel="Δ accuracy (pp)").axes[0]
    assert acc.get_xscale() == "linear"


def test_twelve_block_labels_are_slanted():
    twelve = pd.DataFrame({"layer": [f"block {b}" for b in range(12)], "phi": np.linspace(-0.002, 0.003, 12)})
    twelve["lower"], twelve["upper"] = twelve.phi - 0.001, twelve.phi + 0.001
    for fig in (plot_shapley(twelve), plot_leave_one_out(twelve.rename(columns={"phi": "delta"}))):
        labels = fig.axes[0].get_xticklabels()
        assert [t.get_text() for t in labels] == list(twelve.layer) and labels[0].get_rotation() == 45
    few = plot_shapley(twelve.head(4)).axes[0].get_xticklabels()
    assert few[0].get_rotation() == 0


def test_plot_rank_heatmap():
    samples = torch.randn(200, L, generator=torch.Generator().manual_seed(3))
    df = pd.DataFrame(rank_probabilities(samples).numpy(), index=[f"b{i}" for i in range(L)], columns=range(1, L + 1))
    fig = plot_rank_heatmap(df)
    ax = fig.axes[0]
    assert ax.images[0].get_array().shape == (L, L)
    assert len(ax.get_yticklabels()) == L and len(ax.get_xticklabels()) == L
    assert len(fig.axes) == 2  # heat map + colorbar
    assert fig.axes[1].get_ylabel() == "Bootstrap probability"
    values = df.to_numpy(float)
    assert ax.images[0].get_clim() == (0, pytest.approx(values.max()))  # full colour range on the data
    shown = {(int(round(t.get_position()[1])), int(round(t.get_position()[0]))): t.get_text() for t in ax.texts}
    assert shown == {(i, j): f"{100 * v:.0f}" for (i, j), v in np.ndenumerate(values) if v >= 0.005}
    _check_text(fig)


def test_plot_shapley_one_bar_per_layer():
    df = _delta_frame(torch.Generator().manual_seed(4)).rename(columns={"delta": "phi"})
    fig = plot_shapley(df)
    ax = fig.axes[0]
    assert len(_bars(ax)) == L
    assert np.allclose([b.get_height() for b in _bars(ax)], df["phi"].to_numpy() * 100)
    assert ax.get_xlabel() and ax.get_ylabel()
    _check_text(fig)


def test_plot_cumulative_and_leave_one_out():
    k = np.arange(1, L + 1)
    df = pd.DataFrame({"k": k, "first_k": k * 0.002, "first_k_lower": k * 0.001, "first_k_upper": k * 0.003,
                       "last_k": k * 0.001, "last_k_lower": k * 0.0, "last_k_upper": k * 0.002})
    fig = plot_cumulative(df)
    first, last = fig.axes
    assert first.get_title().startswith("First k") and last.get_title().startswith("Last k")
    assert first.get_shared_y_axes().joined(first, last)
    for ax, col in ((first, "first_k"), (last, "last_k")):
        line = ax.get_lines()[0]
        assert np.allclose(line.get_xdata(), k) and np.allclose(line.get_ydata(), df[col] * 100)
        segs = ax.collections[0].get_segments()  # error bars: the interval in pp
        assert np.allclose([sg[0][1] for sg in segs], df[f"{col}_lower"] * 100)
        assert np.allclose([sg[1][1] for sg in segs], df[f"{col}_upper"] * 100)
    _check_text(fig)
    loo = _delta_frame(torch.Generator().manual_seed(5))
    fig = plot_leave_one_out(loo, reference=0.01)
    ax = fig.axes[0]
    assert len(ax.get_lines()[0].get_xdata()) == L
    assert any(np.allclose(line.get_ydata(), 1.0) for line in ax.get_lines())  # reference in pp
    _check_text(fig)


def test_plot_pareto_highlights_front():
    cost = torch.tensor([1.0, 2.0, 3.0, 4.0, 2.5])
    delta = torch.tensor([0.001, 0.004, 0.003, 0.006, 0.002])
    names = ["single 3", "first 2", "last 2", "all", "single 0"]
    df = prepare_pareto(names, cost, delta, delta - 0.001, delta + 0.001)
    assert df["front"].tolist() == [True, True, False, True, False]
    fig = plot_pareto(df)
    ax = fig.axes[0]
    front_line = [line for line in ax.get_lines() if line.get_label() == "Pareto front"][0]
    assert np.allclose(front_line.get_xdata(), [1.0, 2.0, 4.0])
    assert sorted(t.get_text() for t in ax.texts) == sorted(["3", "F2", "L2", "all", "0"])  # every point labelled
    singles = [c for c in ax.collections if c.get_label().startswith("single block")][0]
    assert singles.get_offsets().shape[0] == 2
    (legend,) = fig.legends
    assert "Pareto front" in [t.get_text() for t in legend.get_texts()]
    _check_text(fig)


def test_palette_is_okabe_ito_and_axes_can_be_passed():
    assert PALETTE[:3] == ["#0072B2", "#D55E00", "#009E73"]
    fig = Figure()
    ax = fig.add_subplot()
    assert plot_shapley(_delta_frame(torch.Generator().manual_seed(6)).rename(columns={"delta": "phi"}), ax=ax) is fig


def _close(fig):
    """Release a figure (lib.figures builds bare Figures, which pyplot does not track; close anyway)."""
    import matplotlib.pyplot as plt

    plt.close(fig)


def _histories():
    def row(epoch, train_loss, val_loss, val_acc):
        return {"epoch": epoch, "lr": 1e-3, "train_loss": train_loss, "train_acc": 0.5, "val_loss": val_loss,
                "val_acc": val_acc, "seconds": 1.0, "images_per_s": 10.0}

    return {"pre-training": [row(1, 2.0, 2.1, 0.25), row(2, 1.5, 1.7, 0.5), row(3, 1.2, 1.6, 0.625)],
            "seed 0": [row(1, 0.9, 1.0, 0.75), row(2, 0.7, 0.95, 0.8)]}


def test_prepare_training_curves_one_row_per_epoch_and_run():
    df = prepare_training_curves(_histories())
    assert list(df.columns) == ["run", "epoch", "train_loss", "val_loss", "val_acc"]
    assert list(df.run) == ["pre-training"] * 3 + ["seed 0"] * 2 and list(df.epoch) == [1, 2, 3, 1, 2]
    assert np.allclose(df.train_loss, [2.0, 1.5, 1.2, 0.9, 0.7], rtol=0, atol=1e-15)
    assert np.allclose(df.val_loss, [2.1, 1.7, 1.6, 1.0, 0.95], rtol=0, atol=1e-15)
    assert np.allclose(df.val_acc, [0.25, 0.5, 0.625, 0.75, 0.8], rtol=0, atol=1e-15)
    for empty in ({}, {"seed 0": []}):
        with pytest.raises(ValueError, match="histories are empty"):
            prepare_training_curves(empty)


def test_plot_training_curves_lines_per_run():
    """Left: train (solid) and validation (dashed) loss per run; right: validation accuracy in %;
    one palette colour per run, in the order the runs first appear."""
    df = prepare_training_curves(_histories())
    fig = plot_training_curves(df)
    assert len(fig.axes) == 2
    loss, acc = fig.axes
    assert [line.get_label() for line in loss.get_lines()] == ["pre-training (train)", "pre-training (val.)",
                                                               "seed 0 (train)", "seed 0 (val.)"]
    assert [line.get_linestyle() for line in loss.get_lines()] == ["-", "--", "-", "--"]
    assert [line.get_label() for line in acc.get_lines()] == ["pre-training", "seed 0"]
    for i, run in enumerate(["pre-training", "seed 0"]):
        d = df[df.run == run]
        train, val = loss.get_lines()[2 * i: 2 * i + 2]
        for line, y in ((train, d.train_loss), (val, d.val_loss), (acc.get_lines()[i], 100 * d.val_acc)):
            assert np.allclose(line.get_xdata(), d.epoch) and np.allclose(line.get_ydata(), y, rtol=0, atol=1e-12)
            assert matplotlib.colors.same_color(line.get_color(), PALETTE[i])
    assert np.allclose(acc.get_lines()[0].get_ydata(), [25.0, 50.0, 62.5], rtol=0, atol=1e-12)
    assert (loss.get_xlabel(), loss.get_ylabel()) == ("Epoch", "Cross-entropy (nats)")
    assert (acc.get_xlabel(), acc.get_ylabel()) == ("Epoch", "Validation accuracy (%)")
    assert [t.get_text() for t in loss.get_legend().get_texts()] == [line.get_label() for line in loss.get_lines()]
    with pytest.raises(ValueError, match="missing columns \\['val_acc'\\]"):
        plot_training_curves(df.drop(columns=["val_acc"]))
    _check_text(fig)
    _close(fig)


def test_plot_block_quantities_one_log_panel_per_quantity():
    """Bars at the block indices with the means; seed-range error bars only for a quantity that has
    ``_min``/``_max`` columns."""
    data = pd.DataFrame({"block": [0, 1, 2], "prior_precision": [4.0, 9.0, 25.0], "prior_precision_min": [3.0, 8.0, 20.0],
                         "prior_precision_max": [5.0, 12.0, 26.0], "curvature_trace": [100.0, 2000.0, 30.0]})
    columns = [("prior_precision", "Prior precision δ (1)"), ("curvature_trace", "Curvature trace (1)")]
    fig = plot_block_quantities(data, columns)
    assert len(fig.axes) == 2
    for ax, (col, label) in zip(fig.axes, columns):
        bars = _bars(ax)
        assert np.allclose([b.get_height() for b in bars], data[col], rtol=0, atol=1e-12)
        assert np.allclose([b.get_x() + b.get_width() / 2 for b in bars], data.block, rtol=0, atol=1e-12)
        assert ax.get_yscale() == "log" and ax.get_ylabel() == label and ax.get_xlabel() == "Block"
    with_range, without = (next(c for c in ax.containers if isinstance(c, BarContainer)) for ax in fig.axes)
    assert without.errorbar is None
    segments = with_range.errorbar.lines[2][0].get_segments()  # one vertical segment per bar: [min, max]
    assert np.allclose([s[:, 1] for s in segments], data[["prior_precision_min", "prior_precision_max"]].to_numpy(),
                       rtol=0, atol=1e-12)
    with pytest.raises(ValueError, match="missing columns \\['variance_trace'\\]"):
        plot_block_quantities(data, [("variance_trace", "Variance trace")])
    _close(fig)


def test_plot_latency_bars_and_deterministic_line():
    data = pd.DataFrame({"posterior": ["deterministic", "single 0", "last 2", "all"],
                         "ms_per_image": [0.5, 1.25, 2.0, 3.5]})
    fig = plot_latency(data)
    assert len(fig.axes) == 1
    ax = fig.axes[0]
    assert np.allclose([b.get_height() for b in _bars(ax)], [1.25, 2.0, 3.5], rtol=0, atol=1e-12)
    assert [t.get_text() for t in ax.get_xticklabels()] == ["block 0 only", "last 2 blocks", "all blocks"]
    (line,) = ax.get_lines()
    assert np.allclose(line.get_ydata(), 0.5) and line.get_label() == "Deterministic (MAP)"
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["Deterministic (MAP)"]
    assert ax.get_ylabel() == "Latency (ms per image)"
    _close(fig)
    bare = plot_latency(data.iloc[1:])  # no deterministic row: bars only
    assert len(_bars(bare.axes[0])) == 3 and not bare.axes[0].get_lines() and bare.axes[0].get_legend() is None
    _close(bare)
    iqr = plot_latency(data.assign(ms_q25=data.ms_per_image - 0.1, ms_q75=data.ms_per_image + 0.3))
    ax = iqr.axes[0]
    (bars,) = ax.collections  # IQR error bars: from the lower to the upper quartile
    assert np.allclose([sg[0][1] for sg in bars.get_segments()], [1.15, 1.9, 3.4])
    assert np.allclose([sg[1][1] for sg in bars.get_segments()], [1.55, 2.3, 3.8])
    assert "median, IQR" in ax.get_ylabel()
    _close(iqr)


def test_plot_delta_scatter_grid_two_panels_per_row():
    """Three panels: a 2 × 2 grid whose fourth axes is hidden; each panel is the scatter of its frame
    (Δ in pp) with its key as the x label."""
    gen = torch.Generator().manual_seed(7)
    panels = {label: _delta_frame(gen).assign(x=x) for label, x in [
        ("Block depth (index)", np.arange(L, dtype=float)), ("Δ accuracy (pp)", np.linspace(-0.5, 0.7, L)),
        ("Δ NLL (nats)", np.linspace(0.01, -0.02, L))]}
    fig = plot_delta_scatter_grid(panels)
    assert len(fig.axes) == 4 and [ax.get_visible() for ax in fig.axes] == [True, True, True, False]
    assert fig.get_size_inches()[1] == pytest.approx(5.0)  # 2.5 in per row
    for ax, (label, df) in zip(fig.axes, panels.items()):
        assert ax.get_xlabel() == label and "pp" in ax.get_ylabel()
        pts = ax.get_lines()[0]
        assert np.allclose(pts.get_xdata(), df.x, rtol=0, atol=1e-12)
        assert np.allclose(pts.get_ydata(), 100 * df.delta.to_numpy(float), rtol=0, atol=1e-12)
    with pytest.raises(ValueError, match="panels must not be empty"):
        plot_delta_scatter_grid({})
    _close(fig)


def test_plot_curvature_quality_lines_per_module():
    """One log panel per approximation; each module's line passes through its seed-mean trace
    ratios at the block indices; a reference line at 1."""
    rows = [{"seed": s, "approximation": a, "module": m, "block": b, "trace_ratio": (b + 1) * (k + 1) * (1 + s) / 10}
            for s in (0, 1) for a in ("K-FAC-reduce", "diagonal") for k, m in enumerate(("fc1", "block"))
            for b in range(3)]
    data = pd.DataFrame(rows)
    fig = plot_curvature_quality(data)
    assert len(fig.axes) == 2 and [ax.get_title() for ax in fig.axes] == ["K-FAC-reduce", "diagonal"]
    for ax in fig.axes:
        assert ax.get_yscale() == "log"
        lines = {ln.get_label(): ln for ln in ax.get_lines()}
        for k, m in enumerate(("fc1", "block")):
            assert np.allclose(lines[m].get_xdata(), [0, 1, 2])
            assert np.allclose(lines[m].get_ydata(), [(b + 1) * (k + 1) * 1.5 / 10 for b in range(3)], atol=1e-12)
        assert any(np.allclose(ln.get_ydata(), 1.0) for ln in ax.get_lines() if ln.get_label() not in ("fc1", "block"))
    with pytest.raises(ValueError, match="missing columns \\['trace_ratio'\\]"):
        plot_curvature_quality(data.drop(columns="trace_ratio"))
