"""How the book writes its numbers: signed percentage points with a typographic minus, intervals,
block lists, confidence levels, the math symbols of the prose, and one display rule per quantity.

The chapters' sentences and :mod:`lib.report`'s tables both format through these, so that a number
reads the same wherever it appears. ΔECE and its intervals are shown in percentage points (pp).
"""

from __future__ import annotations

import pandas as pd

from lib.interval import Interval
from lib.names import display_name

PP = 100.0


def signed(x: float, digits: int) -> str:
    """``x`` with an explicit sign and a typographic minus, e.g. ``+0.0123``, ``−0.0046``."""
    return f"{x:+.{digits}f}".replace("-", "−")


def pp(x: float) -> str:
    """A fraction as signed percentage points with a typographic minus, e.g. ``+1.23``, ``−0.40``."""
    return signed(PP * x, 2)


def ci(delta: float, lower: float, upper: float) -> str:
    """``+1.23 [+0.80, +1.70]`` (pp)."""
    return bracket(PP * delta, PP * lower, PP * upper, 2)


def pp_interval(iv: Interval) -> str:
    """An :class:`lib.interval.Interval` of a fraction as ``+1.23 [+0.80, +1.70]`` (pp)."""
    return ci(iv.estimate, iv.lower, iv.upper)


def bracket(estimate: float, lower: float, upper: float, digits: int) -> str:
    """``+1.23 [+0.80, +1.70]`` with ``digits`` decimals, as given (no change of units)."""
    return f"{signed(estimate, digits)} [{signed(lower, digits)}, {signed(upper, digits)}]"


def interval_text(iv: Interval, unit: str = "pp", digits: int = 2) -> str:
    """An :class:`lib.interval.Interval` in its own units with ``unit`` after it: ``+1.23 [+0.80, +1.70] pp``
    (``unit=""``: the bracket alone, e.g. for Kendall's τ)."""
    return f"{bracket(iv.estimate, iv.lower, iv.upper, digits)} {unit}".rstrip()


def posterior_text(name: str) -> str:
    """A posterior key in prose: ``the all-block posterior`` for ``all``, else :func:`lib.names.display_name`
    (``block 3 only``, ``last 2 blocks``)."""
    return "the all-block posterior" if name == "all" else display_name(name)


def words(items: list[str]) -> str:
    """``a``, ``a and b``, ``a, b and c``."""
    items = list(items)
    return ", ".join(items[:-1]) + (" and " if len(items) > 1 else "") + items[-1] if items else ""


def severities_text(pairs) -> str:
    """``*a* at severities 1, 3 and 5; *b* at severity 5`` from ``(method, severity)`` pairs, one
    clause per method in the order of first appearance, severities ascending."""
    by_method: dict[str, list[int]] = {}
    for method, severity in pairs:
        by_method.setdefault(str(method), []).append(int(severity))
    return "; ".join(f"*{m}* at severit{'ies' if len(set(s)) > 1 else 'y'} {words([str(v) for v in sorted(set(s))])}"
                     for m, s in by_method.items())


def blocks_text(blocks) -> str:
    """Block numbers for prose: ``no block``, ``block 3``, ``blocks 1 and 4``, ``blocks 0–3`` (a run of three or more)."""
    blocks = sorted(int(b) for b in blocks)
    if not blocks:
        return "no block"
    if len(blocks) == 1:
        return f"block {blocks[0]}"
    if len(blocks) > 2 and blocks == list(range(blocks[0], blocks[-1] + 1)):
        return f"blocks {blocks[0]}–{blocks[-1]}"
    return "blocks " + words(list(map(str, blocks)))


def level(alpha: float) -> str:
    """The confidence level of intervals at ``alpha``: ``'95%'`` for 0.05, ``'90%'`` for 0.1."""
    return f"{100 * (1 - alpha):.3g}%"


KAPPA_S = r"$\kappa_S$"
"""The covariance scale of a subset in prose (math, so both HTML and PDF show the subscript)."""
KAPPA_ALL = r"$\kappa_{\mathrm{all}}$"
"""The all-block posterior's covariance scale in prose."""
CONTROL_DIFF = r"$\Delta_{\mathrm{ECE}}^{\mathrm{Laplace}}-\Delta_{\mathrm{ECE}}^{\mathrm{iso}}$"
"""The paired difference of a block's Laplace and isotropic-control gains, as math for the prose."""
TS_DIFF = r"$\mathrm{ECE}_{\mathrm{TS}}-\mathrm{ECE}$"
"""Temperature scaling's ECE minus a posterior's, as math for the prose."""


FORMATS = {
    "delta_pp": "differences in percentage points (ΔECE, its bounds, signed ECE): signed, 2 decimals",
    "pp": "errors and spreads in percentage points (SE, SD): 2 decimals",
    "percent": "ECE and accuracy in %: 2 decimals",
    "p": "p-values: 3 decimals, '<0.001' below 0.0005",
    "ratio": "ratios and shares: 2 decimals",
    "seconds": "times in s: 1 decimal",
    "rate": "throughput (images/s): integer with thousands separators",
    "count": "counts: integer with thousands separators",
    "kappa": "covariance scales κ and prior precisions δ: 3 significant digits",
    "metric": "NLL and Brier score (and their differences): 4 decimals",
    "evidence": "log evidence: 1 decimal",
    "tolerance": "numerical differences and tolerances: 2 significant digits, scientific",
}
"""The one display rule per quantity of the book's tables (:func:`format_number`)."""


def format_number(x: float, quantity: str) -> str:
    """``x`` as the book shows a ``quantity`` of :data:`FORMATS` (typographic minus; ``–`` for NaN)."""
    if quantity not in FORMATS:
        raise ValueError(f"quantity {quantity!r} has no display rule; use one of {', '.join(FORMATS)}")
    if x is None or pd.isna(x):
        return "–"
    x = float(x)
    if quantity == "delta_pp":
        return signed(x, 2)
    if quantity == "p":
        return "<0.001" if x < 0.0005 else f"{x:.3f}"
    text = {"pp": f"{x:.2f}", "percent": f"{x:.2f}", "ratio": f"{x:.2f}", "seconds": f"{x:.1f}",
            "rate": f"{x:,.0f}", "count": f"{x:,.0f}", "kappa": f"{x:.3g}", "metric": f"{x:.4f}",
            "evidence": f"{x:.1f}", "tolerance": f"{x:.1e}"}[quantity]
    return text.replace("-", "−")
