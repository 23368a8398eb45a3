"""scripts/gpu-check.sh runs here on the CPU with the tiny shape: every row bit-exact."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.timeout(300)


def test_the_device_check_runs_on_the_cpu_and_every_row_is_bit_exact(tmp_path: Path) -> None:
    out = tmp_path / "gpu-check.md"
    env = {**os.environ, "PYTHON": sys.executable, "OUT": str(tmp_path)}
    done = subprocess.run(
        [str(ROOT / "scripts" / "gpu-check.sh"), "--shapes", "tiny", "--device", "cpu",
         "--fractions", "0.01,0.18"],
        env=env, capture_output=True, text=True, timeout=240, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    table = out.read_text()
    assert table.startswith("# gpu-check on CPU")
    rows = [line for line in table.splitlines() if line.startswith("| tiny |")]
    assert len(rows) == 2
    assert all(row.rstrip().endswith("| yes |") for row in rows)
