"""`wsdelta1`: the default codec — sparse positions and ulp-step deltas, near the entropy bound.

An RL optimizer step changes a few percent of the bf16 elements, mostly by one
unit in the last place. The payload therefore codes *where* elements changed
(gaps between changed positions) and *by how many steps* of an order-preserving
integer key (`wsdelta_kernels`), never the new values themselves. See
docs/codecs.md for the byte layout and the measurements behind each choice.

Per chunk of `CHUNK_ELEMENTS` elements (chunks encode and decode in parallel
threads, and bound the scratch memory):
- symbols (zstd): one byte per change, `quotient<<2 | big<<1 | negative`, where
  the gap to the previous change is `quotient * 2^k + low` and `big` marks a key
  step of 2 or more; byte 255 adds 63 to the next quotient (escape);
- low bits (raw): the `k` low bits of every gap, bit-packed; `k` is chosen per
  chunk from its density so the quotient stays small;
- big magnitudes (zstd): `|step| - 2` as LEB128 varints, for the ~10 % of
  changes that are not ±1.
Joining quotient, sign and the "big" flag into one byte keeps each symbol's
entropy at several bits, so Huffman's whole-bit code lengths cost ~1 %, where
coding the mostly-±1 steps as separate bytes would cost 10-30 %.
A chunk with no change costs its table row; a chunk where the sparse code would
not pay is stored dense (raw new bits).
"""

from __future__ import annotations

import math
import os
import struct
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import Executor, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Literal, TypeVar

import numpy as np
import torch
import zstandard

from weightsync.codec import change_sum
from weightsync.codec import wsdelta_kernels as kernels
from weightsync.codec.base import Codec, Encoded, Patch, sparse_bytes
from weightsync.codec.bits import bits, uint_dtype
from weightsync.codec.framing import (
    check_pair,
    corrupt,
    decompress_zstd_capped,
    open_payload,
    pack_header,
    seal,
)
from weightsync.codec.registry import register_codec
from weightsync.errors import PayloadCorruptError, SnapshotCorruptError

CHUNK_ELEMENTS = 1 << 22
ZSTD_LEVEL = 1
MAGIC = b"WSD1"
NAME = "wsdelta1"

ChunkMode = Literal[0, 1, 2]
MODE_UNCHANGED: ChunkMode = 0
MODE_SPARSE: ChunkMode = 1
MODE_DENSE: ChunkMode = 2
# Chunk table row: mode, k, num_changed, symbols bytes, low bytes, big bytes.
_ROW = struct.Struct("<BBIIII")
_COUNT = struct.Struct("<QI")  # chunk_elements, num_chunks

_POOL: Executor | None = None


def _pool() -> Executor:
    global _POOL  # noqa: PLW0603  (one process-wide pool, created on first use)
    if _POOL is None:
        _POOL = ThreadPoolExecutor(
            max_workers=max(1, os.cpu_count() or 1), thread_name_prefix="wsdelta1"
        )
    return _POOL


@dataclass(frozen=True, kw_only=True)
class _Chunk:
    mode: ChunkMode
    k: int
    num_changed: int  # as the chunk table stores it: a dense chunk's is its length
    streams: tuple[bytes, bytes, bytes]
    changed: int  # elements whose bits differ (not stored)
    lanes: tuple[int, int] = (0, 0)  # the chunk's change sum (not stored)

    def row(self) -> bytes:
        return _ROW.pack(self.mode, self.k, self.num_changed, *(len(s) for s in self.streams))


def choose_low_bits(count: int, num_changed: int) -> int:
    """Low gap bits stored raw: keeps the mean quotient near 4 (well below the escape)."""
    if num_changed == 0:
        return 0
    return max(0, int(math.log2(count / num_changed)) - 2)


def _symbol_capacity(count: int, num_changed: int, k: int) -> int:
    return num_changed + (count >> k) // kernels.ESCAPE_STEP + 16


