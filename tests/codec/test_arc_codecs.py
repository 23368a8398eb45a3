"""Fireworks' codecs: byte-exact with fireworks-delta-compression both ways; hostile input refused.

The reference is the real package (`fireworks_delta_compression`, the pinned dev
extra): its `delta_compress` / `delta_decompress` per tensor, and for arc_v3 the
helpers its own `Arc3Backend.compress` combines, to pin every variant it can emit.
"""

from __future__ import annotations

import bz2
import pickle
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
import zstandard
from fireworks_delta_compression import compression as fdc
from fireworks_delta_compression.backends import arc3
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from _support.bit_patterns import random_bits, ulp_moves
from _support.bits import int_bits, same_bits
from weightsync.bench.codecs import measure_codec
from weightsync.bench.methods import bench_methods
from weightsync.codec import get_codec, list_codecs
from weightsync.codec.arc import fireworks_checksum
from weightsync.codec.arc_v3 import ENVELOPE_PREFIX
from weightsync.errors import (
    ChainError,
    SnapshotCorruptError,
    UnknownCodecError,
    UnsupportedOperationError,
)

DTYPES = (torch.bfloat16, torch.float16, torch.float32, torch.float8_e4m3fn, torch.float8_e5m2)
SHAPES = st.one_of(
    st.just((0,)),
    st.just((1,)),
    st.just(()),
    st.tuples(st.integers(0, 600)),
    st.tuples(st.integers(1, 9), st.integers(0, 40)),
)
HYPOTHESIS = settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def _pair(
    seed: int, dtype: torch.dtype, shape: tuple[int, ...], density: float
) -> tuple[torch.Tensor, torch.Tensor]:
    rng = np.random.default_rng(seed)
    old = random_bits(rng, dtype, shape, specials=0.05)
    return _standard(old), _standard(ulp_moves(rng, old, density=density))


def _standard(t: torch.Tensor) -> torch.Tensor:
    # Standard strides: an empty tensor built from numpy has stride 0, which the
    # reference package cannot byte-view (real tensors never have it).
    out = torch.empty_like(t, memory_format=torch.contiguous_format)
    return out.copy_(t)


def _raw(t: torch.Tensor) -> bytes:
    return t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()


@pytest.mark.timeout(120)
@pytest.mark.parametrize("codec", ["arc_v1", "arc_v2"])
@HYPOTHESIS
@given(
    dtype=st.sampled_from(DTYPES),
    shape=SHAPES,
    seed=st.integers(0, 2**32 - 1),
    density=st.sampled_from([0.0, 0.01, 0.3, 1.0]),
)
def test_arc_v1_v2_bytes_equal_theirs_and_decode_both_ways(
    codec: str, dtype: torch.dtype, shape: tuple[int, ...], seed: int, density: float
) -> None:
    old, new = _pair(seed, dtype, shape, density)
    ours = get_codec(codec).encode(old, new)
    theirs, checksum = fdc.delta_compress(src=old, dst=new, compression_format=codec)
    assert ours == theirs.numpy().tobytes()
    assert fireworks_checksum(_raw(new)) == checksum == str(zlib.adler32(_raw(new)))
    # theirs decodes ours
    decoded = fdc.delta_decompress(
        src=old,
        compressed_diff=torch.frombuffer(bytearray(ours), dtype=torch.uint8),
        checksum=checksum,
        compression_format=codec,
    )
    assert same_bits(decoded.reshape(new.shape), new)
    # ours decodes theirs, without touching `old`
    before = int_bits(old).clone()
    assert same_bits(get_codec(codec).decode(theirs.numpy().tobytes(), old), new)
    assert torch.equal(int_bits(old), before)


@pytest.mark.timeout(120)
def test_arc_v2_frames_equal_theirs_beyond_one_zstd_job() -> None:
    # zstd's multithreaded mode (what the `zstd` package uses) splits inputs into jobs of
    # tens of MB: past one job its frames differ from a single-threaded compressor's.
    old, new = _pair(3, torch.bfloat16, (12_000_000,), 0.2)
    ours = get_codec("arc_v2").encode(old, new)
    theirs, _ = fdc.delta_compress(src=old, dst=new, compression_format="arc_v2")
    assert ours == theirs.numpy().tobytes()
    xor = (int_bits(old) ^ int_bits(new)).numpy().tobytes()
    assert ours != zstandard.ZstdCompressor(level=3).compress(xor)  # the difference is real


def _arc3_variant(old: torch.Tensor, new: torch.Tensor, mode: str, inner: str) -> bytes:
    """One arc_v3 payload as `Arc3Backend.compress` builds each candidate."""
    spec = arc3._float_encoding_spec(new.dtype)
    payload, changed = arc3._build_mantissa_payload(prev=old, curr=new, spec=spec)
    payload = dict(payload)
    if changed.size:
        shape = tuple(new.shape)
        payload["indices"] = arc3._encode_indices(indices=changed, shape=shape, mode=mode)
    raw = pickle.dumps(payload, protocol=pickle.HIGHEST_PROTOCOL)
    return arc3._compress_pickled_payload(raw=raw, codec=inner)


