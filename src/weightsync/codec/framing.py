"""The envelope shared by weightsync's delta codecs: header, shape check, checksum trailer.

Every payload is `magic(4) version(1) dtype(1) ndim(1) dims(8*ndim) body
xxh3_64(8)`, little-endian. The trailer covers every byte before it, so a
flipped or truncated payload is caught before a single element is decoded
(`SnapshotCorruptError`), and a payload decoded against a tensor of another
shape or dtype is refused (`ChainError`) instead of yielding a wrong tensor.

Compressed streams inside a payload are decompressed only through
`decompress_zstd_capped` / `decompress_zlib_capped`: the output is bounded by
what the manifest says the tensor holds, never by the size a frame declares,
so a 65 KB frame that claims 2 GiB is refused after at most the cap is written.
"""

from __future__ import annotations

import struct
import zlib

import numpy as np
import torch
import xxhash
import zstandard

from weightsync.codec.bits import dtype_name
from weightsync.errors import ChainError, InvalidInputError, SnapshotCorruptError

FORMAT_VERSION = 1
TRAILER_BYTES = 8
# Stable on-disk codes; never renumber.
DTYPE_CODES: dict[str, int] = {"BF16": 1, "F16": 2, "F32": 3, "F8_E4M3": 4, "F8_E5M2": 5}
_CODE_NAMES = {v: k for k, v in DTYPE_CODES.items()}
_FIXED = struct.Struct("<4sBBB")


