#!/usr/bin/env bash
# Execute every chapter of a profile on the lent GPU machine and return the frozen outputs.
#
# That machine has torch/timm/peft but no jupyter stack and no internet. Before the call, in the
# repository root here:
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#       --platform manylinux_2_17_x86_64 --platform manylinux_2_28_x86_64 --platform manylinux_2_34_x86_64 \
#       -d .whl -r tools/device-wheels.txt
#   mkdir -p .carry && cp -r ../shared/data/cifar10-jpeg .carry/
# (both folders git-ignored, 60 MB together), then run this script there with `.whl` and `.carry`
# carried and LLA_GIT_SHA set to the commit being executed:
#   LLA_GIT_SHA=<sha> bash tools/device-freeze.sh cifar10-transfer
# The executed notebooks, records and result tables come back as $OUT/freeze.tgz; unpack it in the
# repository root, check `git status`, then `make link BOOK_PROFILE=<profile> && make book`.
# The runner is stopped at FREEZE_LIMIT_S (530 s) so that what finished still comes back. Every
# stage is cached in artifacts/ (the banks and the subsets stage in parts), so the same call made
# again at once, while the machine is still warm (it is released after about 30 s idle), resumes
# where the first stopped; on a fresh machine it starts over.
set -uo pipefail
profile=${1:?usage: device-freeze.sh PROFILE}
source tools/device-env.sh
# Only the CIFAR-10 profiles need the carried JPEG pack (vit-b16-synthetic makes its own images).
if grep -qE '^\s*name:\s*cifar10\s*$' "params/$profile.yml"; then
  python3 -m lib.data materialize-cifar10 data --source .carry/cifar10-jpeg || exit 1
fi
# GPU memory in use (the whole device, the caching allocator's reserve included: an upper bound on
# what the run needs), sampled every second; its maximum is printed at the end.
nvidia-smi --query-gpu=timestamp,memory.used --format=csv,noheader,nounits -lms 1000 > "$OUT/gpu-memory.csv" 2>/dev/null &
smi=$!
start=$(date +%s)
# Stop the runner before the device call's own limit (600 s) so that what finished still comes back.
timeout -s INT "${FREEZE_LIMIT_S:-530}" python3 -m lib.runner run --profile "$profile" 2>&1 \
  | grep -v -E "Warning|warnings.warn|Executing Cell|Ending Cell|cell/s\]|^\s*$" | tail -200
rc=${PIPESTATUS[0]}
echo "runner exit $rc after $(( $(date +%s) - start )) s"
kill "$smi" 2>/dev/null
echo "peak GPU memory in use: $(cut -d, -f2 "$OUT/gpu-memory.csv" | sort -n | tail -1) MiB"
tar czf "$OUT/freeze.tgz" "_freeze/$profile" $( [ -d _failed ] && echo _failed )
find artifacts \( -name info.json -o -name history.json -o -name blocks.csv -o -name metrics.csv \) -print0 \
  | tar czf "$OUT/artifacts-small.tgz" --null -T -
exit "$rc"
