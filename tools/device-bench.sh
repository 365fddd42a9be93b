#!/usr/bin/env bash
# The GPU benchmarks of benchmarks/README.md on the lent H100, results to $OUT.
# Carry `.whl` (see tools/device-freeze.sh); no dataset needed (synthetic tensors). Parts:
#   fit    K-FAC fit vs laplace-torch, both settings, class batching (~2 min)
#   sweep  per-layer sweep vs laplace-torch (~6 min with the defaults)
#   train  LoRA training / inference throughput (~2 min)
#   stats  paired bootstrap of ΔECE vs a per-resample loop (~10 s)
# Usage: bash tools/device-bench.sh fit [sweep] [train] [stats]
set -uo pipefail
source tools/device-env.sh
rc=0
for part in "$@"; do
  case "$part" in
    fit|sweep)
      python3 benchmarks/bench_laplace.py --device cuda --parts "$part" --out "$OUT/bench_laplace_$part.json" \
        2>&1 | grep -v -E "Warning|warnings.warn" || rc=1 ;;
    train)
      python3 benchmarks/bench_train.py --out "$OUT/bench_train.json" 2>&1 | grep -v -E "Warning|warnings.warn" || rc=1 ;;
    stats)
      python3 benchmarks/bench_stats.py --device cuda --out "$OUT/bench_stats.json" 2>&1 | grep -v -E "Warning|warnings.warn" || rc=1 ;;
    *) echo "unknown part '$part'; use fit, sweep, train or stats" >&2; exit 2 ;;
  esac
done
exit "$rc"
