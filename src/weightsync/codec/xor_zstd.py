"""`xor-zstd`: zstd of the XOR of old and new bits (the style of Fireworks' ARC2 and slime).

Unchanged elements XOR to zero bytes, which zstd squeezes well; changed ones
leave their low mantissa bits. Simple and dense: decoding rewrites every element.
"""

from __future__ import annotations

import numpy as np
import torch
import zstandard

from weightsync.codec.base import Codec, Patch
from weightsync.codec.bits import bits
from weightsync.codec.framing import (
    check_pair,
    decompress_zstd_into,
    open_payload,
    pack_header,
    seal,
)
from weightsync.codec.registry import register_codec

NAME = "xor-zstd"
MAGIC = b"WSXZ"
ZSTD_LEVEL = 1


@register_codec
class XorZstdCodec(Codec):
    name = NAME
    description = "zstd of old XOR new bits (ARC2/slime style); dense"

    def encode(self, old: torch.Tensor, new: torch.Tensor) -> bytes:
        old, new = check_pair(old, new)
        xor = np.bitwise_xor(bits(old), bits(new))
        compressed = zstandard.ZstdCompressor(level=ZSTD_LEVEL).compress(xor.data)
        return seal([pack_header(MAGIC, new), compressed])

    def decode_patch(self, payload: bytes | memoryview, old: torch.Tensor) -> Patch:
        body = open_payload(payload, MAGIC, old, NAME)
        old_bits = bits(old.contiguous())
        # The XOR stream lands in the patch's own array and is turned into the new bits
        # there: one tensor of memory, not a stream plus a result.
        new_bits = np.empty_like(old_bits)
        decompress_zstd_into(body, new_bits, what=f"{NAME} XOR stream")
        return Patch(None, np.bitwise_xor(new_bits, old_bits, out=new_bits))
