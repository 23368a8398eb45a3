"""`arc_v3` (read only): Fireworks' sparse mantissa codec, decoded without `pickle.loads`.

fireworks-delta-compression 0.1.0 (`backends/arc3.py`) stores, per tensor, one of:

- an envelope: `b"ARC3_ENVELOPE\\0"` + pickle `{"codec": "zstd"|"bz2", "data": bytes}`,
  `data` compressing a pickled dict that says which elements changed (`indices`,
  flat or per row, delta-coded), their new mantissa bits (`raw`/`xor`/`zigzag`
  of the old ones, maybe a 3-bit codebook), and the elements whose sign or
  exponent changed too (`exception_*`); `strategy: "none"` when nothing changed;
- a fallback: a nested safetensors file holding one `U8` tensor `tensor` (an
  `arc_v2` payload) and metadata `{"tensor": adler32, "fallback_name": "arc_v2"}`.

Its pickles hold only dicts, tuples, lists, str, int, bool, None and bytes, so
they are read with an unpickler that admits no global at all: any pickle that
names a callable or class (`os.system`, `numpy.*`, ...) is refused before it can
run, and the pickled sizes are capped by the tensor's size. Decoding yields a
sparse `Patch`; the shard metadata's Adler-32 proves the result (FORMAT.md §8).
"""

from __future__ import annotations

import bz2
import io
import json
import pickle
import pickletools
import struct
from typing import Any

import numpy as np
import torch

from weightsync.codec.arc import ARC_V2, ArcV2Codec
from weightsync.codec.base import Codec, Patch
from weightsync.codec.bits import bits, dtype_name
from weightsync.codec.framing import check_pair, decompress_zstd_capped
from weightsync.codec.registry import register_codec
from weightsync.errors import (
    ChainError,
    SnapshotCorruptError,
    UnsupportedOperationError,
)

NAME = "arc_v3"
ENVELOPE_PREFIX = b"ARC3_ENVELOPE\0"
FALLBACK_TENSOR = "tensor"
FALLBACK_NAME_KEY = "fallback_name"
# Worst case of a hostile-but-valid pickle per element (8-byte index, 8-byte mantissa,
# 8-byte exception position and value, 9 bytes of row bookkeeping), plus room for keys.
_PICKLE_BYTES_PER_ELEMENT = 41
_PICKLE_SLACK_BYTES = 64 * 1024
_MAX_FALLBACK_HEADER_BYTES = 64 * 1024
_UINTS: dict[str, type[np.unsignedinteger[Any]]] = {
    "uint8": np.uint8,
    "uint16": np.uint16,
    "uint32": np.uint32,
    "uint64": np.uint64,
}
# The torch spelling arc3 writes as the payload's dtype, for the dtypes it encodes.
_TORCH_NAMES = {
    "BF16": "torch.bfloat16",
    "F16": "torch.float16",
    "F32": "torch.float32",
    "F8_E4M3": "torch.float8_e4m3fn",
    "F8_E5M2": "torch.float8_e5m2",
}
_ARC_V2 = ArcV2Codec()
_MANTISSA_BITS = {"BF16": 7, "F16": 10, "F32": 23, "F8_E4M3": 3, "F8_E5M2": 2}


# Opcodes that call, import or build anything beyond plain data, or refer outside the
# stream. A plain-data pickle has none; they are refused before the stream is unpickled.
_FORBIDDEN_OPCODES = frozenset(
    {
        "GLOBAL",
        "STACK_GLOBAL",
        "INST",
        "OBJ",
        "REDUCE",
        "BUILD",
        "NEWOBJ",
        "NEWOBJ_EX",
        "EXT1",
        "EXT2",
        "EXT4",
        "PERSID",
        "BINPERSID",
        "NEXT_BUFFER",
        "READONLY_BUFFER",
    }
)


_MEMO_PUTS = frozenset({"PUT", "BINPUT", "LONG_BINPUT"})
_MEMO_GETS = frozenset({"GET", "BINGET", "LONG_BINGET"})


