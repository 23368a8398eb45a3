"""Fireworks' snapshot layouts: read without a manifest, and the delta shards they use.

Two directories Fireworks' tools write load here (FORMAT.md §8):

- a plain Hugging Face directory (`config.json` + `*.safetensors` [+ index]) is a
  **base**;
- a directory written by fireworks-delta-compression's `delta_compress_dirs` is a
  **delta**: the parent's file names, each shard a safetensors file of 1-D `U8`
  payloads (`arc_v1`/`arc_v2`/`arc_v3`) whose metadata maps every tensor to the
  decimal `zlib.adler32` of its bytes *after* decoding; the other files copied
  from the parent.

Neither has a manifest, so `SnapshotStore.read_manifest` synthesises one here
when `weightsync.json` is absent and `<root>/<identity>/` itself holds a
`config.json` and safetensors files. A synthesised manifest says, in
`cannot_prove`, what the format cannot prove. Its checksums are `adler32`: a
delta's tensor checksums are Fireworks' own; everything else (a base's tensors,
every file) is computed from the bytes when first read, which proves the replica
serves what it read and that nothing changed since, not what the trainer saved.

A Fireworks delta does not name its parent. The parent is what the hot-load
request says (`incremental_snapshot_metadata.previous_snapshot_identity`),
passed as `read_manifest(identity, parent=...)` and remembered by the store for
later reads; tensor shapes come from that parent (or `model.weight.spec.json`).
"""

from __future__ import annotations

import json
import threading
import zlib
from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from weightsync.codec import get_codec
from weightsync.codec.arc_v3 import ENVELOPE_PREFIX
from weightsync.codec.bits import SUPPORTED_DTYPES
from weightsync.errors import (
    ChainError,
    SnapshotCorruptError,
    SnapshotNotFoundError,
    StorageFileNotFoundError,
    UnsupportedDtypeError,
)
from weightsync.identity import validate_identity
from weightsync.snapshot.delta_shard import DELTA_SHARD_FORMAT
from weightsync.snapshot.layout import CONFIG_FILE, INDEX_FILE, SPEC_FILE
from weightsync.snapshot.manifest import FORMAT_VERSION, FileEntry, Manifest, TensorEntry
from weightsync.snapshot.safetensors_file import RawTensor, encode_safetensors, read_header
from weightsync.storage import Storage

CHECKSUM_FORMAT = "adler32"
#: Side files (index, spec) larger than this are corruption, not a big model.
MAX_SIDE_FILE_BYTES = 64 * 1024**2
#: Synthesised manifests kept per store (a base's costs a read of every shard).
CACHE_ENTRIES = 32

NO_FILE_CHECKSUMS = (
    "no file checksums in the directory: weightsync computed adler32 of each file when it "
    "first read it, so a later change is caught but the bytes are not proven to be the "
    "writer's"
)
NO_COMPLETION_MARK = (
    "no manifest marks the directory complete: files are checked against each other (index, "
    "parent), not against a record of what the writer meant to write"
)
BASE_NO_TENSOR_CHECKSUMS = (
    "no tensor checksums: the served weights are proven equal to the bytes read, not to "
    "what the trainer saved"
)
DELTA_PARENT_FROM_REQUEST = (
    "the directory does not name its parent: {parent!r} is what the hot-load request said"
)
DELTA_FORMAT_SNIFFED = "the directory does not name its codec: {codec} was recognised by its bytes"

_ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"


# --- delta shards -------------------------------------------------------------------


def encode_shard(payloads: Mapping[str, bytes], checksums: Mapping[str, str]) -> bytes:
    """A Fireworks delta shard: one `U8` payload per tensor, metadata tensor -> decimal adler32.

    Byte for byte what fireworks-delta-compression's `save_file` writes, except that
    the metadata keys are sorted (safetensors writes them in hash-map order).
    """
    if set(payloads) != set(checksums):
        raise ValueError("every payload needs its checksum")
    tensors = {name: RawTensor("U8", (len(p),), p) for name, p in payloads.items()}
    return encode_safetensors(tensors, dict(checksums))


