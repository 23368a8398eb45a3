"""Checks of bytes and tensors against a manifest; each failure names snapshot and file/tensor."""

from __future__ import annotations

from collections.abc import Mapping

import torch

from weightsync.codec import checksum_bytes, checksum_tensor
from weightsync.codec.bits import dtype_name
from weightsync.errors import SnapshotCorruptError, UnsupportedDtypeError
from weightsync.snapshot.manifest import Manifest, TensorEntry


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
        raise SnapshotCorruptError(
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
    actual = checksum_tensor(manifest.checksum_format, tensor)
    if actual != entry.checksum:
        raise SnapshotCorruptError(
            f"{where} fails its {manifest.checksum_format} checksum ({actual} != "
            f"{entry.checksum}): the weights are not bit-identical to what was saved"
        )


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
    if tuple(tensor.shape) != entry.shape or dtype != entry.dtype:
        raise SnapshotCorruptError(
            f"{where} is {list(tensor.shape)} {dtype}, the manifest says "
            f"{list(entry.shape)} {entry.dtype}"
        )