@pytest.mark.timeout(180)
@pytest.mark.parametrize(("mode", "inner"), [("flat", "zstd"), ("row", "bz2"), ("row", "zstd")])
@HYPOTHESIS
@given(
    dtype=st.sampled_from(DTYPES),
    shape=SHAPES,
    seed=st.integers(0, 2**32 - 1),
    density=st.sampled_from([0.0, 0.02, 0.5, 1.0]),
)
def test_arc_v3_of_theirs_decodes_bit_exactly(
    mode: str, inner: str, dtype: torch.dtype, shape: tuple[int, ...], seed: int, density: float
) -> None:
    old, new = _pair(seed, dtype, shape, density)
    payload = _arc3_variant(old, new, mode, inner)
    assert payload.startswith(ENVELOPE_PREFIX)
    patch = get_codec("arc_v3").decode_patch(payload, old)
    assert patch.positions is not None  # sparse: only the changed elements
    assert patch.num_changed == int((int_bits(old) != int_bits(new)).sum())
    assert same_bits(get_codec("arc_v3").decode(payload, old), new)


@pytest.mark.timeout(120)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_arc_v3_from_their_backend_decodes_bit_exactly(dtype: torch.dtype) -> None:
    for seed, density in ((1, 0.0), (2, 0.01), (3, 0.9)):
        old, new = _pair(seed, dtype, (64, 48), density)
        theirs, checksum = fdc.delta_compress(src=old, dst=new, compression_format="arc_v3")
        decoded = get_codec("arc_v3").decode(theirs.numpy().tobytes(), old)
        assert same_bits(decoded, new)
        assert fireworks_checksum(_raw(decoded)) == checksum


def test_arc_v3_fallback_payload_decodes() -> None:
    # The nested-safetensors fallback (an arc_v2 payload) that arc3 picks when smaller.
    old, new = _pair(5, torch.float32, (30, 20), 1.0)
    backend = arc3.Arc3Backend()
    fallback = next(iter(backend._candidate_backends.items()))
    name, arc2_backend = fallback
    diff, checksum = arc2_backend.compress(src=old, dst=new)
    blob = arc3.save({"tensor": diff}, metadata={"tensor": checksum, "fallback_name": name})
    assert not blob.startswith(ENVELOPE_PREFIX)
    assert same_bits(get_codec("arc_v3").decode(blob, old), new)
    bad = arc3.save({"tensor": diff}, metadata={"tensor": checksum, "fallback_name": "lz4"})
    with pytest.raises(SnapshotCorruptError, match="fallback codec 'lz4'"):
        get_codec("arc_v3").decode_patch(bad, old)


class _RunsShell:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[object, tuple[str]]:
        import os

        return os.system, (f"touch {self.marker}",)