class _NoGlobalsUnpickler(pickle.Unpickler):
    """An unpickler for plain data: every global (class, function) is refused."""

    def find_class(self, module: str, name: str) -> Any:
        raise pickle.UnpicklingError(f"the pickle names {module}.{name}, which is not data")


def _check_opcodes(data: bytes | memoryview, what: str) -> None:
    """Walk the opcodes without building anything, so nothing the stream claims is allocated
    unchecked: no forbidden opcode; lengths within the bytes there; frames that end on an
    opcode boundary (else the C unpickler and this walk would parse differently); memo
    indices numbered as a pickler numbers them (the unpickler sizes its memo by them)."""
    raw = bytes(data)
    try:
        ops = list(pickletools.genops(raw))
    except (ValueError, EOFError, struct.error, KeyError, IndexError) as e:
        raise SnapshotCorruptError(f"{what} is not a valid pickle ({e})") from e
    memo, frame_end = 0, 0
    for i, (op, arg, pos) in enumerate(ops):
        at = f"{what}: pickle opcode {op.name} at byte {pos}"
        following = ops[i + 1][2] if i + 1 < len(ops) else (pos or 0) + 1
        if op.name in _FORBIDDEN_OPCODES:
            raise SnapshotCorruptError(
                f"{at} would import or call code: not a plain-data pickle; refused without "
                "running it"
            )
        if op.name == "FRAME":
            if (pos or 0) < frame_end or not isinstance(arg, int):
                raise SnapshotCorruptError(f"{at} starts inside the previous frame")
            frame_end = (following or 0) + arg
            if frame_end > len(raw):
                raise SnapshotCorruptError(f"{at} declares {arg} bytes, beyond the pickle's end")
        elif (pos or 0) < frame_end < (following or 0):
            raise SnapshotCorruptError(f"{at} runs past the end of its frame")
        if op.name == "MEMOIZE":
            memo += 1
        elif op.name in _MEMO_PUTS or op.name in _MEMO_GETS:
            limit = memo if op.name in _MEMO_PUTS else memo - 1
            if not isinstance(arg, int) or not 0 <= arg <= limit:
                raise SnapshotCorruptError(f"{at} uses memo index {arg!r} out of sequence")
            memo = max(memo, arg + 1)


def load_plain_pickle(data: bytes | memoryview, *, what: str) -> Any:
    """Unpickle plain data (containers, numbers, str, bytes); anything else is refused."""
    _check_opcodes(data, what)
    try:
        return _NoGlobalsUnpickler(io.BytesIO(data)).load()
    except (
        pickle.UnpicklingError,
        EOFError,
        ValueError,
        TypeError,
        KeyError,
        IndexError,
        AttributeError,
        struct.error,
    ) as e:
        raise SnapshotCorruptError(
            f"{what} is not a plain-data pickle ({e}); weightsync reads arc_v3 payloads only "
            "if they hold dicts, lists, numbers, strings and bytes — refused without running it"
        ) from e
    except (MemoryError, RecursionError, OverflowError) as e:
        raise SnapshotCorruptError(f"{what} is a pickle too large or deep to read ({e!r})") from e


@register_codec
class ArcV3Codec(Codec):
    name = NAME
    needs_old = True
    shard_layout = "fireworks"
    read_only = True
    description = "Fireworks arc_v3: changed positions + mantissa bits (sparse); read only"

    def encode(self, old: torch.Tensor, new: torch.Tensor) -> bytes:
        check_pair(old, new)
        raise UnsupportedOperationError(
            "arc_v3 is read only in weightsync (it decodes Fireworks' arc_v3 deltas but does not "
            "write them); write deltas with compression_format='arc_v2' or 'wsdelta1'"
        )

    def decode_patch(self, payload: bytes | memoryview, old: torch.Tensor) -> Patch:
        data = bytes(payload)
        old = old.contiguous()
        old_bits = bits(old)
        if data.startswith(ENVELOPE_PREFIX):
            return _decode_envelope(data[len(ENVELOPE_PREFIX) :], old, old_bits)
        return _decode_fallback(data, old)


def _corrupt(what: str) -> SnapshotCorruptError:
    return SnapshotCorruptError(
        f"arc_v3 payload is malformed ({what}); re-fetch or re-save the snapshot"
    )


