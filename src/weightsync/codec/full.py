"""`full`: no delta — the payload is the new tensor's raw bits (the baseline)."""

from __future__ import annotations

import numpy as np
import torch

from weightsync.codec.base import Codec, Patch
from weightsync.codec.bits import bits, uint_dtype
from weightsync.codec.registry import register_codec
from weightsync.errors import SnapshotCorruptError


@register_codec
class FullCodec(Codec):
    name = "full"
    needs_old = False
    description = "raw little-endian bits of the new tensor; no delta"

    def encode(self, old: torch.Tensor, new: torch.Tensor) -> bytes:
        return bits(new).tobytes()

    def decode_patch(self, payload: bytes | memoryview, old: torch.Tensor) -> Patch:
        expected = old.numel() * old.element_size()
        if len(payload) != expected:
            raise SnapshotCorruptError(
                f"full payload has {len(payload)} bytes, expected {expected} for "
                f"shape {tuple(old.shape)} {old.dtype}"
            )
        return Patch(None, np.frombuffer(payload, dtype=uint_dtype(old)).copy())
