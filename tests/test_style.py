"""lib.style: the shared palette and rc settings, and the PNG a notebook shows for a Figure."""

import io

import matplotlib as mpl
from matplotlib.figure import Figure
from PIL import Image

from lib.style import DPI, PALETTE, STYLE, WIDTH, figure_png


def test_figure_png_is_a_png_of_the_figure_at_dpi():
    fig = Figure(figsize=(2.0, 1.0))
    ax = fig.add_subplot()
    ax.plot([0, 1], [0, 1])
    ax.set_axis_off()
    data = figure_png(fig)
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    w, h = Image.open(io.BytesIO(data)).size
    # bbox_inches="tight" trims the margins: within the 2 × 1 inch canvas at DPI
    assert DPI <= w <= 2 * DPI and 0 < h <= DPI and w > h


def test_style_cycles_the_okabe_ito_palette():
    assert PALETTE[:3] == ["#0072B2", "#D55E00", "#009E73"] and len(set(PALETTE)) == 8
    with mpl.rc_context(STYLE):
        fig = Figure(figsize=(WIDTH, 2.0))
        ax = fig.add_subplot()
        colours = [ax.plot([0, 1], [i, i])[0].get_color() for i in range(3)]
    assert [mpl.colors.to_hex(c).upper() for c in colours] == PALETTE[:3]
