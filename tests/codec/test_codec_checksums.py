"""Checksums: known answers from each algorithm's published test vectors."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from weightsync.codec import (
    DEFAULT_CHECKSUM,
    canonical_checksum_name,
    checksum_bytes,
    checksum_tensor,
    list_checksums,
)
from weightsync.errors import UnknownChecksumError

KNOWN_ANSWERS = [
    # RFC 1950 Adler-32 of "Wikipedia" (its standard worked example).
    ("adler32", b"Wikipedia", "11e60398"),
    ("alder32", b"Wikipedia", "11e60398"),
    ("adler32", b"", "00000001"),
    # CRC-32C (Castagnoli) check value of "123456789".
    ("crc32c", b"123456789", "e3069283"),
    ("crc32c", b"", "00000000"),
    # XXH3_64bits of the empty input (seed 0), from the xxHash reference.
    ("xxh3_64", b"", "2d06800538d394c2"),
    # BLAKE3 of the empty input, from the BLAKE3 reference test vectors.
    ("blake3", b"", "af1349b9f5f9a1a6a0404dea36dcc9499bcb25c9adc112b7cc9a93cae41f3262"),
]


@pytest.mark.parametrize(("name", "data", "expected"), KNOWN_ANSWERS)
def test_known_answers(name: str, data: bytes, expected: str) -> None:
    assert checksum_bytes(name, data) == expected


def test_names_and_alias() -> None:
    assert list_checksums() == ["adler32", "blake3", "crc32c", "xxh3_64"]
    assert canonical_checksum_name("alder32") == "adler32"
    assert DEFAULT_CHECKSUM == "xxh3_64"
    with pytest.raises(UnknownChecksumError, match="xxh3_64"):
        canonical_checksum_name("md5")


@pytest.mark.parametrize("name", ["adler32", "blake3", "crc32c", "xxh3_64"])
def test_tensor_checksum_is_of_its_little_endian_bits(name: str) -> None:
    t = torch.tensor([1.0, -0.0, float("inf"), float("nan")], dtype=torch.bfloat16)
    raw = t.view(torch.int16).numpy().astype("<i2").tobytes()
    assert checksum_tensor(name, t) == checksum_bytes(name, raw)
    assert checksum_tensor(name, t) == checksum_bytes(name, np.frombuffer(raw, dtype=np.uint8))
    flipped = t.clone()
    flipped.view(torch.int16)[0] ^= 1
    assert checksum_tensor(name, flipped) != checksum_tensor(name, t)
