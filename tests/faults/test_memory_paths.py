"""Regression tests of the one-copy verification of a patched tensor (no scratch copy of the
tensor; corrupt patches refused before they can reach live weights) and of the incremental
checksums it relies on."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from weightsync.codec import Patch, checksum_bytes, checksum_tensor, list_checksums
from weightsync.codec.bits import bits
from weightsync.codec.checksums import checksum_hasher
from weightsync.errors import SnapshotCorruptError
from weightsync.snapshot.checks import verify_patched_tensor
from weightsync.snapshot.manifest import Manifest, TensorEntry


@pytest.mark.parametrize("name", list_checksums())
def test_incremental_checksum_equals_one_shot(name) -> None:
    data = np.random.default_rng(0).integers(0, 256, 100_003, dtype=np.uint8).tobytes()
    hasher = checksum_hasher(name)
    for start in range(0, len(data), 7919):
        hasher.update(data[start : start + 7919])
    assert hasher.hexdigest() == checksum_bytes(name, data)


def _manifest(tensor: torch.Tensor, fmt: str) -> Manifest:
    entry = TensorEntry(shape=tuple(tensor.shape), dtype="BF16", file="model-00000.safetensors",
                        checksum=checksum_tensor(fmt, tensor), num_changed=None)  # fmt: skip
    return Manifest(format_version=1, identity="step-1-0badcafe", kind="delta",
                    parent="base-0badcafe", base="base-0badcafe", compression_format="full",
                    checksum_format=fmt, tensors={"w": entry}, files={}, session_id=None,
                    created_at="2026-01-01T00:00:00Z", stats={})  # fmt: skip


@pytest.mark.parametrize("fmt", ["xxh3_64", "adler32"])
@pytest.mark.parametrize("chunk", [7, 64, 1 << 22])
def test_verify_patched_tensor_matches_applying_the_patch(fmt, chunk) -> None:
    old = torch.randn(37, 11).to(torch.bfloat16)
    positions = np.array([0, 5, 6, 63, 64, 200, 406], dtype=np.int64)
    values = bits(torch.randn(positions.size).to(torch.bfloat16)).copy()
    new = old.clone()
    Patch(positions, values).apply_(new)
    before = bits(old).copy()
    verify_patched_tensor(_manifest(new, fmt), "w", old, Patch(positions, values),
                          chunk_elements=chunk)  # fmt: skip
    assert np.array_equal(bits(old), before)  # the live tensor is only read
    dense = Patch(None, bits(new).reshape(-1).copy())
    verify_patched_tensor(_manifest(new, fmt), "w", old, dense, chunk_elements=chunk)
    wrong = values.copy()
    wrong[3] ^= 1
    with pytest.raises(SnapshotCorruptError, match="checksum"):
        verify_patched_tensor(_manifest(new, fmt), "w", old, Patch(positions, wrong),
                              chunk_elements=chunk)  # fmt: skip


@pytest.mark.parametrize(
    "positions",
    [[0, 5, 5], [6, 5, 7], [0, 5, 407], [-1, 3, 4]],
    ids=["repeated", "unsorted", "past the end", "negative"],
)
def test_verify_patched_tensor_refuses_bad_positions(positions) -> None:
    old = torch.randn(37, 11).to(torch.bfloat16)
    pos = np.array(positions, dtype=np.int64)
    values = bits(torch.zeros(pos.size, dtype=torch.bfloat16)).copy()
    with pytest.raises(SnapshotCorruptError):
        verify_patched_tensor(_manifest(old, "xxh3_64"), "w", old, Patch(pos, values),
                              chunk_elements=64)  # fmt: skip


CHILD = """
import json, resource, sys
import numpy as np, torch
from weightsync.codec import Patch
from weightsync.codec.bits import bits
from weightsync.snapshot.checks import verify_patched_tensor
from weightsync.snapshot.manifest import Manifest, TensorEntry
rng = np.random.default_rng(0)
old = torch.from_numpy(rng.integers(0, 1 << 16, 1 << 25, dtype=np.uint16)).view(torch.bfloat16)
positions = np.unique(rng.integers(0, old.numel(), old.numel() // 100))
values = rng.integers(0, 1 << 16, positions.size, dtype=np.uint16)
entry = TensorEntry(shape=tuple(old.shape), dtype="BF16", file="f", checksum=sys.argv[1],
                    num_changed=None)
manifest = Manifest(format_version=1, identity="s-1", kind="delta", parent="b-1", base="b-1",
                    compression_format="full", checksum_format="xxh3_64", tensors={"w": entry},
                    files={}, session_id=None, created_at="", stats={})
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
verify_patched_tensor(manifest, "w", old, Patch(positions, values), chunk_elements=1 << 20)
after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(json.dumps({"grew_kib": after - before, "tensor_kib": old.numel() * 2 // 1024}))
"""


def test_verifying_a_delta_allocates_a_chunk_not_a_tensor(tmp_path) -> None:
    """The memory property in small, in a fresh process: checking a patched 64 MiB tensor
    raises the process's peak RSS by about a chunk, not by a copy of the tensor."""
    import json
    import subprocess
    import sys

    rng = np.random.default_rng(0)  # the child's tensor and patch, built the same way
    new = torch.from_numpy(rng.integers(0, 1 << 16, 1 << 25, dtype=np.uint16)).view(torch.bfloat16)
    positions = np.unique(rng.integers(0, new.numel(), new.numel() // 100))
    values = rng.integers(0, 1 << 16, positions.size, dtype=np.uint16)
    Patch(positions, values).apply_(new)
    expected = checksum_tensor("xxh3_64", new)
    del new
    out = subprocess.run(
        [sys.executable, "-c", CHILD, expected],
        check=False,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    report = json.loads(out.stdout.strip().splitlines()[-1])
    assert report["grew_kib"] < report["tensor_kib"] / 4, report
