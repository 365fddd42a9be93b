"""The reader's names of the result tables' keys: a leaf module (nothing from ``lib``), shared by
the tables and sentences of :mod:`lib.report` and the figures of :mod:`lib.figures`."""

from __future__ import annotations


def display_name(name: str) -> str:
    """The reader's name of a posterior key of the result tables (the saved keys stay as they are):
    ``single 3`` → ``block 3 only``, ``first 4`` → ``first 4 blocks``, ``last 2`` → ``last 2 blocks``,
    ``all`` → ``all blocks``, ``all but 5`` → ``all blocks but 5``, ``none``/``deterministic`` →
    ``deterministic (MAP)``; other names unchanged. Every table, figure and sentence shows these."""
    parts = str(name).split()
    if name == "all":
        return "all blocks"
    if name in ("none", "deterministic"):
        return "deterministic (MAP)"
    if len(parts) == 2 and parts[1].isdigit():
        if parts[0] == "single":
            return f"block {parts[1]} only"
        if parts[0] in ("first", "last"):
            return f"{parts[0]} {parts[1]} block{'s' if parts[1] != '1' else ''}"
    if len(parts) == 3 and parts[:2] == ["all", "but"]:
        return f"all blocks but {parts[2]}"
    return str(name)