def _decode_envelope(blob: bytes, old: torch.Tensor, old_bits: np.ndarray) -> Patch:
    envelope = load_plain_pickle(blob, what="arc_v3 envelope")
    if not isinstance(envelope, dict) or not isinstance(envelope.get("data"), bytes):
        raise _corrupt("the envelope is not {'codec', 'data'}")
    cap = _PICKLE_BYTES_PER_ELEMENT * old_bits.size + _PICKLE_SLACK_BYTES
    what = f"arc_v3 payload of a {tuple(old.shape)} tensor"
    codec = envelope.get("codec")
    if codec == "zstd":
        raw = decompress_zstd_capped(envelope["data"], cap, what=what)
    elif codec == "bz2":
        raw = _bz2_capped(envelope["data"], cap, what=what)
    else:
        raise _corrupt(f"unknown inner codec {codec!r}")
    payload = load_plain_pickle(raw, what=what)
    if not isinstance(payload, dict):
        raise _corrupt("the decoded payload is not a dict")
    _check_tensor(payload, old)
    strategy = payload.get("strategy")
    if strategy == "none":
        return Patch(np.empty(0, dtype=np.int64), np.empty(0, dtype=old_bits.dtype))
    if strategy != "mantissa_xor":
        raise _corrupt(f"unknown strategy {strategy!r}")
    return _decode_mantissa(payload, old, old_bits)


def _check_tensor(payload: dict[str, Any], old: torch.Tensor) -> None:
    shape, dtype = payload.get("shape"), payload.get("dtype")
    want = _TORCH_NAMES[dtype_name(old.dtype)]
    if not isinstance(shape, (tuple, list)) or tuple(shape) != tuple(old.shape) or dtype != want:
        raise ChainError(
            f"arc_v3 payload encodes a {shape!r} {dtype!r} tensor but the tensor to patch is "
            f"{tuple(old.shape)} {want}; apply the delta onto its parent snapshot"
        )


def _decode_mantissa(payload: dict[str, Any], old: torch.Tensor, old_bits: np.ndarray) -> Patch:
    spec_bits = _MANTISSA_BITS[dtype_name(old.dtype)]
    total_bits = old.element_size() * 8
    if _int(payload, "mantissa_bits") != spec_bits or _int(payload, "total_bits") != total_bits:
        raise _corrupt("mantissa_bits/total_bits do not match the tensor's dtype")
    changed = _indices(_dict(payload, "indices"), old_bits.size, tuple(old.shape))
    n = changed.size
    inside = n == 0 or (changed[0] >= 0 and changed[-1] < old_bits.size)
    if not inside or np.any(changed[1:] <= changed[:-1]):
        raise _corrupt("changed positions are not sorted, unique and inside the tensor")
    values = _mantissa_values(_dict(payload, "mantissa_stream"), n)
    mantissa_mask = (1 << spec_bits) - 1
    keep_mask = ((1 << total_bits) - 1) ^ mantissa_mask
    prev = old_bits[changed].astype(np.uint64)
    prev_mantissa = prev & np.uint64(mantissa_mask)
    transform = payload.get("transform")
    if transform == "raw":
        mantissa = values
    elif transform == "xor":
        mantissa = prev_mantissa ^ values
    elif transform == "zigzag":
        signed = values.astype(np.int64)
        delta = (signed >> 1) ^ -(signed & 1)
        mantissa = (prev_mantissa.astype(np.int64) + delta).astype(np.uint64)
    else:
        raise _corrupt(f"unknown mantissa transform {transform!r}")
    # Rebuilt exactly as arc3 does (out-of-range mantissas spill as they do there).
    rebuilt = ((prev & np.uint64(keep_mask)) | mantissa).astype(old_bits.dtype)
    exceptions = _delta_indices(_dict(payload, "exception_positions"), limit=n)
    if exceptions.size:
        if exceptions[-1] >= n or np.any(exceptions[1:] <= exceptions[:-1]):
            raise _corrupt("exception positions fall outside the changed elements")
        exc_dtype = _uint(payload.get("exception_dtype"))
        raw = _bytes(payload, "exception_values")
        if len(raw) != exceptions.size * np.dtype(exc_dtype).itemsize:
            raise _corrupt("exception values do not match their positions")
        rebuilt[exceptions] = np.frombuffer(raw, dtype=exc_dtype).astype(old_bits.dtype)
    return Patch(changed, rebuilt)


