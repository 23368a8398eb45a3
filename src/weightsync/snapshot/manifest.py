"""The manifest `weightsync.json`: what a snapshot is, and the checksums that prove it.

A manifest is parsed strictly: an unknown `format_version` (`true` is not `1`),
a missing or mistyped field (a string where an int belongs, a negative size), or
an unknown kind is a `SnapshotCorruptError` naming the snapshot and the key, so
a reader never acts on a manifest it does not fully understand. A manifest is
at most `MAX_MANIFEST_BYTES`, checked before it is read.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any, Literal, cast

from weightsync.codec import canonical_checksum_name, get_codec
from weightsync.codec.bits import SUPPORTED_DTYPES
from weightsync.errors import (
    InvalidIdentityError,
    SnapshotCorruptError,
    UnknownChecksumError,
    UnknownCodecError,
)
from weightsync.identity import validate_identity

MANIFEST_FILE = "weightsync.json"
FORMAT_VERSION = 1
#: The version of a manifest whose tensors are stored in pieces (FORMAT.md §9): a
#: reader of version 1 would take a piece for the whole tensor, so it must refuse it.
PIECES_FORMAT_VERSION = 2
#: The version of a delta manifest whose tensors carry change sums (FORMAT.md §4.2): a
#: reader of an older version would not know what it may skip because of them.
CHANGE_SUMS_FORMAT_VERSION = 3
SUPPORTED_FORMAT_VERSIONS = frozenset(
    {FORMAT_VERSION, PIECES_FORMAT_VERSION, CHANGE_SUMS_FORMAT_VERSION}
)
#: A change sum's spelling: two 64-bit lanes in hex.
CHANGE_SUM_HEX_DIGITS = 32
_LOWER_HEX = frozenset("0123456789abcdef")
#: A manifest larger than this is refused unread: ~250 bytes per tensor fits 200 000
#: tensors, far beyond any checkpoint, while a parse costs ~5x its size in memory.
MAX_MANIFEST_BYTES = 64 * 1024**2

SnapshotKind = Literal["base", "delta", "lora"]
SNAPSHOT_KINDS: tuple[SnapshotKind, ...] = ("base", "delta", "lora")


@dataclass(frozen=True, kw_only=True)
class Piece:
    """A box of a tensor stored in its own file: rows/columns `offset` .. `offset + shape`."""

    file: str
    offset: tuple[int, ...]
    shape: tuple[int, ...]

    @property
    def num_elements(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n

    def slices(self) -> tuple[slice, ...]:
        """Index of this piece in the whole tensor (`whole[piece.slices()]`)."""
        return tuple(slice(o, o + n) for o, n in zip(self.offset, self.shape, strict=True))


@dataclass(frozen=True, kw_only=True)
class TensorEntry:
    """One tensor the snapshot stands for; `checksum` is of its bits after any delta.

    With `pieces` (FORMAT.md §9, format version 2) the tensor is stored as boxes
    that tile it exactly, each in its own file; `file` is then the first piece's.
    With `change_sum` (FORMAT.md §4.2, format version 3) a replica holding the
    parent checks the patch before the swap from the changed elements alone.
    """

    shape: tuple[int, ...]
    dtype: str  # safetensors spelling: BF16, F16, F32, F8_E4M3, F8_E5M2 (lora: any)
    file: str  # the payload file that holds it (a delta: its encoded diff)
    checksum: str
    num_changed: int | None = None  # delta: elements whose bits differ from the parent
    pieces: tuple[Piece, ...] = ()
    #: delta, format version 3: the change sum from the parent (`codec/change_sum.py`)
    change_sum: str | None = None

    @property
    def num_elements(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n

    @property
    def payload_files(self) -> tuple[str, ...]:
        """Every file holding (part of) this tensor: its pieces' files, or `file`."""
        return tuple(dict.fromkeys(p.file for p in self.pieces)) if self.pieces else (self.file,)


@dataclass(frozen=True, kw_only=True)
class FileEntry:
    """One file of the snapshot directory (everything except the manifest)."""

    size_bytes: int
    checksum: str