@dataclass(frozen=True)
class DeltaShard:
    """A decoded Fireworks delta shard: tensor -> payload view, tensor -> decimal adler32."""

    payloads: dict[str, memoryview]
    checksums: dict[str, str]


def decode_shard(data: bytes, *, where: str) -> DeltaShard:
    """Parse a Fireworks delta shard; `SnapshotCorruptError` naming `where` if it is not one."""
    shard = _try_decode_shard(data, where=where)
    if shard is None:
        raise SnapshotCorruptError(
            f"{where} is not a Fireworks delta shard (1-D U8 payloads, metadata holding each "
            "tensor's decimal adler32); check the snapshot's compression_format"
        )
    return shard


def _try_decode_shard(data: bytes, *, where: str) -> DeltaShard | None:
    header, start = read_header(data, where)
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict) or set(metadata) != set(header) or not header:
        return None
    view = memoryview(data)[start:]
    payloads: dict[str, memoryview] = {}
    for name, info in header.items():
        try:
            begin, end = (int(x) for x in info["data_offsets"])
            dtype, shape = info["dtype"], info["shape"]
        except (KeyError, TypeError, ValueError):
            return None
        checksum = metadata[name]
        if dtype != "U8" or shape != [end - begin] or not 0 <= begin <= end <= len(view):
            return None
        if not isinstance(checksum, str) or not checksum.isdigit() or int(checksum) >= 2**32:
            return None
        payloads[name] = view[begin:end]
    return DeltaShard(payloads=payloads, checksums=dict(metadata))


def hex_checksum(decimal: str) -> str:
    """Fireworks' decimal adler32 in weightsync's spelling (8 lowercase hex digits)."""
    return f"{int(decimal):08x}"


def sniff_codec(payload: bytes | memoryview) -> str:
    """Which of arc_v1/arc_v2/arc_v3 wrote a payload, by its first bytes."""
    head = bytes(payload[:16])
    if head.startswith(ENVELOPE_PREFIX):
        return "arc_v3"
    if head.startswith(_ZSTD_MAGIC):
        return "arc_v2"
    if len(head) >= 9 and head[8:9] == b"{" and int.from_bytes(head[:8], "little") < len(payload):
        return "arc_v3"  # its nested-safetensors fallback
    if len(head) >= 2 and (head[0] & 0x0F) == 8 and (head[0] * 256 + head[1]) % 31 == 0:
        return "arc_v1"
    raise SnapshotCorruptError(
        f"payload starting {head[:8].hex()} is neither zlib (arc_v1), zstd (arc_v2) nor arc_v3"
    )


# --- synthesised manifests ------------------------------------------------------------


class FireworksLayouts:
    """Synthesised manifests of one store's Fireworks directories, and the parents it was told.

    `read_parent(identity)` is the store's own `read_manifest`, for a delta's parent.
    """

    def __init__(self, storage: Storage, read_parent: Callable[[str], Manifest]) -> None:
        self.storage = storage
        self._read_parent = read_parent
        self._lock = threading.Lock()
        self._parents: dict[str, str] = {}
        # (identity, parent) -> (directory fingerprint, manifest); least recently used first
        self._cache: OrderedDict[tuple[str, str | None], tuple[Any, Manifest]] = OrderedDict()
        self._building = threading.local()

    def manifest(self, identity: str, parent: str | None) -> Manifest | None:
        """The synthesised manifest of `<root>/<identity>/`, or None if it is no Fireworks layout.

        Raises `SnapshotNotFoundError` for a directory that looks like an incomplete
        write (weightsync's own shards, or an index naming files that are missing).
        """
        if parent is not None:
            validate_identity(parent, what="previous_snapshot_identity")
            with self._lock:
                self._parents[identity] = parent
        else:
            with self._lock:
                parent = self._parents.get(identity)
        names = self._listing(identity)
        if names is None:
            return None
        fingerprint = self._fingerprint(identity, names)
        key = (identity, parent)
        with self._lock:
            hit = self._cache.get(key)
            if hit is not None and hit[0] == fingerprint:
                self._cache.move_to_end(key)
                return hit[1]
        building: set[str] = getattr(self._building, "ids", set())
        if identity in building:
            raise ChainError(
                f"the parents named for Fireworks delta {identity!r} form a cycle; hot-load a "
                "base to start a new chain"
            )
        self._building.ids = building | {identity}
        try:
            manifest = _synthesise(self.storage, identity, names, parent, self._read_parent)
        finally:
            self._building.ids = building
        with self._lock:
            self._cache[key] = (fingerprint, manifest)
            self._cache.move_to_end(key)
            while len(self._cache) > CACHE_ENTRIES:
                self._cache.popitem(last=False)
        return manifest

    def _listing(self, identity: str) -> list[str] | None:
        try:
            names = self.storage.list_dir(identity)
        except StorageFileNotFoundError:
            return None
        if CONFIG_FILE not in names or not any(n.endswith(".safetensors") for n in names):
            return None
        return names

    def _fingerprint(self, identity: str, names: list[str]) -> tuple[tuple[str, int], ...]:
        sizes = []
        for name in names:
            try:
                sizes.append((name, self.storage.size_bytes(f"{identity}/{name}")))
            except StorageFileNotFoundError:
                continue
        return tuple(sizes)


