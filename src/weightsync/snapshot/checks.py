"""Checks of bytes and tensors against a manifest; each failure names snapshot and file/tensor."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch

from weightsync.codec import Patch, change_sum, checksum_bytes, checksum_tensor
from weightsync.codec.bits import bits, dtype_name
from weightsync.codec.checksums import checksum_hasher
from weightsync.codec.patch_kernels import scatter_sorted
from weightsync.errors import ChecksumMismatchError, SnapshotCorruptError, UnsupportedDtypeError
from weightsync.snapshot.manifest import Manifest, TensorEntry


@dataclass
class VerifyReport:
    """What `SnapshotStore.verify` checked, and every problem it found."""

    identity: str
    kind: str
    chain: list[str] = field(default_factory=list)
    files_checked: int = 0
    bytes_checked: int = 0
    tensors_checked: int = 0
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "ok": self.ok}


def verify_file(manifest: Manifest, name: str, data: bytes) -> None:
    """Check one file's size and checksum against the manifest."""
    entry = manifest.files.get(name)
    where = f"snapshot {manifest.identity!r}, file {name!r}"
    if entry is None:
        raise SnapshotCorruptError(f"{where} is not listed in the manifest")
    if len(data) != entry.size_bytes:
        raise SnapshotCorruptError(
            f"{where} has {len(data)} bytes, the manifest says {entry.size_bytes} "
            "(truncated or overwritten); re-save the snapshot"
        )
    actual = checksum_bytes(manifest.checksum_format, data)
    if actual != entry.checksum:
        raise ChecksumMismatchError(
            f"{where} fails its {manifest.checksum_format} checksum ({actual} != "
            f"{entry.checksum}); its bytes are corrupt, re-save the snapshot"
        )


def verify_tensor(manifest: Manifest, name: str, tensor: torch.Tensor) -> None:
    """Check one tensor's shape, dtype and checksum against the manifest."""
    entry = manifest.tensors.get(name)
    where = f"snapshot {manifest.identity!r}, tensor {name!r}"
    if entry is None:
        raise SnapshotCorruptError(f"{where} is not in the manifest")
    _check_spec(where, entry, tensor)
    _check_checksum(where, manifest, entry, checksum_tensor(manifest.checksum_format, tensor))


def verify_bits(
    manifest: Manifest, name: str, *, dtype: str, shape: tuple[int, ...], data: np.ndarray
) -> None:
    """`verify_tensor` for a tensor held as its raw bits (`data`: its elements as unsigned
    integers, in order; e.g. a view of a fetched file), its dtype and shape given."""
    entry = manifest.tensors.get(name)
    where = f"snapshot {manifest.identity!r}, tensor {name!r}"
    if entry is None:
        raise SnapshotCorruptError(f"{where} is not in the manifest")
    _check_shape_dtype(where, entry, shape, dtype)
    _check_checksum(where, manifest, entry, checksum_bytes(manifest.checksum_format, data))


def _check_checksum(where: str, manifest: Manifest, entry: TensorEntry, actual: str) -> None:
    if actual != entry.checksum:
        raise ChecksumMismatchError(
            f"{where} fails its {manifest.checksum_format} checksum ({actual} != "
            f"{entry.checksum}): the weights are not bit-identical to what was saved"
        )


#: Elements rebuilt and hashed at a time by `verify_patched_tensor` (8 MiB of bf16).
VERIFY_CHUNK_ELEMENTS = 1 << 22


