"""Coverage of the ΔECE intervals in the simulated study of :mod:`lib.coverage` (issue 22).

Runs ``--studies`` simulated studies of the default :class:`lib.coverage.CoverageDesign` (10
classes, 4 blocks, K = 8 samples, 3 seeds, 3,000 test and 1,000 validation images shared by the
seeds, κ tuned on a 13-point grid by validation NLL, R = 400 bootstrap replicates) and writes the
coverage table (``--out``: ``<out>.json`` with the design, the run time and the table of
:func:`lib.coverage.coverage_table`; ``<out>.csv`` with one row per study × block). Chapter 5 and
the README show the stored table (:func:`lib.coverage.load_coverage`).

Usage: ``OMP_NUM_THREADS=1 python benchmarks/bench_coverage.py [--studies 200] [--out benchmarks/coverage]``
(about 5-10 s per study on one CPU core).
"""

from __future__ import annotations

import argparse
import dataclasses
import time
from pathlib import Path

import pandas as pd
import torch

from lib.coverage import CoverageDesign, coverage_table, display_coverage, run_studies, save_coverage


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--studies", type=int, default=200)
    ap.add_argument("--first-seed", type=int, default=0)
    ap.add_argument("--n-test", type=int, default=None, help="test images (default: the design's)")
    ap.add_argument("--n-truth", type=int, default=None, help="images of the population ECE (default: the design's)")
    ap.add_argument("--n-boot", type=int, default=None, help="bootstrap replicates (default: the design's)")
    ap.add_argument("--out", type=Path, default=Path("benchmarks/coverage"))
    ap.add_argument("--save-every", type=int, default=20, help="studies between writes of the table so far")
    args = ap.parse_args()
    torch.set_num_threads(1)
    changes = {k: v for k, v in (("n_test", args.n_test), ("n_truth", args.n_truth), ("n_boot", args.n_boot))
               if v is not None}
    design = dataclasses.replace(CoverageDesign(), **changes)
    t0 = time.perf_counter()
    parts = []
    for start in range(0, args.studies, args.save_every):  # the table so far is written after every part
        parts.append(run_studies(design, min(args.save_every, args.studies - start), args.first_seed + start))
        studies = pd.concat(parts, ignore_index=True)
        seconds = time.perf_counter() - t0
        save_coverage(studies, design, args.out, seconds)
    print(display_coverage(coverage_table(studies)).to_string(index=False))
    print(f"{args.studies} studies in {seconds:.0f} s; wrote {args.out.with_suffix('.json')} and .csv")


if __name__ == "__main__":
    main()
