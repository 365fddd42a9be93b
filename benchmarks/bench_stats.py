"""Benchmark of the paired bootstrap of Delta_ECE (lib.stats) against a naive peer.

Workload: N = 10,000 test points x R = 2,000 resamples x P = 25 posteriors, C = 100 classes,
M = 15 bins, float32. Prints wall time of ``paired_bootstrap`` + BCa (exact jackknife) + ranks +
rank confidence set, and the speed ratio against a peer: the usual loop over resamples with
explicit index resampling of precomputed top-label (confidence, correct) for all P + 1 models and a
per-resample bucketize + scatter ECE (timed on ``--peer-resamples`` resamples, extrapolated to R).

Also prints the largest difference between our point estimates of ΔECE and the peer's on the
original sample (the same numbers, up to float32 summation order).

Usage: ``python benchmarks/bench_stats.py [--device cuda] [--n 10000] [--r 2000] [--p 25] [--out F.json]``
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from lib.calibration import bin_index, top_label
from lib.stats import (
    bca_interval,
    jackknife_delta_ece,
    paired_bootstrap,
    percentile_interval,
    rank_confidence_set,
    rank_probabilities,
)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _data(n: int, p: int, c: int, device: torch.device, gen: torch.Generator):
    logits = 3 * torch.randn(n, c, generator=gen, device=device)
    labels = torch.randint(0, c, (n,), generator=gen, device=device)
    logits[torch.arange(n, device=device), labels] += 3.0
    probs_det = logits.softmax(1)
    temps = 1 + torch.rand(p, 1, 1, generator=gen, device=device)
    probs_bayes = (logits[None] / temps).softmax(2)
    return probs_det, probs_bayes, labels


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--n", type=int, default=10_000)
    ap.add_argument("--r", type=int, default=2_000)
    ap.add_argument("--p", type=int, default=25)
    ap.add_argument("--c", type=int, default=100)
    ap.add_argument("--peer-resamples", type=int, default=200)
    ap.add_argument("--out", type=Path, default=None, help="JSON record of the timings and the agreement")
    args = ap.parse_args()
    device = torch.device(args.device)
    gen = torch.Generator(device=device).manual_seed(0)
    probs_det, probs_bayes, labels = _data(args.n, args.p, args.c, device, gen)

    paired_bootstrap(probs_det, probs_bayes, labels, 16, gen)  # warm-up
    _sync(device)
    t0 = time.perf_counter()
    res = paired_bootstrap(probs_det, probs_bayes, labels, args.r, gen)
    _sync(device)
    t_boot = time.perf_counter() - t0
    jk = jackknife_delta_ece(probs_det, probs_bayes, labels)
    bca_interval(res.samples, res.estimate, jk)
    percentile_interval(res.samples)
    rank_probabilities(res.samples)
    rank_confidence_set(res.estimate, res.samples, k=3)
    _sync(device)
    t_all = time.perf_counter() - t0

    conf_d, corr_d = top_label(probs_det, labels)
    conf_b, pred_b = probs_bayes.max(2)
    conf = torch.cat([conf_d[None], conf_b])
    resid = torch.cat([corr_d[None], (pred_b == labels).float()]) - conf
    offsets = 16 * torch.arange(args.p + 1, device=device)[:, None]

    def peer_delta(idx: torch.Tensor) -> torch.Tensor:
        slot = (bin_index(conf[:, idx], 15) + offsets).reshape(-1)
        sums = torch.zeros(16 * (args.p + 1), device=device).scatter_add_(0, slot, resid[:, idx].reshape(-1))
        e = sums.reshape(args.p + 1, 16).abs().sum(1) / args.n
        return e[:1] - e[1:]

    # identical numbers: the peer on the original sample (identity resample) vs our point estimate
    max_abs_diff = float((peer_delta(torch.arange(args.n, device=device)) - res.estimate).abs().max())
    t1 = time.perf_counter()
    for _ in range(args.peer_resamples):
        peer_delta(torch.randint(0, args.n, (args.n,), generator=gen, device=device))
    _sync(device)
    t_peer = (time.perf_counter() - t1) / args.peer_resamples * args.r

    print(f"device={device} threads={torch.get_num_threads()} N={args.n} R={args.r} P={args.p} C={args.c}")
    print(f"paired_bootstrap:                       {t_boot:8.2f} s")
    print(f"bootstrap + BCa + ranks + rank CS:      {t_all:8.2f} s")
    print(f"peer (loop over R, index resampling)  : {t_peer:8.2f} s")
    print(f"speed-up vs peer:                       {t_peer / t_boot:8.1f} x")
    print(f"max |ΔECE ours − peer| on the original sample: {max_abs_diff:.1e}")
    if args.out:
        record = {"args": vars(args) | {"out": str(args.out)}, "torch": torch.__version__, "device": str(device),
                  "threads": torch.get_num_threads(), "bootstrap_s": t_boot, "all_s": t_all, "peer_s": t_peer,
                  "speedup": t_peer / t_boot, "max_abs_diff_estimate": max_abs_diff}
        args.out.write_text(json.dumps(record, indent=2))
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