def verify_patched_tensor(
    manifest: Manifest,
    name: str,
    tensor: torch.Tensor,
    patch: Patch,
    *,
    chunk_elements: int = VERIFY_CHUNK_ELEMENTS,
) -> None:
    """Check `tensor` with `patch` applied against the manifest, leaving `tensor` untouched.

    `tensor` must hold the bits of the manifest's parent (a replica's live weights
    passed their full checksums when they were loaded). When the manifest carries the
    tensor's change sum (format version 3) and the patch is sparse, the check reads
    the changed elements only (`codec/change_sum.py`); otherwise the patched bits are
    rebuilt and hashed one chunk at a time, so a check costs one chunk of memory
    instead of a scratch copy of the tensor (an embedding alone can be a quarter of a
    model). A patch whose positions are unsorted, repeated or out of range is corrupt:
    it is refused here, before it can reach the live weights.
    """
    entry = manifest.tensors.get(name)
    where = f"snapshot {manifest.identity!r}, tensor {name!r}"
    if entry is None:
        raise SnapshotCorruptError(f"{where} is not in the manifest")
    _check_spec(where, entry, tensor)
    flat = bits(tensor.detach().to("cpu").contiguous()).reshape(-1)
    if patch.positions is not None and patch.positions.size != patch.values.size:
        raise SnapshotCorruptError(f"{where}: the patch has {patch.positions.size} positions "
                                   f"but {patch.values.size} values")  # fmt: skip
    if (
        patch.positions is not None
        and entry.change_sum is not None
        and change_sum.fits(flat.size)
        and patch.values.dtype == flat.dtype
    ):
        actual = change_sum.patch_change_sum(flat, patch.positions, patch.values)
        if actual is None:
            raise SnapshotCorruptError(
                f"{where}: the patch's positions are not sorted, unique and in range"
            )
        if actual != entry.change_sum:
            raise ChecksumMismatchError(
                f"{where} fails its change sum ({actual} != {entry.change_sum}): the patch "
                "does not turn the parent's weights into what was saved"
            )
        return
    hasher = checksum_hasher(manifest.checksum_format)
    if patch.positions is None:
        if patch.values.size != flat.size or patch.values.dtype != flat.dtype:
            raise SnapshotCorruptError(f"{where}: the dense patch does not cover the tensor")
        hasher.update(np.ascontiguousarray(patch.values).view(np.uint8).data)
    else:
        positions, values = patch.positions, patch.values
        covered = 0
        # One scratch chunk for the whole tensor: a fresh chunk per copy is a fresh
        # mmap whose every page faults on first touch (measured: 3x the copy's time
        # inside a replica, where malloc does not keep such chunks).
        scratch = np.empty(min(chunk_elements, flat.size), dtype=flat.dtype)
        for start in range(0, max(flat.size, 1), chunk_elements):
            stop = min(start + chunk_elements, flat.size)
            lo, hi = (int(i) for i in np.searchsorted(positions, [start, stop]))
            piece = flat[start:stop]
            if hi > lo:
                piece = scratch[: stop - start]
                np.copyto(piece, flat[start:stop])
                if not scatter_sorted(piece, positions[lo:hi], values[lo:hi], start):
                    raise SnapshotCorruptError(
                        f"{where}: the patch's positions are not sorted, unique and in range"
                    )
                covered += hi - lo
            hasher.update(np.ascontiguousarray(piece).view(np.uint8).data)
        if covered != positions.size:
            raise SnapshotCorruptError(
                f"{where}: {positions.size - covered} patch positions fall outside the tensor"
            )
    _check_checksum(where, manifest, entry, hasher.hexdigest())


def verify_tensors(manifest: Manifest, tensors: Mapping[str, torch.Tensor]) -> None:
    """Check that `tensors` holds every manifest tensor, bit-identical; extra names are ignored.

    Extra names are allowed so a caller can pass weights that include tied duplicates.
    """
    missing = sorted(set(manifest.tensors) - set(tensors))
    if missing:
        raise SnapshotCorruptError(
            f"snapshot {manifest.identity!r}: tensors {missing[:5]} "
            f"({len(missing)} in all) are missing from the weights being verified"
        )
    for name in sorted(manifest.tensors):
        verify_tensor(manifest, name, tensors[name])


def _check_spec(where: str, entry: TensorEntry, tensor: torch.Tensor) -> None:
    try:
        dtype = dtype_name(tensor.dtype)
    except UnsupportedDtypeError:
        dtype = str(tensor.dtype)
    _check_shape_dtype(where, entry, tuple(tensor.shape), dtype)


def _check_shape_dtype(where: str, entry: TensorEntry, shape: tuple[int, ...], dtype: str) -> None:
    if shape != entry.shape or dtype != entry.dtype:
        raise SnapshotCorruptError(
            f"{where} is {list(shape)} {dtype}, the manifest says {list(entry.shape)} {entry.dtype}"
        )
