"""The replica's malloc policy: large buffers go back to the OS when they are freed.

A delta load allocates and frees tensor-sized buffers on several threads: shard bytes
read by the fetch's reader threads, patches built by the loader thread, decode scratch
on the codec's pool. glibc gives each thread its own arena and, once a large buffer has
been freed, raises its mmap threshold past that size, so later large buffers are carved
from the arenas. Freed there, they are neither reused by another thread's arena nor
returned to the OS (`malloc_trim` does not get them back either): measured on a 47 MiB
model, a delta changing every element then left the replica 1.55x the model above its
start, although the load itself frees each shard once it is decoded.

Pinning the mmap threshold keeps every buffer of 256 KiB or more in its own mapping,
unmapped the moment it is freed, so a load costs what it holds (1.10x the model for the
same delta). Smaller allocations are unaffected; greedy generation measured as fast with
the policy as without (docs/reliability.md, "A dense delta").
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import sys

logger = logging.getLogger(__name__)

#: Buffers from this size up get their own mapping (glibc's default start, never raised).
MMAP_THRESHOLD_BYTES = 256 * 1024
_M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter number (malloc.h)


def return_large_buffers_to_the_os(threshold_bytes: int = MMAP_THRESHOLD_BYTES) -> bool:
    """Pin glibc's mmap threshold at `threshold_bytes` for this process; True if applied.

    Not glibc (macOS, musl): nothing to do, False. Idempotent.
    """
    if not sys.platform.startswith("linux"):
        return False
    name = ctypes.util.find_library("c")
    if name is None:
        return False
    try:
        libc = ctypes.CDLL(name)
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    applied = bool(mallopt(_M_MMAP_THRESHOLD, threshold_bytes))
    if not applied:
        logger.warning("mallopt(M_MMAP_THRESHOLD, %d) was refused", threshold_bytes)
    return applied


__all__ = ["MMAP_THRESHOLD_BYTES", "return_large_buffers_to_the_os"]
