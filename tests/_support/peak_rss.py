"""Memory measured in a fresh child process: the prelude its script starts with, and the run.

A memory test writes a script that starts with `PRELUDE` (`kib(field)` reads a
`/proc/self/status` field; `fresh_peak()` hands freed memory back and resets the
high-water mark VmHWM to the current RSS), does one preparation, and prints one JSON
line; `run_child` runs it and returns that line. A fresh process keeps the figures
free of what the test process allocated before.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

PRELUDE = """
import ctypes, gc, json, sys
libc = ctypes.CDLL("libc.so.6")

def kib(field):
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":"))

def fresh_peak():
    # Hand freed memory back, then reset the high-water mark to the current RSS.
    gc.collect()
    libc.malloc_trim(0)
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    return kib("VmRSS")
"""


def run_child(script: str, *args: str | Path, timeout_s: float = 240) -> dict[str, Any]:
    """Run `script` (`PRELUDE` + its own lines) with `args`; the JSON of its last line."""
    out = subprocess.run(
        [sys.executable, "-c", script, *map(str, args)],
        check=False, capture_output=True, text=True, timeout=timeout_s,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr[-3000:]
    return dict(json.loads(out.stdout.strip().splitlines()[-1]))
