"""Writing snapshots: base (HF layout), delta (encoded diffs), LoRA (PEFT adapter).

Every file goes through `Storage.write_bytes` (atomic per file) and the manifest
is written last: until it exists the directory is not a snapshot, so a crash or
error mid-write leaves nothing a reader would use. On failure the partial
directory is removed (best effort) and the error re-raised.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import pathlib
import threading
from collections import deque
from collections.abc import Iterator, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from datetime import UTC, datetime
from typing import Any

import torch

from weightsync.codec import (
    DEFAULT_CHECKSUM,
    DEFAULT_CODEC,
    canonical_checksum_name,
    change_sum,
    checksum_bytes,
    checksum_tensor,
    get_codec,
    list_codecs,
)
from weightsync.codec.arc import fireworks_checksum
from weightsync.codec.bits import bits, dtype_name
from weightsync.errors import (
    ChainError,
    InvalidInputError,
    SnapshotCorruptError,
    StorageError,
    StorageFileNotFoundError,
    UnknownChecksumError,
    UnknownCodecError,
    UnsupportedDtypeError,
    UnsupportedOperationError,
)
from weightsync.identity import validate_identity
from weightsync.snapshot.delta_shard import encode_delta_shard
from weightsync.snapshot.fireworks_layout import encode_shard
from weightsync.snapshot.layout import (
    ADAPTER_CONFIG_FILE,
    ADAPTER_WEIGHTS_FILE,
    CONFIG_FILE,
    INDEX_FILE,
    SPEC_FILE,
    index_doc,
    is_tokenizer_file,
    json_bytes,
    shard_plan,
    spec_doc,
)
from weightsync.snapshot.manifest import (
    MANIFEST_FILE,
    FileEntry,
    Manifest,
    SnapshotKind,
    TensorEntry,
    format_version_for,
)
from weightsync.snapshot.safetensors_file import encode_safetensors, raw_tensor
from weightsync.storage import Storage, open_storage

logger = logging.getLogger(__name__)

# Base and LoRA shards carry the metadata `transformers` and PEFT expect.
_PT_METADATA = {"format": "pt"}

#: Weight files of a base written at once: each write's flush to disk (fsync) overlaps
#: the others' and the encoding of the next file (0.6B shape on one local disk: base
#: save 1.7x -> ~1.2x `torch.save` + fsync, `benchmarks/trainer_save_bench.py`).
_WEIGHT_FILE_WRITERS = 4

#: Encoded bytes a base save holds beside the model while its files are written (one
#: file larger than this is still written, alone).
_WRITE_AHEAD_BYTES = 1 << 30


def write_base(
    storage: Storage | str | os.PathLike[str],
    identity: str,
    tensors: Mapping[str, torch.Tensor],
    *,
    config: Mapping[str, Any] | Any,
    checksum_format: str = DEFAULT_CHECKSUM,
    tokenizer_dir: str | os.PathLike[str] | None = None,
    session_id: str | None = None,
    created_at: str | None = None,
) -> Manifest:
    """Write a self-contained base snapshot (HF layout, one layer per shard) and return it.

    `tensors` are HF state-dict names with tied duplicates removed; `config` is a
    `transformers` config or a plain dict written as `config.json`.
    """
    store = open_storage(storage)
    with _new_snapshot(store, identity, checksum_format) as out:
        prepared = _prepare_all(tensors, identity)
        out.put(CONFIG_FILE, _config_bytes(config))
        _put_weight_files(out, prepared)
        if tokenizer_dir is not None:
            _put_tokenizer_files(out, pathlib.Path(tokenizer_dir))
        full_bytes = _nbytes(prepared)
        stats = {
            "num_tensors": len(prepared),
            "num_elements": sum(t.numel() for t in prepared.values()),
            "num_changed": sum(t.numel() for t in prepared.values()),
            "payload_bytes": out.weight_bytes,
            "full_bytes": full_bytes,
        }
        return out.publish(
            kind="base",
            parent=None,
            base=identity,
            compression_format=None,
            tensors={
                name: _entry(t, out.weight_map[name], out.checksum_format)
                for name, t in prepared.items()
            },
            session_id=session_id,
            created_at=created_at,
            stats=stats,
        )


def write_delta(
    storage: Storage | str | os.PathLike[str],
    identity: str,
    *,
    parent: Manifest,
    old: Mapping[str, torch.Tensor],
    new: Mapping[str, torch.Tensor],
    compression_format: str = DEFAULT_CODEC,
    checksum_format: str = DEFAULT_CHECKSUM,
    session_id: str | None = None,
    created_at: str | None = None,
    change_sums: bool = True,
    verify_old: bool = True,
) -> Manifest:
    """Write `new` as a delta against `old` (the weights `parent` stands for) and return it.

    `parent` must be stored in the same storage; its config, index and spec are
    copied. `old` must match the parent's checksums and `new` its names, shapes
    and dtypes, else `ChainError`. With `compression_format="arc_v1"|"arc_v2"`
    the shards are Fireworks delta shards (FORMAT.md §8.2: per-tensor adler32 in
    their metadata, decodable by fireworks-delta-compression); a read-only format
    (`arc_v3`) raises `UnsupportedOperationError` before anything is written.

    A codec that adds up change sums while encoding (`wsdelta1`) writes them unless
    `change_sums=False` or the checksum is cryptographic (FORMAT.md §4.2); the
    manifest is then format version 3, which readers before it refuse.

    `verify_old=False` skips hashing `old` against the parent's checksums, for a
    caller that holds `old` as the very buffers the parent was written (and
    checksummed) from, untouched since: a `TrainingClient`'s kept image (one pass
    over the model less per save). An `old` that is not the parent then yields a
    delta that every replica refuses, as its patched tensors fail the checksums.
    """
    store = open_storage(storage)
    validate_identity(identity)
    try:
        codec = get_codec(compression_format)
    except UnknownCodecError as e:
        raise UnknownCodecError(f"cannot write delta {identity!r}: {e}") from e
    if codec.read_only:
        raise UnsupportedOperationError(
            f"cannot write delta {identity!r} as {codec.name}: weightsync reads that format "
            f"but does not write it; write {', '.join(list_codecs())} instead"
        )
    if parent.kind == "lora":
        raise ChainError(
            f"cannot write delta {identity!r} onto LoRA snapshot {parent.identity!r}; "
            "LoRA adapters are always standalone"
        )
    new_t = _prepare_all(new, identity)
    _check_against_parent(identity, parent, new_t, what="new weights")
    old_t = _prepare_all({name: old[name] for name in new_t if name in old}, identity)
    _check_against_parent(identity, parent, old_t, what="old weights")
    if verify_old:
        _check_old_is_parent(identity, parent, old_t)
    side_files = _read_parent_side_files(store, parent, identity)

    with (
        _new_snapshot(store, identity, checksum_format) as out,
        ThreadPoolExecutor(_WEIGHT_FILE_WRITERS, thread_name_prefix="snapshot-write") as pool,
    ):
        # The new tensors' checksums (a pass over the model at memory speed) are taken
        # while the codec's threads encode (compute-bound) rather than after them.
        checksums = pool.submit(
            lambda: {name: checksum_tensor(out.checksum_format, t) for name, t in new_t.items()}
        )
        for name, data in side_files.items():
            out.put(name, data)
        payloads: dict[str, dict[str, bytes]] = {}
        changed: dict[str, int] = {}
        sums: dict[str, str | None] = {}
        with_sums = change_sums and change_sum.carried_with(out.checksum_format)
        names = sorted(new_t)
        pairs = [(old_t[name], new_t[name]) for name in names]
        for name, encoded in zip(
            names, codec.encode_all_for_manifest(pairs, with_change_sum=with_sums), strict=True
        ):
            changed[name] = encoded.num_changed
            sums[name] = encoded.change_sum
            payloads.setdefault(parent.tensors[name].file, {})[name] = encoded.payload
        writes = []  # each file's flush to disk overlaps the others'
        for file in sorted(payloads):
            if codec.shard_layout == "fireworks":
                # fireworks-delta-compression's layout: it decodes these shards in place.
                adler = {n: fireworks_checksum(bits(new_t[n])) for n in payloads[file]}
                shard = encode_shard(payloads[file], adler)
            else:
                shard = encode_delta_shard(payloads[file], compression_format=codec.name)
            writes.append(pool.submit(out.put, file, shard, weights=True))
        for write in writes:
            write.result()
        tensors = {
            name: TensorEntry(
                shape=tuple(t.shape),
                dtype=dtype_name(t.dtype),
                file=parent.tensors[name].file,
                checksum=checksums.result()[name],
                num_changed=changed[name],
                change_sum=sums[name],
            )
            for name, t in new_t.items()
        }
        stats = {
            "num_tensors": len(new_t),
            "num_changed_tensors": sum(1 for n in changed.values() if n),
            "num_elements": sum(t.numel() for t in new_t.values()),
            "num_changed": sum(changed.values()),
            "payload_bytes": out.weight_bytes,
            "full_bytes": _nbytes(new_t),
        }
        return out.publish(
            kind="delta",
            parent=parent.identity,
            base=parent.base,
            compression_format=codec.name,
            tensors=tensors,
            session_id=session_id,
            created_at=created_at,
            stats=stats,
        )


def write_lora(
    storage: Storage | str | os.PathLike[str],
    identity: str,
    *,
    adapter_tensors: Mapping[str, torch.Tensor],
    adapter_config: Mapping[str, Any],
    checksum_format: str = DEFAULT_CHECKSUM,
    session_id: str | None = None,
    created_at: str | None = None,
) -> Manifest:
    """Write a standalone PEFT adapter snapshot: adapter config, adapter weights, manifest."""
    store = open_storage(storage)
    with _new_snapshot(store, identity, checksum_format) as out:
        prepared = _prepare_all(adapter_tensors, identity)
        out.put(ADAPTER_CONFIG_FILE, _config_bytes(adapter_config))
        out.put(ADAPTER_WEIGHTS_FILE, _encode_torch(prepared), weights=True)
        return out.publish(
            kind="lora",
            parent=None,
            base=None,
            compression_format=None,
            tensors={
                name: _entry(t, ADAPTER_WEIGHTS_FILE, out.checksum_format)
                for name, t in prepared.items()
            },
            session_id=session_id,
            created_at=created_at,
            stats={
                "num_tensors": len(prepared),
                "num_elements": sum(t.numel() for t in prepared.values()),
                "num_changed": sum(t.numel() for t in prepared.values()),
                "payload_bytes": out.weight_bytes,
                "full_bytes": _nbytes(prepared),
            },
        )


def write_hf_files(
    storage: Storage,
    prefix: str,
    tensors: Mapping[str, torch.Tensor],
    *,
    config_bytes: bytes,
    extra_files: Mapping[str, bytes],
) -> None:
    """Write a plain HF directory (no manifest) under `prefix` (``""`` = the root)."""
    out = _DirWriter(storage, prefix, DEFAULT_CHECKSUM)
    out.put(CONFIG_FILE, config_bytes)
    _put_weight_files(out, _prepare_all(tensors, prefix or storage.url))
    for name, data in sorted(extra_files.items()):
        out.put(name, data)


class _DirWriter:
    """Writes the files of one snapshot directory and records their entries."""

    def __init__(self, storage: Storage, prefix: str, checksum_format: str) -> None:
        self.storage = storage
        self.prefix = prefix
        self.checksum_format = checksum_format
        self.files: dict[str, FileEntry] = {}
        self.weight_map: dict[str, str] = {}
        self.weight_bytes = 0
        self._lock = threading.Lock()  # `put` may run on several threads at once

    def put(self, name: str, data: bytes, *, weights: bool = False) -> None:
        self.storage.write_bytes(f"{self.prefix}/{name}" if self.prefix else name, data)
        entry = FileEntry(size_bytes=len(data), checksum=checksum_bytes(self.checksum_format, data))
        with self._lock:
            self.files[name] = entry
            if weights:
                self.weight_bytes += len(data)

    def publish(
        self,
        *,
        kind: SnapshotKind,
        parent: str | None,
        base: str | None,
        compression_format: str | None,
        tensors: dict[str, TensorEntry],
        session_id: str | None,
        created_at: str | None,
        stats: dict[str, Any],
    ) -> Manifest:
        manifest = Manifest(
            format_version=format_version_for(tensors),
            identity=self.prefix,
            kind=kind,
            parent=parent,
            base=base,
            compression_format=compression_format,
            checksum_format=self.checksum_format,
            tensors=tensors,
            files=dict(self.files),
            session_id=session_id,
            created_at=created_at or _now(),
            stats=stats,
        )
        # Last write: this is what makes the snapshot exist.
        self.storage.write_bytes(f"{self.prefix}/{MANIFEST_FILE}", manifest.to_json_bytes())
        logger.info("wrote %s snapshot %s (%d payload bytes)", kind, self.prefix, self.weight_bytes)
        return manifest


@contextlib.contextmanager
def _new_snapshot(storage: Storage, identity: str, checksum_format: str) -> Iterator[_DirWriter]:
    validate_identity(identity)
    try:
        checksum_format = canonical_checksum_name(checksum_format)
    except UnknownChecksumError as e:
        raise UnknownChecksumError(f"cannot write snapshot {identity!r}: {e}") from e
    if storage.exists(f"{identity}/{MANIFEST_FILE}"):
        raise InvalidInputError(
            f"snapshot {identity!r} already exists at {storage.child_url(identity)}; "
            "snapshots are immutable: choose a new name"
        )
    if storage.exists(identity):
        logger.warning("removing incomplete snapshot directory %s", storage.child_url(identity))
        _remove_quietly(storage, identity)
    try:
        yield _DirWriter(storage, identity, checksum_format)
    except BaseException:
        _remove_quietly(storage, identity)
        raise


def _remove_quietly(storage: Storage, identity: str) -> None:
    # Cleanup is best effort: without a manifest the leftovers are never read anyway.
    try:
        storage.remove(identity, recursive=True)
    except StorageFileNotFoundError:
        pass
    except StorageError as e:
        logger.warning("could not remove incomplete snapshot %s: %s", identity, e)


def _put_weight_files(out: _DirWriter, prepared: Mapping[str, torch.Tensor]) -> None:
    plan = shard_plan(list(prepared))
    out.weight_map = {name: file for file, names in plan.items() for name in names}
    out.put(
        INDEX_FILE,
        json_bytes(index_doc(out.weight_map, total_size_bytes=_nbytes(prepared))),
    )
    specs = {name: (tuple(t.shape), dtype_name(t.dtype)) for name, t in prepared.items()}
    out.put(SPEC_FILE, json_bytes(spec_doc(specs)))
    # Leaving the pool waits for every write, failed or not: none runs after this returns
    # (or after the snapshot's directory is removed on failure).
    with ThreadPoolExecutor(_WEIGHT_FILE_WRITERS, thread_name_prefix="snapshot-write") as pool:
        writing: deque[tuple[Future[None], int]] = deque()  # (write, its bytes), oldest first
        for file, names in plan.items():
            shard = {n: prepared[n] for n in names}
            size = _nbytes(shard)
            while writing and (
                len(writing) == _WEIGHT_FILE_WRITERS
                or sum(held for _, held in writing) + size > _WRITE_AHEAD_BYTES
            ):
                writing.popleft()[0].result()
            writing.append((pool.submit(out.put, file, _encode_torch(shard), weights=True), size))
        for write, _ in writing:
            write.result()


def _put_tokenizer_files(out: _DirWriter, tokenizer_dir: pathlib.Path) -> None:
    try:
        files = sorted(p for p in tokenizer_dir.iterdir() if p.is_file())
    except OSError as e:
        raise InvalidInputError(f"cannot read tokenizer directory {tokenizer_dir}: {e}") from e
    for path in files:
        if is_tokenizer_file(path.name):
            out.put(path.name, path.read_bytes())


def _read_parent_side_files(store: Storage, parent: Manifest, identity: str) -> dict[str, bytes]:
    side: dict[str, bytes] = {}
    # A plain HF parent may lack the index and spec; the config it always has.
    for name in (CONFIG_FILE, *(n for n in (INDEX_FILE, SPEC_FILE) if n in parent.files)):
        try:
            data = store.read_bytes(f"{parent.identity}/{name}")
        except StorageFileNotFoundError as e:
            raise ChainError(
                f"cannot write delta {identity!r}: its parent {parent.identity!r} is not "
                f"complete in {store.url} ({name} missing); write the parent there first"
            ) from e
        entry = parent.files.get(name)
        if entry is None or checksum_bytes(parent.checksum_format, data) != entry.checksum:
            raise SnapshotCorruptError(
                f"snapshot {parent.identity!r}: {name} does not match its manifest; "
                "the parent is corrupt, write a new base"
            )
        side[name] = data
    return side


def _check_against_parent(
    identity: str, parent: Manifest, tensors: Mapping[str, torch.Tensor], *, what: str
) -> None:
    missing = sorted(set(parent.tensors) - set(tensors))
    extra = sorted(set(tensors) - set(parent.tensors))
    if missing or extra:
        raise ChainError(
            f"cannot write delta {identity!r} onto {parent.identity!r}: the {what} lack "
            f"{missing[:5]} and add {extra[:5]}; a delta keeps its parent's tensor names "
            "(write a base instead)"
        )
    for name, t in tensors.items():
        entry = parent.tensors[name]
        shape, dtype = tuple(t.shape), dtype_name(t.dtype)
        if shape != entry.shape or dtype != entry.dtype:
            raise ChainError(
                f"cannot write delta {identity!r} onto {parent.identity!r}: tensor {name!r} "
                f"is {list(shape)} {dtype} in the {what} but {list(entry.shape)} "
                f"{entry.dtype} in the parent; a shape or dtype change needs a base"
            )


def _check_old_is_parent(identity: str, parent: Manifest, old: Mapping[str, torch.Tensor]) -> None:
    for name, t in old.items():
        if checksum_tensor(parent.checksum_format, t) != parent.tensors[name].checksum:
            raise ChainError(
                f"cannot write delta {identity!r}: the old weights of tensor {name!r} are "
                f"not what parent {parent.identity!r} stands for; encode against the "
                "parent's weights or write a base"
            )


def _prepare_all(tensors: Mapping[str, torch.Tensor], identity: str) -> dict[str, torch.Tensor]:
    if not tensors:
        raise InvalidInputError(f"snapshot {identity!r} needs at least one tensor")
    out: dict[str, torch.Tensor] = {}
    for name in sorted(tensors):
        t = tensors[name]
        if not isinstance(name, str) or not name:
            raise InvalidInputError(f"snapshot {identity!r}: tensor names must be non-empty")
        if not isinstance(t, torch.Tensor):
            raise InvalidInputError(
                f"snapshot {identity!r}: {name!r} is a {type(t).__name__}, not a tensor"
            )
        try:
            dtype_name(t.dtype)
        except UnsupportedDtypeError as e:
            raise UnsupportedDtypeError(f"snapshot {identity!r}, tensor {name!r}: {e}") from e
        out[name] = t.detach().to("cpu").contiguous()
    return out


def _encode_torch(tensors: Mapping[str, torch.Tensor]) -> bytes:
    return encode_safetensors({n: raw_tensor(t) for n, t in tensors.items()}, _PT_METADATA)


def _entry(t: torch.Tensor, file: str, checksum_format: str) -> TensorEntry:
    return TensorEntry(
        shape=tuple(t.shape),
        dtype=dtype_name(t.dtype),
        file=file,
        checksum=checksum_tensor(checksum_format, t),
    )


def _config_bytes(config: Mapping[str, Any] | Any) -> bytes:
    if isinstance(config, Mapping):
        try:
            text = json.dumps(dict(config), indent=2, sort_keys=True, default=_json_default)
        except (TypeError, ValueError) as e:
            raise InvalidInputError(f"config cannot be written as JSON: {e}") from e
        return (text + "\n").encode()
    to_json = getattr(config, "to_json_string", None)
    if to_json is None:
        raise InvalidInputError(
            f"config must be a dict or a transformers config, got {type(config).__name__}"
        )
    return str(to_json(use_diff=False)).encode()


def _json_default(value: object) -> object:
    # PEFT configs hold sets (target_modules); PEFT itself saves them as lists.
    if isinstance(value, (set, frozenset)):
        return sorted(value)
    raise TypeError(f"{type(value).__name__} is not JSON serializable")


def _nbytes(tensors: Mapping[str, torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in tensors.values())


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")
