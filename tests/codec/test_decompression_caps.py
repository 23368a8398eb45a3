"""Decompression bombs: a compressed stream is decoded into at most what the tensor can hold,
whatever size its frame declares (or omits), and the refusal names the stream."""

from __future__ import annotations

import json
import struct
import subprocess
import sys
import zlib

import numpy as np
import pytest
import torch
import zstandard

from weightsync.codec import gap_zstd, get_codec, wsdelta1, xor_zstd
from weightsync.codec.framing import (
    decompress_zlib_capped,
    decompress_zstd_capped,
    pack_header,
    seal,
)
from weightsync.errors import InvalidInputError, SnapshotCorruptError

CLAIMED_BYTES = 256 * 1024**2


@pytest.fixture(scope="module", params=[True, False], ids=["size declared", "size omitted"])
def bomb(request: pytest.FixtureRequest) -> bytes:
    """256 MiB of zeros as one zstd frame of a few KB, with or without a content size."""
    compressor = zstandard.ZstdCompressor(level=1, write_content_size=request.param)
    data = compressor.compress(bytes(CLAIMED_BYTES))
    assert len(data) < 64 * 1024
    assert zstandard.frame_content_size(data) == (CLAIMED_BYTES if request.param else -1)
    return data


def test_zstd_within_the_cap_round_trips() -> None:
    raw = np.random.default_rng(0).integers(0, 8, 300_001, dtype=np.uint8).tobytes()
    frame = zstandard.ZstdCompressor(level=3).compress(raw)
    assert decompress_zstd_capped(frame, len(raw), what="s", exact=True) == raw
    assert decompress_zstd_capped(frame, len(raw) + 10, what="s") == raw
    two_frames = frame + zstandard.ZstdCompressor().compress(b"tail")
    assert decompress_zstd_capped(two_frames, len(raw) + 4, what="s") == raw + b"tail"
    assert decompress_zstd_capped(b"", 0, what="s", exact=True) == b""


def test_zstd_bomb_is_refused_at_the_cap(bomb: bytes) -> None:
    with pytest.raises(SnapshotCorruptError, match="decompresses to more than 1000 bytes") as e:
        decompress_zstd_capped(bomb, 1000, what="the test stream")
    assert "the test stream" in str(e.value)


def test_zstd_short_garbage_and_trailing_bytes() -> None:
    frame = zstandard.ZstdCompressor().compress(b"x" * 5000)
    with pytest.raises(SnapshotCorruptError, match="expected 5001"):
        decompress_zstd_capped(frame, 5001, what="s", exact=True)
    with pytest.raises(SnapshotCorruptError, match="expected 5000"):
        decompress_zstd_capped(frame[:-4], 5000, what="s", exact=True)
    for bad in (b"not zstd at all", frame + b"junk"):
        with pytest.raises(SnapshotCorruptError, match="zstd"):
            decompress_zstd_capped(bad, 10_000, what="s")
    with pytest.raises(InvalidInputError):
        decompress_zstd_capped(frame, -1, what="s")


def test_zlib_cap_truncation_and_trailing_bytes() -> None:
    raw = b"abc" * 10_000
    stream = zlib.compress(raw)
    assert decompress_zlib_capped(stream, len(raw), what="z", exact=True) == raw
    bomb = zlib.compress(bytes(CLAIMED_BYTES), 9)
    with pytest.raises(SnapshotCorruptError, match="more than 1000 bytes"):
        decompress_zlib_capped(bomb, 1000, what="z")
    with pytest.raises(SnapshotCorruptError, match="truncated"):
        decompress_zlib_capped(stream[:-3], len(raw), what="z")
    with pytest.raises(SnapshotCorruptError, match="after its zlib stream"):
        decompress_zlib_capped(stream + b"x", len(raw), what="z")
    with pytest.raises(SnapshotCorruptError, match="zlib"):
        decompress_zlib_capped(b"junk", len(raw), what="z")
    raw_deflate = zlib.compressobj(wbits=-15)
    deflated = raw_deflate.compress(raw) + raw_deflate.flush()
    assert decompress_zlib_capped(deflated, len(raw), what="z", wbits=-15) == raw


# --- each codec, with a bomb where its stream belongs (the payload's trailer is valid) ----


def _old() -> torch.Tensor:
    return torch.zeros(1000, dtype=torch.bfloat16)


def _xor_zstd_payload(old: torch.Tensor, stream: bytes) -> bytes:
    return seal([pack_header(xor_zstd.MAGIC, old), stream])


def _gap_zstd_payload(old: torch.Tensor, stream: bytes) -> bytes:
    count = 10
    values = zstandard.ZstdCompressor().compress(bytes(2 * count))
    return seal([
        pack_header(gap_zstd.MAGIC, old), struct.pack("<QQ", count, len(stream)), stream, values
    ])  # fmt: skip


def _wsdelta1_payload(old: torch.Tensor, stream: bytes) -> bytes:
    m = 10
    k = wsdelta1.choose_low_bits(old.numel(), m)
    low = bytes((m * k + 7) // 8)
    row = struct.pack("<BBIIII", wsdelta1.MODE_SPARSE, k, m, len(stream), len(low), 0)
    table = struct.pack("<QI", wsdelta1.CHUNK_ELEMENTS, 1)
    return seal([pack_header(wsdelta1.MAGIC, old), table, row, stream, low])


PAYLOADS = {
    "xor-zstd": _xor_zstd_payload,
    "gap-zstd": _gap_zstd_payload,
    "wsdelta1": _wsdelta1_payload,
}


@pytest.mark.parametrize("codec", sorted(PAYLOADS))
def test_codec_refuses_a_bomb_in_its_stream(codec: str, bomb: bytes) -> None:
    old = _old()
    payload = PAYLOADS[codec](old, bomb)
    with pytest.raises(SnapshotCorruptError, match="decompresses to more than") as e:
        get_codec(codec).decode_patch(payload, old)
    assert codec in str(e.value)


CHILD = """
import json, resource, sys, zstandard, torch
from weightsync.codec import get_codec
from weightsync.codec.framing import pack_header, seal
from weightsync.codec.xor_zstd import MAGIC
from weightsync.errors import SnapshotCorruptError
claimed = int(sys.argv[1])
cobj = zstandard.ZstdCompressor(level=1).compressobj(size=claimed)
zeros = bytes(1 << 20)
bomb = b"".join(cobj.compress(zeros) for _ in range(claimed >> 20)) + cobj.flush()
assert zstandard.frame_content_size(bomb) == claimed
old = torch.zeros(1 << 20, dtype=torch.bfloat16)
payload = seal([pack_header(MAGIC, old), bomb])
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
try:
    get_codec("xor-zstd").decode_patch(payload, old)
    refused = ""
except SnapshotCorruptError as e:
    refused = str(e)
after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(json.dumps({"grew_kib": after - before, "refused": refused, "payload": len(payload)}))
"""


def test_a_bomb_costs_the_cap_not_what_it_claims() -> None:
    """In a fresh process: a 1 GiB claim against a 2 MiB tensor raises peak RSS by about
    the tensor, not by the claim (the frame is built from 1 MiB pieces of zeros)."""
    claimed = 1024**3
    out = subprocess.run(
        [sys.executable, "-c", CHILD, str(claimed)],
        check=False,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    report = json.loads(out.stdout.strip().splitlines()[-1])
    assert "decompresses to more than 2097152 bytes" in report["refused"], report
    assert report["grew_kib"] < 64 * 1024, report
