"""The codec contract: (old bits, new bits) -> bytes -> new bits, bit-exactly.

A codec never sees files, HTTP or models: it gets two same-shaped tensors of one
supported dtype and returns an opaque payload; decoding yields a `Patch` (the
changed positions and their new bits) that can be applied in place onto the old
buffer, so a replica holds at most one extra copy of the *changed* data.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import ClassVar, Literal

import numpy as np
import torch

from weightsync.codec.bits import bits
from weightsync.codec.patch_kernels import swap_in


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

    @abstractmethod
    def decode_patch(self, payload: bytes | memoryview, old: torch.Tensor) -> Patch:
        """Decode a payload into the patch that turns `old` into the encoded tensor.

        `old` is only read. Raises `SnapshotCorruptError` on a malformed payload.
        """

    def decode(
        self, payload: bytes | memoryview, old: torch.Tensor, *, inplace: bool = False
    ) -> torch.Tensor:
        """Return the encoded tensor; with `inplace=True` it is written into `old`."""
        patch = self.decode_patch(payload, old)
        target = old if inplace else old.clone()
        patch.apply_(target)
        return target
