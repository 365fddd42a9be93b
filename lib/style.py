"""The book's figure style: palette, rc settings, page width and how notebooks show a Figure.

A leaf module (it imports nothing from ``lib``), so that every module that draws — the chapter
figures of :mod:`lib.figures` and the shift boxes of :mod:`lib.shift` — shares one look without
importing another drawing module. Colours: the Okabe-Ito colorblind-safe palette
:cite:`okabe2008color`; fonts ≥ 8 pt at :data:`WIDTH` inches; vector artists (PDF/SVG friendly).
Importing the module lets IPython display a bare ``matplotlib.figure.Figure`` (no pyplot state,
any backend) as a PNG of :data:`DPI` dots per inch.
"""

from __future__ import annotations

import io

import matplotlib as mpl
from matplotlib.figure import Figure

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
"""Figure width in inches (the text width of the book)."""

DPI = 150
"""Resolution of the PNG a notebook shows (:func:`figure_png`)."""


def figure_png(fig: Figure) -> bytes:
    """PNG bytes of ``fig`` at :data:`DPI` (how notebooks display the book's figures)."""
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
