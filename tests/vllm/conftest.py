"""vLLM engine tests: skipped unless vLLM is installed (scripts/test-vllm.sh installs it)."""

from __future__ import annotations

import pytest

pytest.importorskip("vllm", reason="the vllm extra is not installed (scripts/install-vllm.sh)")
