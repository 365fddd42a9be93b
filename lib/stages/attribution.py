"""Stage ``attribution``: the cross-seed attribution of the study, computed once for every chapter.

From all seeds' stages (:class:`lib.stages.seed.SeedStudy`): Δ_ECE of every named posterior with
its tuned bootstrap, the isotropic control (:func:`lib.attribution.attribution`), the rank
analysis (:func:`lib.attribution.rank_analysis`), the Shapley values
(:func:`lib.attribution.shapley`) and the validation gains that choose blocks
(:func:`lib.attribution.validation_table`). Everything is saved in one file, ``tables.pt``: each
table column by column (numbers as tensors of their own dtype, so float32 columns stay float32;
text as lists of strings), with the bootstrap replicates, so that a chapter reads exactly the
numbers that were computed.
"""

from __future__ import annotations

from dataclasses import dataclass

import pandas as pd
import torch

from lib.artifacts import Stage, cached
from lib.attribution import Attribution, attribution, rank_analysis, shapley, validation_table
from lib.config import Config
from lib.pipeline import numerics
from lib.stages.seed import SeedStudy

FRAMES = ("table", "control", "heat", "ranks", "shapley", "validation")
"""The tables of the stage, in ``tables.pt`` (``heat`` with its block names as the column ``block``)."""


@dataclass(frozen=True)
class AttributionTables:
    """What the ``attribution`` stage holds: the :class:`~lib.attribution.Attribution` (table,
    bootstrap samples (R, P), control), the rank probabilities ``heat`` (blocks × ranks) and
    ``ranks`` of :func:`~lib.attribution.rank_analysis`, the Shapley ``shapley`` values of
    :func:`~lib.attribution.shapley`, and the ``validation`` gains of
    :func:`~lib.attribution.validation_table`."""

    attribution: Attribution
    heat: pd.DataFrame
    ranks: pd.DataFrame
    shapley: pd.DataFrame
    validation: pd.DataFrame


def _columns(df: pd.DataFrame) -> dict:
    """``df`` as ``{"columns": names, "values": one tensor or list of str per column}``."""
    values = []
    for name in df.columns:
        col = df[name]
        if col.dtype.kind in "biuf":
            values.append(torch.from_numpy(col.to_numpy().copy()))
        elif all(isinstance(v, str) for v in col):
            values.append(col.tolist())
        else:
            raise ValueError(f"column {name!r} holds neither numbers nor strings; the attribution stage saves only those")
    return {"columns": list(df.columns), "values": values}


def _frame(state: dict) -> pd.DataFrame:
    """The DataFrame :func:`_columns` saved."""
    return pd.DataFrame({name: v.numpy() if torch.is_tensor(v) else v
                         for name, v in zip(state["columns"], state["values"])})


def attribution_stage(cfg: Config, seeds: list[SeedStudy], device: torch.device) -> Stage:
    """The ``attribution`` stage of ``seeds`` (all of the profile's, in its order), computed once.

    Keyed by the stats and predictive settings it reads, the device's numerics and every seed's
    subsets, bank and control stages (upstream, so any change below recomputes it).
    """
    sc, pc = cfg.stats, cfg.predictive
    inputs = {
        "stats": {k: getattr(sc, k) for k in ("n_bins", "n_boot", "alpha", "top_k")},
        "predictive": {k: getattr(pc, k) for k in ("method", "scale", "scale_range", "scale_points",
                                                   "control_range", "control_points")},
        "seeds": [s.seed for s in seeds],
        "numerics": numerics(device),
    }
    upstream = [st for s in seeds for st in (s.subsets, s.bank, s.val_bank, s.control, s.control_val)]

    def compute(st: Stage) -> None:
        att = attribution(seeds, sc, pc, device)
        heat, ranks = rank_analysis(att, sc)
        values = shapley(seeds, sc)
        validation = validation_table(seeds, pc, sc.n_bins, device)
        frames = {"table": att.table, "control": att.control, "heat": heat.rename_axis("block").reset_index(),
                  "ranks": ranks, "shapley": values, "validation": validation}
        torch.save({"frames": {name: _columns(frames[name]) for name in FRAMES}, "samples": att.samples},
                   st.file("tables.pt"))

    return cached("attribution", inputs, code=__name__, compute=compute, upstream=upstream)


def load_attribution(st: Stage) -> AttributionTables:
    """The tables and replicates an ``attribution`` stage saved."""
    saved = torch.load(st.file("tables.pt"), weights_only=True)
    frames = {name: _frame(saved["frames"][name]) for name in FRAMES}
    heat = frames["heat"].set_index("block").rename_axis(None)
    heat.columns = heat.columns.astype("int64")  # the ranks 1..L
    att = Attribution(table=frames["table"], samples=saved["samples"], control=frames["control"])
    return AttributionTables(attribution=att, heat=heat, ranks=frames["ranks"], shapley=frames["shapley"],
                             validation=frames["validation"])