@dataclass
class _Scan:
    """What one pass over the directory learnt; each weight file is held only while scanned."""

    files: dict[str, FileEntry] = field(default_factory=dict)
    side: dict[str, bytes] = field(default_factory=dict)  # the small JSON side files
    plain: dict[str, dict[str, TensorEntry]] = field(default_factory=dict)  # file -> tensors
    # file -> tensor -> (decimal adler32, codec recognised from the payload's first bytes)
    delta: dict[str, dict[str, tuple[str, str]]] = field(default_factory=dict)
    weightsync_shards: bool = False


_SIDE_FILES = (CONFIG_FILE, INDEX_FILE, SPEC_FILE)


def _synthesise(
    storage: Storage,
    identity: str,
    names: list[str],
    parent: str | None,
    read_parent: Callable[[str], Manifest],
) -> Manifest:
    where = f"snapshot {identity!r} (a directory without weightsync.json)"
    scan = _Scan()
    for name in (n for n in _SIDE_FILES if n in names):
        path = f"{identity}/{name}"
        size = storage.size_bytes(path)
        if size > MAX_SIDE_FILE_BYTES:
            raise SnapshotCorruptError(
                f"{where}: {name} has {size} bytes, over the {MAX_SIDE_FILE_BYTES}-byte cap"
            )
        data = _read_file(storage, path)
        if data is not None:
            scan.files[name] = FileEntry(size_bytes=len(data), checksum=_adler32_hex(data))
            scan.side[name] = data
    indexed = _index_shards(scan.side, where)  # the shards to read, if there is an index
    for name in names:
        if name in _SIDE_FILES:
            continue
        weights = name.endswith(".safetensors")
        if weights and indexed is not None and name not in indexed:
            continue
        # One file at a time: a base is checksummed without holding the whole model.
        data = _read_file(storage, f"{identity}/{name}")
        if data is None:
            continue
        scan.files[name] = FileEntry(size_bytes=len(data), checksum=_adler32_hex(data))
        if weights:
            _scan_shard(scan, name, data, f"{where}, file {name!r}")
        del data
    missing = sorted((indexed or set()) - set(scan.files))
    if missing:
        raise _incomplete(storage, identity, f"its index names missing files {missing[:5]}")
    if scan.weightsync_shards:
        raise _incomplete(storage, identity, "it holds weightsync delta shards")
    if scan.plain and scan.delta:
        raise SnapshotCorruptError(
            f"{where} mixes Fireworks delta shards and plain weight shards; re-save it"
        )
    if scan.delta:
        return _delta_manifest(identity, scan, parent=parent, read_parent=read_parent, where=where)
    return _base_manifest(identity, scan, where)


def _index_shards(side: dict[str, bytes], where: str) -> set[str] | None:
    index = _side_json(side, INDEX_FILE, where)
    if index is None:
        return None
    weight_map = index.get("weight_map")
    if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
        raise SnapshotCorruptError(f"{where}: {INDEX_FILE} has no valid weight_map")
    return set(weight_map.values())


def _read_file(storage: Storage, path: str) -> bytes | None:
    local = storage.local_path(path)
    if local is not None and local.is_dir():
        return None
    try:
        return storage.read_bytes(path)
    except StorageFileNotFoundError:
        return None  # an object-store "directory" (a prefix), not a file


