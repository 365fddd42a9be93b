"""Where the chapters store their result tables: ``_freeze/<profile>/results/<name>.csv``.

A chapter saves every table it shows (:func:`save_table`); the Summary (``index``) and later
chapters read them back (:func:`load_table`) instead of recomputing them.
"""

from __future__ import annotations

import os
from pathlib import Path

import pandas as pd

from lib.paths import FREEZE


def results_dir(profile: str) -> Path:
    """``_freeze/<profile>/results/``: the CSV tables the chapters save next to their outputs.

    ``$LLA_RESULTS/<profile>/`` instead when that variable is set: ``make test`` re-executes the
    frozen notebooks with it pointing at a temporary folder, so tests never rewrite frozen tables.
    """
    env = os.environ.get("LLA_RESULTS")
    path = Path(env) / profile if env else FREEZE / profile / "results"
    path.mkdir(parents=True, exist_ok=True)
    return path


def save_table(df: pd.DataFrame, profile: str, name: str) -> Path:
    """Write ``df`` to ``_freeze/<profile>/results/<name>.csv`` and return the path."""
    path = results_dir(profile) / f"{name}.csv"
    df.to_csv(path, index=False)
    return path


def load_table(profile: str, name: str) -> pd.DataFrame:
    """Read a table saved by :func:`save_table`; a missing table names the chapter to run."""
    path = results_dir(profile) / f"{name}.csv"
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found; run the chapter that saves it: make run PROFILE={profile}")
    return pd.read_csv(path)