def _indices(meta: dict[str, Any], size: int, shape: tuple[int, ...]) -> np.ndarray:
    kind = meta.get("kind", "flat")
    if kind == "flat":
        return _delta_indices(meta, limit=size)
    if kind != "row":
        raise _corrupt(f"unknown index encoding {kind!r}")
    n_rows, row_width = _int(meta, "n_rows"), _int(meta, "row_width")
    want_rows = int(shape[0]) if len(shape) >= 2 else 1
    want_width = max(1, size // want_rows) if len(shape) >= 2 else max(1, size)
    if (n_rows, row_width) != (want_rows, want_width):
        raise _corrupt("row index layout does not match the tensor's shape")
    count_dtype = np.dtype(_uint(meta.get("count_dtype")))
    raw = memoryview(_bytes(meta, "data"))
    count_bytes = n_rows * count_dtype.itemsize
    if len(raw) < count_bytes:
        raise _corrupt("row index stream is shorter than its row counts")
    counts = np.frombuffer(raw[:count_bytes], dtype=count_dtype).astype(np.int64)
    if np.any(counts > row_width) or int(counts.sum()) > size:
        raise _corrupt("row counts exceed the tensor")
    cursor, out = count_bytes, []
    for row in np.flatnonzero(counts):
        count = int(counts[row])
        if cursor >= len(raw) or raw[cursor] not in (1, 2, 4, 8):
            raise _corrupt("row index stream ends early or has a bad item size")
        item = int(raw[cursor])
        cursor += 1
        end = cursor + count * item
        if end > len(raw):
            raise _corrupt("row index stream ends early")
        deltas = np.frombuffer(raw[cursor:end], dtype=f"<u{item}").astype(np.int64)
        cursor = end
        cols = np.cumsum(deltas)
        if cols[-1] >= row_width:
            raise _corrupt("a row index falls outside its row")
        out.append(int(row) * row_width + cols)
    if cursor != len(raw):
        raise _corrupt("trailing bytes in the row index stream")
    return np.concatenate(out) if out else np.empty(0, dtype=np.int64)


def _delta_indices(meta: dict[str, Any], *, limit: int) -> np.ndarray:
    count = _int(meta, "count")
    if count == 0:
        return np.empty(0, dtype=np.int64)
    if count > limit:
        raise _corrupt(f"{count} positions for at most {limit}")
    dtype = _uint(meta.get("dtype"))
    raw = _bytes(meta, "data")
    if len(raw) != count * np.dtype(dtype).itemsize:
        raise _corrupt("a position stream does not hold its count")
    deltas = np.frombuffer(raw, dtype=dtype)
    if deltas.max(initial=0) >= limit:
        raise _corrupt("a position step leaves the tensor")
    return np.cumsum(deltas.astype(np.int64))


def _mantissa_values(meta: dict[str, Any], count: int) -> np.ndarray:
    kind = meta.get("kind")
    if kind == "raw":
        dtype = _uint(meta.get("dtype"))
        raw = _bytes(meta, "data")
        if len(raw) != count * np.dtype(dtype).itemsize:
            raise _corrupt("mantissa values do not match the changed elements")
        return np.frombuffer(raw, dtype=dtype).astype(np.uint64)
    if kind != "codebook3":
        raise _corrupt(f"unknown mantissa encoding {kind!r}")
    if _int(meta, "count") != count:
        raise _corrupt("mantissa codebook count does not match the changed elements")
    codebook = np.frombuffer(_bytes(meta, "codebook"), dtype=np.uint8)
    packed = np.frombuffer(_bytes(meta, "codes"), dtype=np.uint8)
    if packed.size * 8 < count * 3 or codebook.size > 7:
        raise _corrupt("mantissa codebook stream is too short")
    bits3 = np.unpackbits(packed, bitorder="little")[: count * 3].reshape(count, 3)
    codes = bits3[:, 0] | (bits3[:, 1] << 1) | (bits3[:, 2] << 2)
    regular = codes != 7
    if np.any(codes[regular] >= codebook.size):
        raise _corrupt("a mantissa code is outside its codebook")
    values = np.zeros(count, dtype=np.uint8)
    values[regular] = codebook[codes[regular]]
    positions = _delta_indices(_dict(meta, "exception_positions"), limit=count)
    extra = np.frombuffer(_bytes(meta, "exception_values"), dtype=np.uint8)
    if positions.size != extra.size or (positions.size and positions[-1] >= count):
        raise _corrupt("mantissa exceptions do not match their positions")
    values[positions] = extra
    return values.astype(np.uint64)


def _decode_fallback(data: bytes, old: torch.Tensor) -> Patch:
    """A nested safetensors file with one `U8` tensor: an arc_v2 payload."""
    if len(data) < 8:
        raise _corrupt("neither an envelope nor a nested safetensors fallback")
    (header_len,) = struct.unpack_from("<Q", data)
    if header_len > min(_MAX_FALLBACK_HEADER_BYTES, len(data) - 8):
        raise _corrupt("the fallback's safetensors header length is out of range")
    try:
        header = json.loads(data[8 : 8 + header_len])
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise _corrupt(f"the fallback's safetensors header is not JSON: {e}") from e
    if not isinstance(header, dict):
        raise _corrupt("the fallback's safetensors header is not an object")
    metadata = header.pop("__metadata__", None) or {}
    fallback = metadata.get(FALLBACK_NAME_KEY, ARC_V2) if isinstance(metadata, dict) else None
    if fallback != ARC_V2:
        raise _corrupt(f"unsupported fallback codec {fallback!r}")
    entry = header.get(FALLBACK_TENSOR)
    if set(header) != {FALLBACK_TENSOR} or not isinstance(entry, dict):
        raise _corrupt(f"the fallback holds {sorted(header)} instead of one 'tensor'")
    try:
        begin, end = (int(x) for x in entry["data_offsets"])
    except (KeyError, TypeError, ValueError) as e:
        raise _corrupt("the fallback tensor has no valid data_offsets") from e
    body = memoryview(data)[8 + header_len :]
    if entry.get("dtype") != "U8" or not 0 <= begin <= end == len(body):
        raise _corrupt("the fallback tensor is not one U8 payload filling the file")
    try:
        return _ARC_V2.decode_patch(body[begin:end], old)
    except SnapshotCorruptError as e:
        raise _corrupt(f"its arc_v2 fallback: {e}") from e


def _bz2_capped(data: bytes, cap: int, *, what: str) -> bytes:
    inflater = bz2.BZ2Decompressor()
    try:
        out = inflater.decompress(data, max_length=cap + 1)
    except (OSError, ValueError) as e:
        raise SnapshotCorruptError(f"{what} is not a valid bz2 stream ({e})") from e
    if len(out) > cap:
        raise SnapshotCorruptError(
            f"{what} decompresses to more than {cap} bytes, more than any arc_v3 payload of "
            "this tensor: refused without decoding past that (corrupt or hostile); re-save it"
        )
    if not inflater.eof or inflater.unused_data:
        raise SnapshotCorruptError(f"{what} is a truncated or padded bz2 stream")
    return out


def _dict(doc: dict[str, Any], key: str) -> dict[str, Any]:
    value = doc.get(key)
    if not isinstance(value, dict):
        raise _corrupt(f"{key!r} is missing or not a dict")
    return value


def _int(doc: dict[str, Any], key: str) -> int:
    value = doc.get(key)
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise _corrupt(f"{key!r} is missing or not a non-negative int")
    return value


def _bytes(doc: dict[str, Any], key: str) -> bytes:
    value = doc.get(key)
    if not isinstance(value, bytes):
        raise _corrupt(f"{key!r} is missing or not bytes")
    return value


def _uint(name: object) -> type[np.unsignedinteger[Any]]:
    if not isinstance(name, str) or name not in _UINTS:
        raise _corrupt(f"dtype {name!r} is not one of {sorted(_UINTS)}")
    return _UINTS[name]