@dataclass(frozen=True, kw_only=True)
class Manifest:
    """The parsed `weightsync.json`; see FORMAT.md for every field."""

    format_version: int
    identity: str
    kind: SnapshotKind
    parent: str | None  # delta: the identity it applies onto
    base: str | None  # the chain's base identity (itself for a base; None for lora)
    compression_format: str | None  # delta: codec name
    checksum_format: str
    tensors: dict[str, TensorEntry]
    files: dict[str, FileEntry]
    session_id: str | None
    created_at: str
    stats: dict[str, Any] = field(default_factory=dict)
    #: What the snapshot's format cannot prove, one sentence each; empty for a
    #: `weightsync.json`. Set on manifests synthesised from a Fireworks layout
    #: (`snapshot/fireworks_layout.py`); never written.
    cannot_prove: tuple[str, ...] = ()

    def to_json_bytes(self) -> bytes:
        """Canonical bytes: fixed top-level key order, names sorted, 2-space indent, LF."""
        doc: dict[str, Any] = {
            "format_version": self.format_version,
            "identity": self.identity,
            "kind": self.kind,
            "parent": self.parent,
            "base": self.base,
            "compression_format": self.compression_format,
            "checksum_format": self.checksum_format,
            "session_id": self.session_id,
            "created_at": self.created_at,
            "stats": {k: self.stats[k] for k in sorted(self.stats)},
            "files": {
                name: {"size_bytes": e.size_bytes, "checksum": e.checksum}
                for name, e in sorted(self.files.items())
            },
            "tensors": {name: _tensor_doc(e) for name, e in sorted(self.tensors.items())},
        }
        return (json.dumps(doc, indent=2, ensure_ascii=True) + "\n").encode("ascii")

    @classmethod
    def from_json_bytes(
        cls, data: bytes, *, identity: str, max_bytes: int = MAX_MANIFEST_BYTES
    ) -> Manifest:
        """Parse and validate; `identity` is the directory the manifest was read from."""
        where = f"manifest of snapshot {identity!r}"
        check_manifest_size(len(data), identity=identity, max_bytes=max_bytes)
        try:
            doc = json.loads(data)
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise SnapshotCorruptError(f"{where} is not valid JSON: {e}") from e
        if not isinstance(doc, dict):
            raise SnapshotCorruptError(f"{where} must be a JSON object")
        return _parse(doc, identity=identity, where=where)


def check_manifest_size(size_bytes: int, *, identity: str, max_bytes: int) -> None:
    """Refuse a manifest over `max_bytes` (before reading it, when the size is known)."""
    if size_bytes > max_bytes:
        raise SnapshotCorruptError(
            f"manifest of snapshot {identity!r} ({identity}/{MANIFEST_FILE}) is {size_bytes} "
            f"bytes, over the limit of {max_bytes}; a real manifest is ~250 bytes per tensor — "
            "the snapshot is corrupt or hostile (re-save it)"
        )


def _tensor_doc(e: TensorEntry) -> dict[str, Any]:
    doc: dict[str, Any] = {
        "shape": list(e.shape),
        "dtype": e.dtype,
        "file": e.file,
        "checksum": e.checksum,
    }
    if e.num_changed is not None:
        doc["num_changed"] = e.num_changed
    if e.pieces:
        doc["pieces"] = [
            {"file": p.file, "offset": list(p.offset), "shape": list(p.shape)} for p in e.pieces
        ]
    if e.change_sum is not None:
        doc["change_sum"] = e.change_sum
    return doc


def format_version_for(tensors: dict[str, TensorEntry]) -> int:
    """The one format version a manifest of these tensors has (FORMAT.md §7).

    Pieces are version 2, change sums version 3, neither version 1; a manifest with
    both is not a format (no writer produces it): `ValueError`.
    """
    pieced = any(t.pieces for t in tensors.values())
    summed = any(t.change_sum is not None for t in tensors.values())
    if pieced and summed:
        raise ValueError("tensors stored in pieces carry no change sums (FORMAT.md §4.2)")
    if pieced:
        return PIECES_FORMAT_VERSION
    return CHANGE_SUMS_FORMAT_VERSION if summed else FORMAT_VERSION


