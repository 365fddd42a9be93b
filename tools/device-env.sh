#!/usr/bin/env bash
# Sourced by the device-*.sh scripts on the lent GPU machine: installs the carried wheels (`.whl`,
# see tools/device-freeze.sh for how to download them) into /tmp/site and sets the environment.
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 MPLBACKEND=agg