def _encode_chunk(old: np.ndarray, new: np.ndarray, start: int, stop: int, summed: bool) -> _Chunk:
    count = stop - start
    found = _find_changes(old, new, start, stop)
    m = found.count
    if m == 0:
        return _Chunk(mode=MODE_UNCHANGED, k=0, num_changed=0, streams=(b"", b"", b""), changed=0)
    positions, old_bits, new_bits = found.positions, found.old_bits, found.new_bits
    lanes = change_sum.chunk_change(start, positions, old_bits, new_bits, m) if summed else (0, 0)
    k = choose_low_bits(count, m)
    sym = _scratch("sym", _symbol_capacity(count, m, k), np.uint8)
    low_words = _scratch("low", m * k // 64 + 2, np.uint64)
    big = _scratch("big", m * kernels.MAX_VARINT_BYTES, np.uint8)
    width = old.dtype.itemsize * 8
    ns, nl, nb = kernels.emit_sparse(
        old_bits, new_bits, positions, m, k, width, sym, low_words, big
    )
    # The stream is the words' little-endian bytes (a no-op view on such hosts).
    low = low_words[: (nl + 7) // 8].astype("<u8", copy=False).view(np.uint8)
    compressor = zstandard.ZstdCompressor(level=ZSTD_LEVEL)
    streams = (
        compressor.compress(sym[:ns].data),
        low[:nl].tobytes(),
        compressor.compress(big[:nb].data) if nb else b"",
    )
    dense_bytes = count * old.dtype.itemsize
    if sum(len(s) for s in streams) >= dense_bytes:
        dense = (new[start:stop].tobytes(), b"", b"")
        return _Chunk(
            mode=MODE_DENSE, k=0, num_changed=count, streams=dense, changed=m, lanes=lanes
        )
    return _Chunk(mode=MODE_SPARSE, k=k, num_changed=m, streams=streams, changed=m, lanes=lanes)


_THREAD = threading.local()


def _scratch(name: str, size: int, dtype: type[np.generic]) -> np.ndarray:
    """A per-thread reusable buffer of at least `size` elements: page faults on fresh
    multi-MB buffers for every chunk would cost as much as the scan itself."""
    key = f"{name}_{np.dtype(dtype).name}"
    buffer: np.ndarray | None = getattr(_THREAD, key, None)
    if buffer is None or buffer.size < size:
        buffer = np.empty(max(size, CHUNK_ELEMENTS), dtype=dtype)
        setattr(_THREAD, key, buffer)
    return buffer


@dataclass(frozen=True)
class _Changes:
    """Where a chunk changed: `count` chunk-relative positions with their old and new
    bits (views of this thread's scratch buffers, valid until its next chunk)."""

    count: int
    positions: np.ndarray
    old_bits: np.ndarray
    new_bits: np.ndarray


def _find_changes(old: np.ndarray, new: np.ndarray, start: int, stop: int) -> _Changes:
    """The changes of `old[start:stop]` to `new[start:stop]`, in one pass over both."""
    count = stop - start
    itemsize = old.dtype.itemsize
    positions = _scratch("positions", count, np.int32)
    old_bits = _scratch("old_bits", count, old.dtype.type)
    new_bits = _scratch("new_bits", count, old.dtype.type)
    lanes = 8 // itemsize
    whole = count // lanes * lanes
    old_words, new_words = old[start : start + whole], new[start : start + whole]
    m = 0
    scanned = start
    if whole and old_words.ctypes.data % 8 == 0 and new_words.ctypes.data % 8 == 0:
        words = old_words.view(np.uint64), new_words.view(np.uint64)
        m = int(kernels.find_changes_words(*words, itemsize * 8, positions, old_bits, new_bits))
        scanned = start + whole
    m = int(kernels.find_changes(old, new, scanned, stop, start, positions, old_bits, new_bits, m))
    return _Changes(m, positions, old_bits, new_bits)


def _chunk_bounds(n: int) -> list[tuple[int, int]]:
    return [(s, min(s + CHUNK_ELEMENTS, n)) for s in range(0, n, CHUNK_ELEMENTS)]


T = TypeVar("T")


def _map(func: Callable[..., T], items: list[tuple[Any, ...]]) -> list[T]:
    """`func(*item)` for every item, in parallel threads when there is more than one."""
    if len(items) <= 1:
        return [func(*item) for item in items]
    return list(_pool().map(lambda item: func(*item), items))


def _payload(new: torch.Tensor, chunks: list[_Chunk], *, summed: bool) -> Encoded:
    """One tensor's payload from its encoded chunks, in order."""
    parts: list[bytes | memoryview] = [
        pack_header(MAGIC, new),
        _COUNT.pack(CHUNK_ELEMENTS, len(chunks)),
    ]
    parts.extend(c.row() for c in chunks)
    for c in chunks:
        parts.extend(c.streams)
    total = change_sum.ChangeSum()
    for c in chunks:
        total.add(c.lanes)
    return Encoded(
        seal(parts), sum(c.changed for c in chunks), total.hexdigest() if summed else None
    )


@register_codec
class WsDelta1Codec(Codec):
    name = NAME
    description = "sparse gap-coded positions + ulp-step deltas of order-preserving keys, zstd"

    def encode(self, old: torch.Tensor, new: torch.Tensor) -> bytes:
        return self.encode_all_for_manifest([(old, new)], with_change_sum=False)[0].payload

    def encode_for_manifest(
        self, old: torch.Tensor, new: torch.Tensor, *, with_change_sum: bool = True
    ) -> Encoded:
        return self.encode_all_for_manifest([(old, new)], with_change_sum=with_change_sum)[0]

    def encode_all_for_manifest(
        self, pairs: Sequence[tuple[torch.Tensor, torch.Tensor]], *, with_change_sum: bool = True
    ) -> list[Encoded]:
        """Each payload, its chunks' change counts, and the change sum added up from the
        changes each chunk found (~4 hashes a change; none for an unchanged element).

        The chunks of all the tensors share the codec's threads in one queue: a 0.6B
        model's ~200 layer tensors are one chunk each, which one at a time would keep a
        single core busy.
        """
        checked = [check_pair(old, new) for old, new in pairs]
        summed = [with_change_sum and change_sum.fits(old.numel()) for old, _ in checked]
        arrays = [(bits(old), bits(new)) for old, new in checked]
        jobs = [(i, s, e) for i, (o, _) in enumerate(arrays) for s, e in _chunk_bounds(o.size)]
        chunks = _map(lambda i, s, e: _encode_chunk(*arrays[i], s, e, summed[i]), jobs)
        by_tensor: list[list[_Chunk]] = [[] for _ in checked]
        for (i, _, _), chunk in zip(jobs, chunks, strict=True):
            by_tensor[i].append(chunk)
        return [
            _payload(new, tensor_chunks, summed=with_sum)
            for (_, new), tensor_chunks, with_sum in zip(checked, by_tensor, summed, strict=True)
        ]

    def decode_patch(self, payload: bytes | memoryview, old: torch.Tensor) -> Patch:
        return self.decode_all([(payload, old)])[0]

    def decode_compact(self, payload: bytes | memoryview, old: torch.Tensor) -> Patch:
        """The chunk table gives the change count before anything is decoded: when
        positions + values would outweigh the tensor, every chunk decodes straight into
        a copy of the old bits (one tensor of memory, no positions at all)."""
        return self.decode_all([(payload, old)], compact=True)[0]

    def decode_all(
        self, items: Sequence[tuple[bytes | memoryview, torch.Tensor]], *, compact: bool = False
    ) -> list[Patch]:
        """Every payload's chunks share the codec's threads in one queue, as in
        `encode_all_for_manifest`: a replica's many one-chunk layer tensors would
        otherwise decode one after another on one core."""
        decodings = []
        for index, (payload, old) in enumerate(items):
            try:
                decodings.append(_Decoding(payload, old, dense_when_smaller=compact))
            except SnapshotCorruptError as e:
                raise PayloadCorruptError(index, str(e)) from e
        jobs = [(i, job) for i, d in enumerate(decodings) for job in d.jobs]

        def run(index: int, job: _ChunkJob) -> None:
            try:
                decodings[index].run(job)
            except SnapshotCorruptError as e:
                raise PayloadCorruptError(index, str(e)) from e

        _map(run, jobs)
        return [d.patch() for d in decodings]


@dataclass(frozen=True)
class _ChunkJob:
    start: int
    row: tuple[int, ...]
    streams: list[memoryview]
    at: int  # where the chunk's changes go in the patch's positions and values


class _Decoding:
    """One payload being decoded: its chunk table read and checked, its patch's memory
    allocated; `run` decodes one chunk (chunks may run in parallel threads)."""

    def __init__(
        self, payload: bytes | memoryview, old: torch.Tensor, *, dense_when_smaller: bool
    ) -> None:
        body = open_payload(payload, MAGIC, old, NAME)
        self.old_bits = bits(old.contiguous())
        self.n = n = self.old_bits.size
        self.rows, offset = _read_table(body, n)
        self.total = total = sum(r[2] for r in self.rows)
        self.jobs: list[_ChunkJob] = []
        out_offset = 0
        for index, row in enumerate(self.rows):
            streams = []
            for length in row[3:]:
                streams.append(body[offset : offset + length])
                offset += length
            self.jobs.append(_ChunkJob(index * CHUNK_ELEMENTS, row, streams, out_offset))
            out_offset += row[2]
        if offset != len(body):
            raise corrupt(NAME, f"{len(body) - offset} trailing bytes after the last chunk")
        self.dense: np.ndarray | None = None
        itemsize, nbytes = self.old_bits.itemsize, self.old_bits.nbytes
        if dense_when_smaller and sparse_bytes(total, itemsize) > nbytes:
            self.dense = self.old_bits.copy()
        else:
            self.positions = np.empty(total, dtype=np.int64)
            self.values = np.empty(total, dtype=uint_dtype(old))

    def run(self, job: _ChunkJob) -> None:
        if self.dense is not None:
            _decode_chunk_into(self.dense, job.start, job.row, job.streams)
            return
        _decode_chunk(
            self.old_bits,
            start=job.start,
            stop=min(job.start + CHUNK_ELEMENTS, self.n),
            row=job.row,
            streams=job.streams,
            positions=self.positions,
            values=self.values,
            at=job.at,
        )

    def patch(self) -> Patch:
        if self.dense is not None:
            return Patch(None, self.dense)
        if self.total == self.n and all(r[0] == MODE_DENSE for r in self.rows):
            return Patch(None, self.values)
        return Patch(self.positions, self.values)


def _read_table(body: memoryview, n: int) -> tuple[list[tuple[int, ...]], int]:
    if len(body) < _COUNT.size:
        raise corrupt(NAME, "missing chunk count")
    chunk_elements, num_chunks = _COUNT.unpack_from(body)
    if chunk_elements != CHUNK_ELEMENTS or num_chunks != len(_chunk_bounds(n)):
        raise corrupt(NAME, f"chunking {num_chunks}x{chunk_elements} does not fit {n} elements")
    offset = _COUNT.size
    if len(body) < offset + num_chunks * _ROW.size:
        raise corrupt(NAME, "truncated chunk table")
    rows = [_ROW.unpack_from(body, offset + i * _ROW.size) for i in range(num_chunks)]
    offset += num_chunks * _ROW.size
    for i, (mode, k, m, *_) in enumerate(rows):
        count = min(CHUNK_ELEMENTS, n - i * CHUNK_ELEMENTS)
        if (
            mode not in (MODE_UNCHANGED, MODE_SPARSE, MODE_DENSE)
            or m > count
            or k > CHUNK_ELEMENTS.bit_length()
        ):
            raise corrupt(NAME, f"chunk {i} header (mode {mode}, {m} changes, k {k})")
    if offset + sum(sum(r[3:]) for r in rows) != len(body):
        raise corrupt(NAME, "chunk lengths do not add up to the payload size")
    return rows, offset


def _decode_chunk_into(
    dense: np.ndarray, start: int, row: tuple[int, ...], streams: list[memoryview]
) -> None:
    """Decode one chunk over its old bits in `dense` (a copy of the old tensor's bits)."""
    stop = min(start + CHUNK_ELEMENTS, dense.size)
    mode, k, m = row[0], row[1], row[2]
    count = stop - start
    if mode == MODE_UNCHANGED:
        _check_unchanged(start, m, streams)
        return
    if mode == MODE_DENSE:
        _check_dense(start, m, count, dense.dtype.itemsize, streams)
        dense[start:stop] = np.frombuffer(streams[0], dtype=dense.dtype)
        return
    sym, low, big = _sparse_streams(start, count, m, k, streams)
    width = dense.dtype.itemsize * 8
    status = kernels.decode_sparse_in_place(sym, low, big, dense, start, count, m, k, width)
    if status != kernels.OK:
        raise corrupt(NAME, f"chunk at element {start}: stream error {status}")


def _check_unchanged(start: int, m: int, streams: list[memoryview]) -> None:
    if m != 0 or any(len(s) for s in streams):
        raise corrupt(NAME, f"unchanged chunk at element {start} carries data")


def _check_dense(start: int, m: int, count: int, itemsize: int, streams: list[memoryview]) -> None:
    if m != count or len(streams[0]) != count * itemsize:
        raise corrupt(NAME, f"dense chunk at element {start} has the wrong size")


def _sparse_streams(
    start: int, count: int, m: int, k: int, streams: list[memoryview]
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A sparse chunk's symbol, low-bit and magnitude streams, decompressed within the
    bounds its row sets: a frame claiming more is refused unread."""
    where = f"{NAME} chunk at element {start}"
    sym = np.frombuffer(
        decompress_zstd_capped(
            streams[0], _symbol_capacity(count, m, k), what=f"{where}: symbol stream"
        ),
        dtype=np.uint8,
    )
    big = (
        np.frombuffer(
            decompress_zstd_capped(
                streams[2], m * kernels.MAX_VARINT_BYTES, what=f"{where}: magnitude stream"
            ),
            dtype=np.uint8,
        )
        if len(streams[2])
        else np.empty(0, dtype=np.uint8)
    )
    return sym, np.frombuffer(streams[1], dtype=np.uint8), big


def _decode_chunk(
    old: np.ndarray,
    *,
    start: int,
    stop: int,
    row: tuple[int, ...],
    streams: list[memoryview],
    positions: np.ndarray,
    values: np.ndarray,
    at: int,
) -> None:
    mode, k, m = row[0], row[1], row[2]
    count = stop - start
    if mode == MODE_UNCHANGED:
        _check_unchanged(start, m, streams)
        return
    if mode == MODE_DENSE:
        _check_dense(start, m, count, old.dtype.itemsize, streams)
        positions[at : at + m] = np.arange(start, stop, dtype=np.int64)
        values[at : at + m] = np.frombuffer(streams[0], dtype=old.dtype)
        return
    sym, low, big = _sparse_streams(start, count, m, k, streams)
    width = old.dtype.itemsize * 8
    status = kernels.decode_sparse(
        sym, low, big, old, start, count, m, k, width, positions, values, at
    )
    if status != kernels.OK:
        raise corrupt(NAME, f"chunk at element {start}: stream error {status}")