def _parse(doc: dict[str, Any], *, identity: str, where: str) -> Manifest:
    version = doc.get("format_version")
    # `True == 1` in Python: a bool must not pass for the version number.
    if isinstance(version, bool) or version not in SUPPORTED_FORMAT_VERSIONS:
        raise SnapshotCorruptError(
            f"{where} has format_version {version!r}; this weightsync reads "
            f"{sorted(SUPPORTED_FORMAT_VERSIONS)} (upgrade weightsync to read newer snapshots)"
        )
    kind = _get(doc, "kind", str, where)
    if kind not in SNAPSHOT_KINDS:
        raise SnapshotCorruptError(f"{where} has kind {kind!r}; expected one of {SNAPSHOT_KINDS}")
    stated = _get(doc, "identity", str, where)
    if stated != identity:
        raise SnapshotCorruptError(
            f"{where} names identity {stated!r}; a snapshot must sit in the directory of its "
            "identity (was it copied or renamed?)"
        )
    parent = _get_optional(doc, "parent", str, where)
    base = _get_optional(doc, "base", str, where)
    try:
        for other in (parent, base):
            if other is not None:
                validate_identity(other)
    except InvalidIdentityError as e:
        raise SnapshotCorruptError(f"{where}: {e}") from e
    compression = _get_optional(doc, "compression_format", str, where)
    checksum_format = _get(doc, "checksum_format", str, where)
    try:
        checksum_format = canonical_checksum_name(checksum_format)
    except UnknownChecksumError as e:
        raise UnknownChecksumError(f"{where}: {e}") from e
    if kind == "delta":
        if parent is None or base is None or compression is None:
            raise SnapshotCorruptError(
                f"{where} is a delta but lacks parent, base or compression_format"
            )
        if parent == identity:
            raise SnapshotCorruptError(f"{where} names itself as its parent")
        try:
            get_codec(compression)
        except UnknownCodecError as e:
            raise UnknownCodecError(f"{where}: {e}") from e
    elif parent is not None or compression is not None:
        raise SnapshotCorruptError(f"{where} is a {kind} but names a parent or compression")
    if kind == "base" and base != identity:
        raise SnapshotCorruptError(f"{where} is a base but its base field is {base!r}")
    files = {
        name: _parse_file(entry, where=f"{where}, file {name!r}")
        for name, entry in _get_dict(doc, "files", where).items()
    }
    for name in files:
        _check_file_name(name, where)
    tensors = {
        name: _parse_tensor(entry, kind=kind, files=files, where=f"{where}, tensor {name!r}")
        for name, entry in _get_dict(doc, "tensors", where).items()
    }
    try:
        expected = format_version_for(tensors)
    except ValueError as e:
        raise SnapshotCorruptError(f"{where}: {e}") from e
    if version != expected:
        has = {
            PIECES_FORMAT_VERSION: "stores tensors in pieces",
            CHANGE_SUMS_FORMAT_VERSION: "has change sums",
            FORMAT_VERSION: "has neither pieces nor change sums",
        }[expected]
        raise SnapshotCorruptError(
            f"{where} has format_version {version} but {has} (that is version {expected})"
        )
    return Manifest(
        format_version=cast(int, version),
        identity=identity,
        kind=cast(SnapshotKind, kind),
        parent=parent,
        base=base,
        compression_format=compression,
        checksum_format=checksum_format,
        tensors=tensors,
        files=files,
        session_id=_get_optional(doc, "session_id", str, where),
        created_at=_get(doc, "created_at", str, where),
        stats=_get_dict(doc, "stats", where),
    )


def _parse_file(entry: object, *, where: str) -> FileEntry:
    if not isinstance(entry, dict):
        raise SnapshotCorruptError(f"{where} must be a JSON object, got {type(entry).__name__}")
    size = _get(entry, "size_bytes", int, where)
    if size < 0:
        raise SnapshotCorruptError(f"{where}: field 'size_bytes' is negative ({size})")
    return FileEntry(size_bytes=size, checksum=_get(entry, "checksum", str, where))


def _parse_tensor(
    entry: object, *, kind: str, files: dict[str, FileEntry], where: str
) -> TensorEntry:
    if not isinstance(entry, dict):
        raise SnapshotCorruptError(f"{where} must be a JSON object, got {type(entry).__name__}")
    shape = _get(entry, "shape", list, where)
    if not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape):
        raise SnapshotCorruptError(
            f"{where}: field 'shape' must be a list of non-negative ints, got {shape!r:.80}"
        )
    dtype = _get(entry, "dtype", str, where)
    if kind != "lora" and dtype not in SUPPORTED_DTYPES:
        raise SnapshotCorruptError(
            f"{where} has dtype {dtype!r}; supported: {', '.join(SUPPORTED_DTYPES)}"
        )
    file = _get(entry, "file", str, where)
    if file not in files:
        raise SnapshotCorruptError(f"{where} lives in {file!r}, which the manifest does not list")
    pieces = _parse_pieces(entry, tuple(shape), files=files, where=where)
    if pieces and pieces[0].file != file:
        raise SnapshotCorruptError(f"{where}: field 'file' must name its first piece's file")
    tensor = TensorEntry(
        shape=tuple(shape),
        dtype=dtype,
        file=file,
        checksum=_get(entry, "checksum", str, where),
        num_changed=_get_optional(entry, "num_changed", int, where),
        pieces=pieces,
        change_sum=_parse_change_sum(entry, kind=kind, pieced=bool(pieces), where=where),
    )
    if tensor.num_changed is not None and not 0 <= tensor.num_changed <= tensor.num_elements:
        raise SnapshotCorruptError(
            f"{where}: field 'num_changed' is {tensor.num_changed}, outside 0.."
            f"{tensor.num_elements} (the tensor's elements)"
        )
    return tensor


