"""What touching freshly allocated memory costs on this machine, against how long it lay free.

    python benchmarks/fresh_memory.py            # 1 GiB, idle waits 0 / 1 / 3 / 10 s

Each row allocates and fills a fresh block (every page faulted in and zeroed by the
kernel, as a new tensor's are) after the previous block was freed and the process
slept for the row's wait. On a virtual machine whose hypervisor takes free guest pages
back (virtio-balloon free page reporting), memory that has lain free for a few seconds
costs many times more to touch than memory freed a moment ago: that is what made a
reload inside vLLM's pause 2-3x slower in whichever path ran first after a trainer
step (docs/vllm.md, "Timings").
"""

from __future__ import annotations

import argparse
import time

import numpy as np


def touch_s(num_bytes: int) -> float:
    """Seconds to allocate `num_bytes` and write every page once."""
    started = time.perf_counter()
    block = np.ones(num_bytes, dtype=np.uint8)
    elapsed = time.perf_counter() - started
    del block
    return elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mib", type=int, default=1024)
    parser.add_argument("--waits", type=float, nargs="+", default=[0.0, 1.0, 3.0, 10.0])
    args = parser.parse_args()
    size = args.mib << 20
    touch_s(size)  # the first touch of this process's heap, not measured
    rows = []
    for wait in args.waits:
        touch_s(size)  # freed just now: the baseline of this row
        baseline = touch_s(size)
        time.sleep(wait)
        rows.append((wait, baseline, touch_s(size)))
    print(f"| idle before the touch | {args.mib} MiB just freed | after the idle | ratio |")
    print("| ---: | ---: | ---: | ---: |")
    for wait, baseline, after in rows:
        print(f"| {wait:g} s | {baseline:.3f} s | {after:.3f} s | {after / baseline:.1f}x |")


if __name__ == "__main__":
    main()