def check_pair(old: torch.Tensor, new: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Validate an encode call's inputs; return them as contiguous CPU tensors."""
    if old.shape != new.shape or old.dtype != new.dtype:
        raise InvalidInputError(
            f"cannot encode a delta between {tuple(old.shape)} {old.dtype} and "
            f"{tuple(new.shape)} {new.dtype}: shape and dtype must match"
        )
    dtype_name(new.dtype)  # raises UnsupportedDtypeError with the valid choices
    if old.device.type != "cpu" or new.device.type != "cpu":
        raise InvalidInputError("codecs encode CPU tensors; move them with .cpu() first")
    return old.contiguous(), new.contiguous()


def pack_header(magic: bytes, tensor: torch.Tensor) -> bytes:
    code = DTYPE_CODES[dtype_name(tensor.dtype)]
    dims = tuple(int(d) for d in tensor.shape)
    return _FIXED.pack(magic, FORMAT_VERSION, code, len(dims)) + struct.pack(
        f"<{len(dims)}Q", *dims
    )


def seal(parts: list[bytes | memoryview]) -> bytes:
    """Join payload parts and append the xxh3_64 trailer."""
    body = b"".join(parts)
    return body + xxhash.xxh3_64_digest(body)[::-1]  # digest is big-endian; store LE


def open_payload(
    payload: bytes | memoryview, magic: bytes, old: torch.Tensor, codec: str
) -> memoryview:
    """Check trailer, magic, version, dtype and shape; return the body after the header."""
    view = memoryview(payload).cast("B")
    if len(view) < _FIXED.size + TRAILER_BYTES:
        raise SnapshotCorruptError(
            f"{codec} payload is truncated ({len(view)} bytes); re-fetch or re-save the snapshot"
        )
    content = view[:-TRAILER_BYTES]
    if xxhash.xxh3_64_digest(content)[::-1] != bytes(view[-TRAILER_BYTES:]):
        raise SnapshotCorruptError(
            f"{codec} payload checksum mismatch ({len(view)} bytes): the payload is corrupt "
            "or truncated; re-fetch or re-save the snapshot"
        )
    got_magic, version, code, ndim = _FIXED.unpack_from(content)
    if got_magic != magic:
        raise SnapshotCorruptError(
            f"payload is not a {codec} payload (magic {bytes(got_magic)!r}, expected {magic!r}); "
            "check the snapshot's compression_format"
        )
    if version != FORMAT_VERSION:
        raise SnapshotCorruptError(
            f"{codec} payload has format version {version}; this weightsync reads "
            f"{FORMAT_VERSION} — upgrade weightsync"
        )
    offset = _FIXED.size + 8 * ndim
    if len(content) < offset or code not in _CODE_NAMES:
        raise SnapshotCorruptError(f"{codec} payload header is malformed")
    dims = struct.unpack_from(f"<{ndim}Q", content, _FIXED.size)
    if dims != tuple(old.shape) or _CODE_NAMES[code] != dtype_name(old.dtype):
        raise ChainError(
            f"{codec} payload encodes a {dims} {_CODE_NAMES[code]} tensor but the tensor to "
            f"patch is {tuple(old.shape)} {dtype_name(old.dtype)}; apply the delta onto its "
            "parent snapshot"
        )
    return content[offset:]


def corrupt(codec: str, what: str) -> SnapshotCorruptError:
    return SnapshotCorruptError(
        f"{codec} payload is malformed ({what}); re-fetch or re-save the snapshot"
    )


def _bomb(what: str, max_output_bytes: int) -> SnapshotCorruptError:
    return SnapshotCorruptError(
        f"{what} decompresses to more than {max_output_bytes} bytes, the most its tensor "
        "can need: refused without decoding past that (the payload is corrupt or hostile); "
        "re-save the snapshot"
    )


def _short(what: str, got: int, expected: int) -> SnapshotCorruptError:
    return SnapshotCorruptError(
        f"{what} decompresses to {got} bytes, expected {expected} (truncated or corrupt); "
        "re-fetch or re-save the snapshot"
    )


def decompress_zstd_capped(
    data: bytes | bytearray | memoryview, max_output_bytes: int, *, what: str, exact: bool = False
) -> bytes:
    """Decompress zstd `data` (one or more frames) into at most `max_output_bytes` bytes.

    Streams: at most the cap plus one byte is ever produced, whatever size a frame
    header declares. More output than the cap, a malformed stream, or (with
    `exact=True`) less output than the cap is a `SnapshotCorruptError` naming `what`.
    A stream cut short yields fewer bytes, so callers that know the size pass `exact`.
    """
    if max_output_bytes < 0:
        raise InvalidInputError(f"max_output_bytes must be >= 0, got {max_output_bytes}")
    view = memoryview(data).cast("B")
    _check_declared_size(view, max_output_bytes, what)
    try:
        with zstandard.ZstdDecompressor().stream_reader(view, read_across_frames=True) as reader:
            out = reader.read(max_output_bytes + 1)
            while len(out) <= max_output_bytes:
                more = reader.read(max_output_bytes + 1 - len(out))
                if not more:
                    break
                out += more
    except zstandard.ZstdError as e:
        raise SnapshotCorruptError(
            f"{what} is not a valid zstd stream ({e}); re-fetch or re-save the snapshot"
        ) from e
    if len(out) > max_output_bytes:
        raise _bomb(what, max_output_bytes)
    if exact and len(out) != max_output_bytes:
        raise _short(what, len(out), max_output_bytes)
    return out


def decompress_zstd_into(
    data: bytes | bytearray | memoryview, out: np.ndarray, *, what: str
) -> None:
    """Decompress zstd `data` into `out`, which it must fill exactly (no other buffer).

    `decompress_zstd_capped(..., exact=True)` with the caller's array as the output:
    a dense codec decodes a tensor's stream without a second tensor-sized bytes
    object. More output than `out` holds is refused after at most one byte more.
    """
    target = _byte_target(out)
    view = memoryview(data).cast("B")
    _check_declared_size(view, len(target), what)
    filled = 0
    try:
        with zstandard.ZstdDecompressor().stream_reader(view, read_across_frames=True) as reader:
            while filled < len(target):
                n = reader.readinto(target[filled:])
                if not n:
                    break
                filled += n
            extra = reader.read(1)
    except zstandard.ZstdError as e:
        raise SnapshotCorruptError(
            f"{what} is not a valid zstd stream ({e}); re-fetch or re-save the snapshot"
        ) from e
    if extra:
        raise _bomb(what, len(target))
    if filled != len(target):
        raise _short(what, filled, len(target))


def decompress_zlib_into(
    data: bytes | bytearray | memoryview, out: np.ndarray, *, what: str, wbits: int = zlib.MAX_WBITS
) -> None:
    """`decompress_zstd_into` for one zlib stream (inflated piece by piece into `out`)."""
    target = _byte_target(out)
    inflater = zlib.decompressobj(wbits)
    filled = 0
    pending: bytes | bytearray | memoryview = data
    try:
        while not inflater.eof:
            room = len(target) - filled
            piece = inflater.decompress(pending, min(_INFLATE_PIECE_BYTES, room + 1))
            if len(piece) > room:
                raise _bomb(what, len(target))
            target[filled : filled + len(piece)] = piece
            filled += len(piece)
            pending = inflater.unconsumed_tail
            if not piece and not pending:
                break  # the input ended before the stream did
    except zlib.error as e:
        raise SnapshotCorruptError(
            f"{what} is not a valid zlib stream ({e}); re-fetch or re-save the snapshot"
        ) from e
    if not inflater.eof:
        raise _short(what, filled, len(target))
    if inflater.unused_data:
        raise SnapshotCorruptError(
            f"{what} has {len(inflater.unused_data)} bytes after its zlib stream; re-fetch or "
            "re-save the snapshot"
        )
    if filled != len(target):
        raise _short(what, filled, len(target))


#: Output inflated per step by `decompress_zlib_into` (bounds its scratch bytes).
_INFLATE_PIECE_BYTES = 1 << 20


def _byte_target(out: np.ndarray) -> memoryview:
    if not out.flags.c_contiguous or not out.flags.writeable:
        raise InvalidInputError("the output array must be C-contiguous and writeable")
    return out.reshape(-1).view(np.uint8).data


def _check_declared_size(view: memoryview, max_output_bytes: int, what: str) -> None:
    """Refuse, without decoding a byte, a first frame that declares more than the cap."""
    try:
        declared = zstandard.frame_content_size(view) if len(view) >= 4 else -1
    except zstandard.ZstdError as e:
        raise SnapshotCorruptError(
            f"{what} is not a zstd stream ({e}); re-fetch or re-save the snapshot"
        ) from e
    if declared > max_output_bytes:
        raise _bomb(what, max_output_bytes)


def decompress_zlib_capped(
    data: bytes | bytearray | memoryview,
    max_output_bytes: int,
    *,
    what: str,
    exact: bool = False,
    wbits: int = zlib.MAX_WBITS,
) -> bytes:
    """`decompress_zstd_capped` for one zlib (or, by `wbits`, raw deflate / gzip) stream.

    A stream that does not end, or is followed by other bytes, is refused too.
    """
    if max_output_bytes < 0:
        raise InvalidInputError(f"max_output_bytes must be >= 0, got {max_output_bytes}")
    inflater = zlib.decompressobj(wbits)
    try:
        out = inflater.decompress(data, max_output_bytes + 1)
    except zlib.error as e:
        raise SnapshotCorruptError(
            f"{what} is not a valid zlib stream ({e}); re-fetch or re-save the snapshot"
        ) from e
    if len(out) > max_output_bytes:
        raise _bomb(what, max_output_bytes)
    if not inflater.eof:
        raise _short(what, len(out), max_output_bytes) if exact else corrupt_stream(what)
    if inflater.unused_data:
        raise SnapshotCorruptError(
            f"{what} has {len(inflater.unused_data)} bytes after its zlib stream; re-fetch or "
            "re-save the snapshot"
        )
    if exact and len(out) != max_output_bytes:
        raise _short(what, len(out), max_output_bytes)
    return out


def corrupt_stream(what: str) -> SnapshotCorruptError:
    return SnapshotCorruptError(
        f"{what} ends before its compressed stream does (truncated); re-fetch or re-save the "
        "snapshot"
    )