def _parse_change_sum(entry: dict[str, Any], *, kind: str, pieced: bool, where: str) -> str | None:
    value: str | None = _get_optional(entry, "change_sum", str, where)
    if value is None:
        return None
    if kind != "delta" or pieced:
        raise SnapshotCorruptError(
            f"{where} has a change_sum, which only a delta's unpieced tensors carry"
        )
    if len(value) != CHANGE_SUM_HEX_DIGITS or not set(value) <= _LOWER_HEX:
        raise SnapshotCorruptError(
            f"{where}: field 'change_sum' must be {CHANGE_SUM_HEX_DIGITS} lowercase hex "
            f"digits, got {value!r:.80}"
        )
    return value


def _parse_pieces(
    entry: dict[str, Any], shape: tuple[int, ...], *, files: dict[str, FileEntry], where: str
) -> tuple[Piece, ...]:
    """The pieces of a tensor, refused unless they tile `shape` exactly (no gap, no overlap)."""
    docs = _get_optional(entry, "pieces", list, where)
    if docs is None:
        return ()
    if not docs:
        raise SnapshotCorruptError(f"{where}: field 'pieces' is empty")
    pieces: list[Piece] = []
    for i, doc in enumerate(docs):
        at = f"{where}, piece {i}"
        file = _get(doc, "file", str, at)
        if file not in files:
            raise SnapshotCorruptError(f"{at} lives in {file!r}, which the manifest does not list")
        offset = _get(doc, "offset", list, at)
        size = _get(doc, "shape", list, at)
        ints = [*offset, *size]
        if (
            len(offset) != len(shape)
            or len(size) != len(shape)
            or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in ints)
            or any(o + n > d for o, n, d in zip(offset, size, shape, strict=True))
        ):
            raise SnapshotCorruptError(
                f"{at}: offset {offset!r:.80} and shape {size!r:.80} are not a box inside the "
                f"tensor's shape {list(shape)}"
            )
        pieces.append(Piece(file=file, offset=tuple(offset), shape=tuple(size)))
    for i, a in enumerate(pieces):
        for b in pieces[:i]:
            if all(
                x < y + m and y < x + n
                for x, n, y, m in zip(a.offset, a.shape, b.offset, b.shape, strict=True)
            ):
                raise SnapshotCorruptError(f"{where}: pieces in {b.file!r} and {a.file!r} overlap")
    whole = 1
    for d in shape:
        whole *= d
    if sum(p.num_elements for p in pieces) != whole:
        raise SnapshotCorruptError(f"{where}: its pieces do not cover the whole tensor")
    return tuple(pieces)


def _check_file_name(name: str, where: str) -> None:
    try:
        validate_identity(name, what="file name")
    except InvalidIdentityError as e:
        raise SnapshotCorruptError(f"{where}: {e}") from e
    if name == MANIFEST_FILE:
        raise SnapshotCorruptError(f"{where} lists itself among its files")


def _get(doc: dict[str, Any], key: str, typ: type, where: str) -> Any:
    if not isinstance(doc, dict):
        raise SnapshotCorruptError(f"{where} must be a JSON object, got {type(doc).__name__}")
    if key not in doc:
        raise SnapshotCorruptError(f"{where} lacks the field {key!r}")
    value = doc[key]
    if not isinstance(value, typ) or (typ is int and isinstance(value, bool)):
        raise SnapshotCorruptError(
            f"{where}: field {key!r} must be {typ.__name__}, got {type(value).__name__}"
        )
    return value


def _get_optional(doc: dict[str, Any], key: str, typ: type, where: str) -> Any:
    if doc.get(key) is None:
        return None
    return _get(doc, key, typ, where)


def _get_dict(doc: dict[str, Any], key: str, where: str) -> dict[str, Any]:
    return cast(dict[str, Any], _get(doc, key, dict, where))
