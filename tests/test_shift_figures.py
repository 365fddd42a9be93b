"""lib.shift_figures: the shift boxes drawn from lib.shift.prepare_shift_boxes (checked on their data, not pixels)."""

from __future__ import annotations

import matplotlib
import numpy as np
import pandas as pd
import pytest

from lib.shift import prepare_shift_boxes
from lib.shift_figures import plot_shift_boxes

matplotlib.use("Agg")


def test_boxes_draw_the_medians_severities_and_methods():
    g = np.random.default_rng(0)
    rows = [{"method": m, "corruption": c, "severity": sev, "ece": 0.02 * sev + g.normal(scale=0.01)}
            for sev in range(6) for c in (["clean"] if sev == 0 else [f"c{i}" for i in range(9)]) for m in ("map", "la")]
    box = prepare_shift_boxes(pd.DataFrame(rows), "ece")
    fig = plot_shift_boxes(box, "ece")
    ax = fig.axes[0]
    medians = sorted(line.get_ydata()[0] for line in ax.lines
                     if line.get_color() == "black" and line.get_linestyle() == "-" and len(line.get_ydata()) == 2)
    assert np.allclose(medians, sorted(box["med"] * 100))
    assert [t.get_text() for t in ax.get_xticklabels()] == ["clean", "1", "2", "3", "4", "5"]
    assert ax.get_ylabel() == "ECE (%)" and [t.get_text() for t in ax.get_legend().get_texts()] == ["map", "la"]
    with pytest.raises(ValueError, match="metric must be one of"):
        plot_shift_boxes(box, "mce")
    with pytest.raises(ValueError, match="prepare_shift_boxes DataFrame"):
        plot_shift_boxes(box.drop(columns="fliers"), "ece")