def _adler32_hex(data: bytes | memoryview) -> str:
    return f"{zlib.adler32(data) & 0xFFFFFFFF:08x}"


def _scan_shard(scan: _Scan, file: str, data: bytes, where: str) -> None:
    header, start = read_header(data, where)
    metadata = header.get("__metadata__") or {}
    if isinstance(metadata, dict) and metadata.get("format") == DELTA_SHARD_FORMAT:
        scan.weightsync_shards = True
        return
    shard = _try_decode_shard(data, where=where)
    if shard is not None:
        found: dict[str, tuple[str, str]] = {}
        for name, payload in shard.payloads.items():
            try:
                found[name] = (shard.checksums[name], sniff_codec(payload))
            except SnapshotCorruptError as e:
                raise SnapshotCorruptError(f"{where}, tensor {name!r}: {e}") from e
        scan.delta[file] = found
        return
    view = memoryview(data)[start:]
    tensors: dict[str, TensorEntry] = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        at = f"{where}, tensor {name!r}"
        try:
            dtype, shape = str(info["dtype"]), tuple(int(d) for d in info["shape"])
            begin, end = (int(x) for x in info["data_offsets"])
        except (KeyError, TypeError, ValueError) as e:
            raise SnapshotCorruptError(f"{at} has a malformed header entry") from e
        if dtype not in SUPPORTED_DTYPES:
            raise UnsupportedDtypeError(
                f"{at} is {dtype}; weightsync serves {', '.join(SUPPORTED_DTYPES)}"
            )
        if not 0 <= begin <= end <= len(view):
            raise SnapshotCorruptError(f"{at} lies outside the file (truncated?)")
        tensors[name] = TensorEntry(
            shape=shape, dtype=dtype, file=file, checksum=_adler32_hex(view[begin:end])
        )
    if tensors:
        scan.plain[file] = tensors


def _base_manifest(identity: str, scan: _Scan, where: str) -> Manifest:
    tensors: dict[str, TensorEntry] = {}
    for file in sorted(scan.plain):
        for name, entry in scan.plain[file].items():
            if name in tensors:
                raise SnapshotCorruptError(
                    f"{where}: tensor {name!r} is in {tensors[name].file!r} and {file!r}"
                )
            tensors[name] = entry
    if not tensors:
        raise SnapshotCorruptError(f"{where} holds no tensors")
    return Manifest(
        format_version=FORMAT_VERSION,
        identity=identity,
        kind="base",
        parent=None,
        base=identity,
        compression_format=None,
        checksum_format=CHECKSUM_FORMAT,
        tensors=tensors,
        files=scan.files,
        session_id=None,
        created_at="",
        stats={
            "layout": "fireworks-hf-base",
            "num_tensors": len(tensors),
            "num_elements": sum(e.num_elements for e in tensors.values()),
            "payload_bytes": sum(scan.files[f].size_bytes for f in scan.plain),
        },
        cannot_prove=(BASE_NO_TENSOR_CHECKSUMS, NO_FILE_CHECKSUMS, NO_COMPLETION_MARK),
    )


