"""The push file: what the `vllm` engine hands vLLM's worker to reload, written while vLLM serves.

One safetensors file of the tensors of every touched vLLM layer, each host tensor with
its verified patch written in (the host copy itself is not touched), on `/dev/shm` when
it has room. The file is sized first and filled through a memory map, one tensor at a
time, so nothing but the file itself is allocated; the checksums the worker's read-back
must find are computed over the bits written.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import torch

from weightsync.codec import Patch, checksum_bytes
from weightsync.codec.bits import bits, dtype_name
from weightsync.snapshot.safetensors_file import encode_header

#: The checksum the read-back compares with (fast, exact over the bits).
READ_BACK_CHECKSUM = "xxh3_64"
#: Where push files go when it exists and has room (memory: no disk write, read at once).
SHM_DIR = Path("/dev/shm")
#: Room left free on SHM_DIR beyond a push file (it is shared with the machine).
SHM_HEADROOM_BYTES = 256 * 1024 * 1024


def push_dir(host: Mapping[str, torch.Tensor], names: Sequence[str], fallback: Path) -> Path:
    """`SHM_DIR` when it exists and keeps `SHM_HEADROOM_BYTES` free after the push of `names`,
    else `fallback` (on disk: the file then costs a write and the page cache)."""
    size = sum(host[n].numel() * host[n].element_size() for n in names)
    try:
        stats = os.statvfs(SHM_DIR)
    except OSError:
        return fallback
    if stats.f_bavail * stats.f_frsize >= size + SHM_HEADROOM_BYTES and os.access(SHM_DIR, os.W_OK):
        return SHM_DIR
    return fallback


def write_push_file(
    path: Path,
    host: Mapping[str, torch.Tensor],
    names: Sequence[str],
    patches: Mapping[str, Patch],
    readable: frozenset[str],
) -> dict[str, str]:
    """Write a safetensors file of `names`: each host tensor with its patch written in.

    Returns the read-back checksums (`READ_BACK_CHECKSUM`) of the `readable` ones, over
    the bits written.
    """
    layout = {
        n: (
            dtype_name(host[n].dtype),
            tuple(host[n].shape),
            host[n].numel() * host[n].element_size(),
        )
        for n in names
    }
    head, spans = encode_header(layout, {"format": "pt"})
    end_of_file = max((end for _, end in spans.values()), default=len(head))
    with path.open("wb") as f:
        f.write(head)
        f.truncate(end_of_file)
    want: dict[str, str] = {}
    if end_of_file == len(head):
        return want
    file_map = np.memmap(path, dtype=np.uint8, mode="r+")
    try:
        for name in names:
            begin, end = spans[name]
            if begin == end:
                continue
            old = bits(host[name])
            region = file_map[begin:end].view(old.dtype)
            patch = patches.get(name)
            if patch is not None and patch.positions is None:
                region[:] = patch.values.reshape(-1)
            else:
                region[:] = old
                if patch is not None and patch.num_changed:
                    region[patch.positions] = patch.values
            if name in readable:
                want[name] = checksum_bytes(READ_BACK_CHECKSUM, region.view(np.uint8))
    finally:
        del file_map  # unmapped: vLLM's worker reads the file through its own map
    return want
