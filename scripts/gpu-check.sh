#!/usr/bin/env bash
# The GPU path's device check (docs/gpu.md): bit-exactness of the device diff and apply
# against the CPU path, and their timings for 0.6B/1.7B/7B-shaped bf16 models.
# Runs with the device machine's torch + CUDA; weightsync from source (PYTHONPATH=src) and
# the packages it needs beyond that machine's from wheels carried in .whl/ (if present).
# Usage: scripts/gpu-check.sh [--shapes tiny --device cpu] [--out PATH]
# (PYTHON=.venv/bin/python to run it with the dev venv here).
set -euo pipefail
cd "$(dirname "$0")/.."
if compgen -G ".whl/*.whl" > /dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/weightsync-site .whl/*.whl
  export PYTHONPATH="/tmp/weightsync-site${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
PYTHON="${PYTHON:-python3}"
exec timeout 480 "$PYTHON" benchmarks/gpu_check.py "$@"