def _delta_manifest(
    identity: str,
    scan: _Scan,
    *,
    parent: str | None,
    read_parent: Callable[[str], Manifest],
    where: str,
) -> Manifest:
    located: dict[str, tuple[str, str]] = {}  # tensor -> (file, decimal adler32)
    codecs: set[str] = set()
    for file in sorted(scan.delta):
        for name, (decimal, codec_name) in scan.delta[file].items():
            if name in located:
                raise SnapshotCorruptError(f"{where}: tensor {name!r} is in two shards")
            located[name] = (file, decimal)
            codecs.add(codec_name)
    if len(codecs) != 1:
        raise SnapshotCorruptError(f"{where} mixes payloads of {sorted(codecs)}; re-save it")
    codec = get_codec(codecs.pop()).name
    specs, base = _specs(
        identity, scan.side, set(located), parent=parent, read_parent=read_parent, where=where
    )
    tensors = {
        name: TensorEntry(
            shape=specs[name][0],
            dtype=specs[name][1],
            file=file,
            checksum=hex_checksum(decimal),
        )
        for name, (file, decimal) in located.items()
    }
    parent_note = (
        DELTA_PARENT_FROM_REQUEST.format(parent=parent)
        if parent is not None
        else "the directory does not name its parent, and no hot-load request named one"
    )
    return Manifest(
        format_version=FORMAT_VERSION,
        identity=identity,
        kind="delta",
        parent=parent,
        base=base,
        compression_format=codec,
        checksum_format=CHECKSUM_FORMAT,
        tensors=tensors,
        files=scan.files,
        session_id=None,
        created_at="",
        stats={
            "layout": "fireworks-delta",
            "num_tensors": len(tensors),
            "num_elements": sum(e.num_elements for e in tensors.values()),
            "payload_bytes": sum(scan.files[f].size_bytes for f in scan.delta),
            "full_bytes": sum(
                e.num_elements * SUPPORTED_DTYPES[e.dtype].itemsize for e in tensors.values()
            ),
        },
        cannot_prove=(
            parent_note,
            DELTA_FORMAT_SNIFFED.format(codec=codec),
            NO_FILE_CHECKSUMS,
            NO_COMPLETION_MARK,
        ),
    )


def _specs(
    identity: str,
    files: dict[str, bytes],
    names: set[str],
    *,
    parent: str | None,
    read_parent: Callable[[str], Manifest],
    where: str,
) -> tuple[dict[str, tuple[tuple[int, ...], str]], str | None]:
    """Shape and dtype of every tensor (from the parent, else the spec file), and the base."""
    if parent is not None:
        try:
            parent_manifest = read_parent(parent)
        except SnapshotNotFoundError as e:
            raise ChainError(
                f"Fireworks delta {identity!r} applies onto {parent!r}, which is not in the "
                f"storage: {e}"
            ) from e
        missing = sorted(names - set(parent_manifest.tensors))
        if missing:
            raise ChainError(
                f"Fireworks delta {identity!r} patches tensors {missing[:5]} that its parent "
                f"{parent!r} lacks; hot-load it onto the snapshot it was made from"
            )
        entries = parent_manifest.tensors
        specs = {n: (entries[n].shape, entries[n].dtype) for n in names}
        return specs, parent_manifest.base
    spec = _side_json(files, SPEC_FILE, where)
    tensor_map = spec.get("tensor_map") if spec is not None else None
    if not isinstance(tensor_map, dict):
        raise ChainError(
            f"Fireworks delta {identity!r} names neither its parent nor its tensors' shapes "
            f"(no {SPEC_FILE}); hot-load it with incremental_snapshot_metadata."
            "previous_snapshot_identity, or inspect it with --parent"
        )
    specs = {}
    for name in names:
        entry: Any = tensor_map.get(name)
        try:
            shape = tuple(int(d) for d in entry["shape"])
            dtype = str(entry["dtype"])
        except (KeyError, TypeError, ValueError) as e:
            raise SnapshotCorruptError(
                f"{where}: {SPEC_FILE} has no valid entry for {name!r}"
            ) from e
        if dtype not in SUPPORTED_DTYPES:
            raise UnsupportedDtypeError(f"{where}: tensor {name!r} is {dtype}")
        specs[name] = (shape, dtype)
    return specs, None


def _side_json(files: dict[str, bytes], name: str, where: str) -> dict[str, Any] | None:
    data = files.get(name)  # its size was checked against MAX_SIDE_FILE_BYTES before reading
    if data is None:
        return None
    try:
        doc = json.loads(data)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise SnapshotCorruptError(f"{where}: {name} is not JSON: {e}") from e
    if not isinstance(doc, dict):
        raise SnapshotCorruptError(f"{where}: {name} is not a JSON object")
    return doc


def _incomplete(storage: Storage, identity: str, why: str) -> SnapshotNotFoundError:
    return SnapshotNotFoundError(
        f"no snapshot {identity!r} in {storage.url}: its directory has no manifest (an "
        f"incomplete or failed write; not a snapshot) and is no complete Fireworks layout "
        f"({why}); list the snapshots with `weightsync snapshot list`"
    )
