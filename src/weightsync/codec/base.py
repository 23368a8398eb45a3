"""The codec contract: (old bits, new bits) -> bytes -> new bits, bit-exactly.

A codec never sees files, HTTP or models: it gets two same-shaped tensors of one
supported dtype and returns an opaque payload; decoding yields a `Patch` (the
changed positions and their new bits) that can be applied in place onto the old
buffer, so a replica holds at most one extra copy of the *changed* data.

A patch takes whichever form holds fewer bytes: sparse (int64 positions + new bits,
`(8 + itemsize)` bytes a change) or dense (the tensor's new bits, no positions).
`Codec.decode_compact` returns that form; a codec that can write the dense form
directly overrides it, so a delta touching most elements never builds positions.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import ClassVar, Literal

import numpy as np
import torch

from weightsync.codec.bits import bits
from weightsync.codec.patch_kernels import swap_in, write_all
from weightsync.errors import PayloadCorruptError, SnapshotCorruptError


@dataclass(frozen=True)
class Patch:
    """New bits for some elements of one flat tensor.

    `positions` holds sorted flat element indices (int64) with `values` their new
    bits; `positions is None` means dense: `values` holds every element.
    """

    positions: np.ndarray | None
    values: np.ndarray

    @property
    def num_changed(self) -> int:
        return int(self.values.size)

    @property
    def nbytes(self) -> int:
        extra = 0 if self.positions is None else int(self.positions.nbytes)
        return int(self.values.nbytes) + extra

    def apply_(self, target: torch.Tensor) -> Patch:
        """Write the new bits into `target` in place; return the patch that undoes it."""
        view = bits(target)
        if self.positions is None:
            undo = Patch(None, view.copy())
            view[:] = self.values
            return undo
        replaced = swap_in(view, self.positions, self.values)
        return Patch(self.positions, replaced)

    def write_(self, target: torch.Tensor) -> None:
        """`apply_` without an undo: nothing is allocated (see `write_patches`)."""
        write_patches([(target, self)])


def write_patches(
    pairs: Iterable[tuple[torch.Tensor, Patch]], *, threads: int | None = None
) -> None:
    """Write each patch into its tensor in place, without an undo, all tensors at once.

    The work of every pair is spread over the patch threads together (`write_all`;
    `threads=1`: on the calling thread only). A dense patch of the wrong size, or a
    sparse one whose first or last position lies outside its tensor, raises before
    anything is written; a sparse patch's
    positions must be strictly increasing (every decoder's are, and a delta's verify
    refuses others): one found out of order raises `ValueError` with the tensors
    partly written, so only a caller that restores the weights from their source
    on failure (a replica's hot-load) writes without an undo.
    """
    write_all([(bits(t).reshape(-1), p.positions, p.values) for t, p in pairs], threads=threads)


#: Elements compared at a time by `count_changed` (its temporaries stay this size).
_COUNT_CHUNK = 1 << 20


def count_changed(old: torch.Tensor, new: torch.Tensor) -> int:
    """How many elements' bits differ between two same-shaped contiguous CPU tensors.

    A chunk at a time into one reused mask: `bits(old) != bits(new)` whole would
    allocate a mask of the tensor's size, a fresh mapping faulted in page by page.
    """
    a, b = bits(old).reshape(-1), bits(new).reshape(-1)
    mask = np.empty(min(a.size, _COUNT_CHUNK), dtype=bool)
    changed = 0
    for start in range(0, a.size, _COUNT_CHUNK):
        stop = min(start + _COUNT_CHUNK, a.size)
        part = mask[: stop - start]
        np.not_equal(a[start:stop], b[start:stop], out=part)
        changed += int(np.count_nonzero(part))
    return changed


def sparse_bytes(num_changed: int, itemsize: int) -> int:
    """Bytes a sparse patch of `num_changed` elements holds: int64 positions + new bits."""
    return num_changed * (8 + itemsize)


def compact(patch: Patch, old: torch.Tensor) -> Patch:
    """`patch` (against `old`) in whichever form holds fewer bytes.

    A sparse patch larger than the tensor's new bits becomes dense: `old`'s bits with
    the changes written in. Positions out of range keep it sparse, for the
    verification to refuse.
    """
    positions = patch.positions
    numel = old.numel()
    if positions is None or patch.nbytes <= numel * patch.values.dtype.itemsize:
        return patch
    if positions.size and (int(positions.min()) < 0 or int(positions.max()) >= numel):
        return patch
    dense = bits(old.detach().contiguous()).reshape(-1).copy()
    dense[positions] = patch.values
    return Patch(None, dense)


@dataclass(frozen=True)
class Encoded:
    """A tensor's payload, its changed elements (`num_changed`) and, when the codec
    adds it up while encoding, its change sum (`codec/change_sum.py`)."""

    payload: bytes
    num_changed: int
    change_sum: str | None = None


class Codec(ABC):
    """A lossless encoding of the new bits of a tensor given its old bits."""

    name: ClassVar[str]
    #: False for codecs whose payload stands alone (e.g. `full`).
    needs_old: ClassVar[bool] = True
    #: One line for `weightsync snapshot inspect` and the docs.
    description: ClassVar[str] = ""
    #: "fireworks": a bare payload (no header, no checksum of its own) stored in a
    #: shard whose metadata holds each tensor's decimal Adler-32, as
    #: fireworks-delta-compression writes it (FORMAT.md §8).
    shard_layout: ClassVar[Literal["weightsync", "fireworks"]] = "weightsync"
    #: True for a format weightsync decodes but does not encode (`encode` raises).
    read_only: ClassVar[bool] = False

    @abstractmethod
    def encode(self, old: torch.Tensor, new: torch.Tensor) -> bytes:
        """Encode `new` against `old` (same shape and dtype, contiguous, CPU)."""

    def encode_for_manifest(
        self, old: torch.Tensor, new: torch.Tensor, *, with_change_sum: bool = True
    ) -> Encoded:
        """`encode`, with what the manifest says of the tensor beside its payload.

        Codecs that find the changes while encoding override this to return their
        count instead of a second pass over both tensors, and, when `with_change_sum`,
        the change sum (`codec/change_sum.py`) if they can add it up from those changes.
        """
        return Encoded(self.encode(old, new), count_changed(old, new))

    def encode_all_for_manifest(
        self, pairs: Sequence[tuple[torch.Tensor, torch.Tensor]], *, with_change_sum: bool = True
    ) -> list[Encoded]:
        """`encode_for_manifest` of each `(old, new)` pair, in order.

        Codecs that split tensors into chunks override this to spread the chunks of
        every tensor over their threads at once: a model's many small tensors would
        otherwise be encoded one after another, each too small to split.
        """
        return [
            self.encode_for_manifest(old, new, with_change_sum=with_change_sum)
            for old, new in pairs
        ]

    @abstractmethod
    def decode_patch(self, payload: bytes | memoryview, old: torch.Tensor) -> Patch:
        """Decode a payload into the patch that turns `old` into the encoded tensor.

        `old` is only read. Raises `SnapshotCorruptError` on a malformed payload.
        """

    def decode_compact(self, payload: bytes | memoryview, old: torch.Tensor) -> Patch:
        """`decode_patch`, in whichever form holds fewer bytes (see `compact`).

        Codecs that know the change count before decoding override this to write a
        dense patch straight into a copy of `old`'s bits (no positions built).
        """
        return compact(self.decode_patch(payload, old), old)

    def decode_all(
        self, items: Sequence[tuple[bytes | memoryview, torch.Tensor]], *, compact: bool = False
    ) -> list[Patch]:
        """`decode_compact` (with `compact`) or `decode_patch` of each `(payload, old)`,
        in order. A malformed payload raises `PayloadCorruptError` naming its index.

        Codecs that split tensors into chunks override this to decode the chunks of
        every payload over their threads at once (see `encode_all_for_manifest`).
        """
        decode = self.decode_compact if compact else self.decode_patch
        patches = []
        for index, (payload, old) in enumerate(items):
            try:
                patches.append(decode(payload, old))
            except SnapshotCorruptError as e:
                raise PayloadCorruptError(index, str(e)) from e
        return patches

    def decode(
        self, payload: bytes | memoryview, old: torch.Tensor, *, inplace: bool = False
    ) -> torch.Tensor:
        """Return the encoded tensor; with `inplace=True` it is written into `old`."""
        patch = self.decode_patch(payload, old)
        target = old if inplace else old.clone()
        patch.apply_(target)
        return target
