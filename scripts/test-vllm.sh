#!/usr/bin/env bash
# Install the vllm extra into .venv-vllm (scripts/install-vllm.sh; idempotent) and run
# the vLLM engine tests there. Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/install-vllm.sh
exec .venv-vllm/bin/python -m pytest tests/vllm_engine -q "$@"
