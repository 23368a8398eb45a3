"""Piece files: one rank's boxes of sharded tensors (FORMAT.md §9).

A sharded trainer stores each tensor it holds in pieces as boxes of the whole
tensor, one file per rank and per shard of the shard plan. A base piece file is
a safetensors file holding, under each tensor's name, that rank's box of it; a
delta piece file is a delta shard (§3.2, or §8.2 for the Fireworks codecs) whose
payload for each name encodes the box's new bits against the same box of the
parent's weights. The manifest lists every piece (file, offset, shape), so a
reader rebuilds whole tensors and whole-tensor patches; it never needs to know
how many ranks wrote them.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from weightsync.codec import get_codec
from weightsync.codec.arc import fireworks_checksum
from weightsync.codec.bits import bits
from weightsync.snapshot.delta_shard import encode_delta_shard
from weightsync.snapshot.fireworks_layout import encode_shard
from weightsync.snapshot.safetensors_file import encode_safetensors, raw_tensor

#: `__metadata__["format"]` of a base piece file.
PIECE_FORMAT = "weightsync-piece"
_SUFFIX = ".safetensors"


def piece_file(shard_file: str, rank: int) -> str:
    """`rank`'s piece file for the tensors of `shard_file`: ``model-00001.r00003.safetensors``."""
    stem = shard_file[: -len(_SUFFIX)] if shard_file.endswith(_SUFFIX) else shard_file
    return f"{stem}.r{rank:05d}{_SUFFIX}"


def encode_base_pieces(pieces: Mapping[str, torch.Tensor]) -> bytes:
    """A base piece file: tensor name -> this rank's box of it (contiguous CPU tensors)."""
    return encode_safetensors(
        {name: raw_tensor(t) for name, t in pieces.items()}, {"format": PIECE_FORMAT}
    )


def encode_delta_pieces(
    old: Mapping[str, torch.Tensor],
    new: Mapping[str, torch.Tensor],
    *,
    compression_format: str,
) -> tuple[bytes, dict[str, int]]:
    """A delta piece file for the boxes `new` against `old`, and each box's changed elements.

    The container is the codec's delta shard: for the Fireworks codecs its metadata
    holds each box's Adler-32 (of the box's new bits), for the others the
    weightsync-delta metadata.
    """
    codec = get_codec(compression_format)
    payloads: dict[str, bytes] = {}
    changed: dict[str, int] = {}
    names = sorted(new)
    # Pieces carry no change sums (FORMAT.md §4.2): none is added up.
    encoded = codec.encode_all_for_manifest(
        [(old[name], new[name]) for name in names], with_change_sum=False
    )
    for name, piece in zip(names, encoded, strict=True):
        payloads[name], changed[name] = piece.payload, piece.num_changed
    if codec.shard_layout == "fireworks":
        checksums = {name: fireworks_checksum(bits(new[name])) for name in payloads}
        return encode_shard(payloads, checksums), changed
    return encode_delta_shard(payloads, compression_format=codec.name), changed
