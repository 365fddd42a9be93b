"""Stage ``curvature_quality``: how close the curvature approximations come to the exact block GGN
on one seed's fine-tuned model (:func:`lib.laplace.quality.prepare_curvature_quality`)."""

from __future__ import annotations

import json
import time

import pandas as pd
import torch

from lib.artifacts import Stage, cached
from lib.config import Config
from lib.data import Split, batches
from lib.laplace.quality import prepare_curvature_quality
from lib.pipeline import MapRun, numerics
from lib.provenance import environment
from lib.train import synchronize


def curvature_quality(cfg: Config, run: MapRun, device: torch.device) -> tuple[Stage, pd.DataFrame]:
    """Curvature-quality table of one seed, cached.

    K-FAC-expand, K-FAC-reduce and the diagonal GGN against the exact GGN of every block, all
    fitted with the Fisher of the profile (``laplace.fisher``: exact output vectors or one Monte
    Carlo label per image, as the study's posterior is fitted; float32 forward) on the first
    ``laplace.quality_images`` images
    of the training split and extrapolated to all of it (as :func:`lib.stages.laplace.fit_laplace`
    extrapolates ``fit_size``); the logit variances on the first ``laplace.quality_images``
    validation images. File: ``quality.csv``.
    """
    lc = cfg.laplace
    if lc.quality_images < 1:
        raise ValueError("laplace.quality_images is 0: the curvature-quality table is switched off; set it ≥ 1")
    n = lc.quality_images

    def compare(st: Stage) -> None:
        fit = Split(run.splits.train.x[:n], run.splits.train.y[:n])
        val = Split(run.splits.val.x[:n], run.splits.val.y[:n])
        synchronize(device)
        t0 = time.perf_counter()
        table = prepare_curvature_quality(
            run.model, list(batches(fit, lc.batch_size, preprocess=run.preprocess, device=device)),
            batches(val, lc.batch_size, preprocess=run.preprocess, device=device),
            device=device, n_data=len(run.splits.train), fisher=lc.fisher, class_chunk=lc.class_chunk,
        )
        synchronize(device)
        table.insert(0, "seed", run.seed)
        table.to_csv(st.file("quality.csv"), index=False)
        st.file("info.json").write_text(json.dumps({
            "seconds": time.perf_counter() - t0, "fit_images": len(fit), "val_images": len(val),
            "environment": environment(),
        }, indent=1))

    inputs = {"images": n, "batch_size": lc.batch_size, "class_chunk": lc.class_chunk, "fisher": lc.fisher,
              "numerics": numerics(device)}
    st = cached("curvature_quality", inputs, code=__name__, compute=compare, upstream=[run.stage])
    return st, pd.read_csv(st.file("quality.csv"))