def test_a_pickle_that_would_run_code_is_refused_without_running(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    old = torch.zeros(4, dtype=torch.bfloat16)
    evil = pickle.dumps(_RunsShell(marker), protocol=pickle.HIGHEST_PROTOCOL)
    # as the envelope itself
    with pytest.raises(SnapshotCorruptError, match="STACK_GLOBAL"):
        get_codec("arc_v3").decode_patch(ENVELOPE_PREFIX + evil, old)
    # inside a well-formed envelope, as the compressed payload
    envelope = {"codec": "zstd", "data": zstandard.ZstdCompressor().compress(evil)}
    blob = ENVELOPE_PREFIX + pickle.dumps(envelope, protocol=pickle.HIGHEST_PROTOCOL)
    with pytest.raises(SnapshotCorruptError, match="refused without running it"):
        get_codec("arc_v3").decode_patch(blob, old)
    # a numpy array is not plain data either (arc3 itself never pickles one)
    arr = pickle.dumps({"data": np.zeros(3)}, protocol=2)
    with pytest.raises(SnapshotCorruptError, match="refused without running it"):
        get_codec("arc_v3").decode_patch(ENVELOPE_PREFIX + arr, old)
    assert not marker.exists()


def _bomb(size_bytes: int) -> bytes:
    # A few KB that expand to `size_bytes`, with no content size in the frame header.
    return zstandard.ZstdCompressor(write_content_size=False).compress(bytes(size_bytes))


@pytest.mark.parametrize("codec", ["arc_v1", "arc_v2"])
def test_frames_that_expand_past_the_tensor_are_refused(codec: str) -> None:
    old = torch.zeros(512, dtype=torch.bfloat16)  # 1 KiB
    if codec == "arc_v2":
        declared = zstandard.ZstdCompressor().compress(bytes(64 << 20))
        assert zstandard.frame_content_size(declared) == 64 << 20
        for frame in (declared, _bomb(64 << 20)):
            assert len(frame) < 16 << 10
            with pytest.raises(SnapshotCorruptError, match="more than 1024 bytes"):
                get_codec(codec).decode_patch(frame, old)
    else:
        frame = zlib.compress(bytes(64 << 20), 9)
        with pytest.raises(SnapshotCorruptError, match="more than 1024 bytes"):
            get_codec(codec).decode_patch(frame, old)
    short = get_codec(codec).encode(old, old)[:-3]
    with pytest.raises(SnapshotCorruptError, match="compression_format"):
        get_codec(codec).decode_patch(short, old)


@pytest.mark.parametrize("inner", ["zstd", "bz2"])
def test_arc_v3_payload_that_expands_past_its_cap_is_refused(inner: str) -> None:
    old = torch.zeros(100, dtype=torch.bfloat16)
    data = _bomb(64 << 20) if inner == "zstd" else bz2.compress(bytes(8 << 20))
    blob = ENVELOPE_PREFIX + pickle.dumps({"codec": inner, "data": data})
    with pytest.raises(SnapshotCorruptError, match="more than"):
        get_codec("arc_v3").decode_patch(blob, old)


def test_arc_v3_payload_of_another_tensor_is_a_chain_error() -> None:
    old, new = _pair(8, torch.bfloat16, (12, 10), 0.3)
    payload = _arc3_variant(old, new, "flat", "zstd")
    with pytest.raises(ChainError, match="parent"):
        get_codec("arc_v3").decode_patch(payload, old.reshape(10, 12))
    with pytest.raises(ChainError, match="parent"):
        get_codec("arc_v3").decode_patch(payload, old.to(torch.float16))


def test_arc_v3_positions_outside_the_tensor_are_refused() -> None:
    old, new = _pair(9, torch.bfloat16, (50,), 0.3)
    spec = arc3._float_encoding_spec(new.dtype)
    payload, changed = arc3._build_mantissa_payload(prev=old, curr=new, spec=spec)
    payload = dict(payload)
    payload["indices"] = arc3._encode_indices(indices=changed + 40, shape=(50,), mode="flat")
    raw = zstandard.ZstdCompressor().compress(pickle.dumps(payload))
    blob = ENVELOPE_PREFIX + pickle.dumps({"codec": "zstd", "data": raw})
    with pytest.raises(SnapshotCorruptError, match=r"inside the tensor|leaves the tensor"):
        get_codec("arc_v3").decode_patch(blob, old)


def test_arc_v3_is_read_only_and_listed_as_such() -> None:
    old, new = _pair(1, torch.bfloat16, (8,), 0.5)
    with pytest.raises(UnsupportedOperationError, match="read only"):
        get_codec("arc_v3").encode(old, new)
    assert "arc_v3" not in list_codecs()
    assert {"arc_v1", "arc_v2", "arc_v3"} <= set(list_codecs(include_read_only=True))
    for name in ("arc_v1", "arc_v2", "arc_v3"):
        assert get_codec(name).shard_layout == "fireworks"
    assert get_codec("wsdelta1").shard_layout == "weightsync"
    with pytest.raises(UnknownCodecError, match="arc_v3"):
        get_codec("arc_v4")


def test_the_bench_measures_fireworks_codecs_against_their_implementation() -> None:
    old, new = _pair(12, torch.bfloat16, (256, 64), 0.05)
    sets = ({"w": old, "b": old[0].clone()}, {"w": new, "b": new[0].clone()})
    arc_v3 = measure_codec("arc_v3", *sets)
    assert arc_v3.lossless and arc_v3.encoder == "fireworks-delta-compression"
    arc_v2 = measure_codec("arc_v2", *sets)
    assert arc_v2.lossless and arc_v2.encoder == "weightsync"
    assert arc_v2.reference_decode_s is not None and arc_v3.reference_decode_s is not None
    assert measure_codec("wsdelta1", *sets).reference_decode_s is None
    assert {"arc_v1", "arc_v2", "arc_v3"} <= {m.codec for m in bench_methods()}
    assert not next(m for m in bench_methods() if m.codec == "arc_v3").syncs_end_to_end


def test_pickles_that_claim_huge_allocations_are_refused_unread() -> None:
    # Each would make the C unpickler allocate gigabytes (memo sized by the index it
    # sees, a frame or a bytes object sized by its header) before noticing the lie.
    good = pickle.dumps({"a": b"x" * 100, "b": [1, 2]}, protocol=5)
    frame_at = good.index(b"\x95")
    hostile = [
        b"\x80\x05N" + b"r" + (1_570_005_761).to_bytes(4, "little") + b".",  # LONG_BINPUT
        good[: frame_at + 1] + (2**40).to_bytes(8, "little") + good[frame_at + 9 :],  # FRAME
        good[: frame_at + 1] + (30).to_bytes(8, "little") + good[frame_at + 9 :],  # short frame
        b"\x80\x05\x8e" + (2**40).to_bytes(8, "little") + b"xx.",  # BINBYTES8
    ]
    old = torch.zeros(4, dtype=torch.bfloat16)
    for blob in hostile:
        # Refused by the opcode walk, not by a MemoryError after the allocation.
        with pytest.raises(SnapshotCorruptError, match=r"pickle opcode|not a valid pickle"):
            get_codec("arc_v3").decode_patch(ENVELOPE_PREFIX + blob, old)
