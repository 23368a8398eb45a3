"""Reading snapshots: listing, manifests, chains, fetching verified payloads, patches,
rebuilding (materializing) the weights a snapshot stands for and verifying a chain.

Only JSON and safetensors are ever parsed (never pickle). Every identity that
enters is validated, so no read can leave the storage root. A directory without
a manifest is not a snapshot: it is never listed and never read.
"""

from __future__ import annotations

import json
import os
import pathlib
import threading
from collections import OrderedDict
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import xxhash
from safetensors import SafetensorError
from safetensors.torch import load as load_torch

from weightsync.codec import Patch, get_codec
from weightsync.codec.base import compact
from weightsync.codec.bits import bits, dtype_name, torch_dtype
from weightsync.errors import (
    ChainError,
    InvalidIdentityError,
    PayloadCorruptError,
    SnapshotCorruptError,
    SnapshotNotFoundError,
    StorageFileNotFoundError,
    UnknownChecksumError,
    UnknownCodecError,
    UnsupportedDtypeError,
    UnsupportedOperationError,
)
from weightsync.identity import validate_identity
from weightsync.snapshot import fireworks_layout
from weightsync.snapshot.checks import (
    VerifyReport,
    verify_bits,
    verify_file,
    verify_patched_tensor,
    verify_tensors,
)
from weightsync.snapshot.delta_shard import decode_delta_shard
from weightsync.snapshot.fireworks_layout import FireworksLayouts
from weightsync.snapshot.layout import ADAPTER_CONFIG_FILE, CONFIG_FILE, TOKENIZER_MARKERS
from weightsync.snapshot.manifest import (
    MANIFEST_FILE,
    MAX_MANIFEST_BYTES,
    Manifest,
    check_manifest_size,
)
from weightsync.snapshot.safetensors_file import TensorView, tensor_views
from weightsync.storage import Storage, open_storage

# Payload files are read concurrently: object stores answer many GETs at once.
_READ_THREADS = 8
#: Parsed manifests kept per store, at most this many and this many bytes of manifest
#: (a parsed manifest takes ~5x its file's size in memory).
MANIFEST_CACHE_ENTRIES = 8
MANIFEST_CACHE_BYTES = 64 * 1024**2


@dataclass
class FetchedSnapshot:
    """A snapshot's manifest and its weight files, each already checked against the manifest."""

    manifest: Manifest
    files: dict[str, bytes]
    _payloads: dict[str, memoryview] | None = field(default=None, repr=False)
    _released: bool = field(default=False, repr=False)

    def tensors(self) -> dict[str, torch.Tensor]:
        """Base / LoRA: the tensors, each checked against its manifest checksum."""
        m = self.manifest
        if m.kind == "delta":
            raise ChainError(
                f"snapshot {m.identity!r} is a delta onto {m.parent!r}: apply its patches "
                "(or materialize it) instead of reading its tensors"
            )
        by_file: dict[str, dict[str, torch.Tensor]] = {}
        for file in _weight_files(m):
            try:
                by_file[file] = load_torch(self.files[file])
            except SafetensorError as e:
                raise SnapshotCorruptError(
                    f"snapshot {m.identity!r}, file {file!r} is not valid safetensors: {e}"
                ) from e
        expected = _names_by_file(m)
        for file, held in by_file.items():
            extra = sorted(set(held) - expected.get(file, set()))
            if extra:
                raise SnapshotCorruptError(
                    f"snapshot {m.identity!r}, file {file!r} holds tensors the manifest does "
                    f"not place there: {extra[:5]}"
                )
        loaded: dict[str, torch.Tensor] = {}
        for name, entry in m.tensors.items():
            if entry.pieces:
                loaded[name] = _assembled(m, name, by_file)
            elif name in by_file[entry.file]:
                loaded[name] = by_file[entry.file][name]
        verify_tensors(m, loaded)
        return {name: loaded[name] for name in sorted(m.tensors)}

    def tensor_bits(self) -> dict[str, np.ndarray]:
        """Base: each tensor's bits (flat unsigned integers), checked against the manifest.

        No copy: each is a view of the fetched file bytes, so the weights cost what was
        fetched and nothing more — read-only views of immutable bytes, so what was checked
        is what a caller gets. A tensor stored in pieces is assembled into its own
        array. Checked like `tensors()`: every file holds exactly the tensors the manifest
        places there, each of the manifest's dtype and shape and checksum.
        """
        m = self.manifest
        if m.kind == "delta":
            raise ChainError(
                f"snapshot {m.identity!r} is a delta onto {m.parent!r}: apply its patches "
                "(or materialize it) instead of reading its tensors"
            )
        expected = _names_by_file(m)
        by_file: dict[str, dict[str, TensorView]] = {}
        for file in _weight_files(m):
            where = f"snapshot {m.identity!r}, file {file!r}"
            held = tensor_views(self.files[file], where)
            extra = sorted(set(held) - expected.get(file, set()))
            if extra:
                raise SnapshotCorruptError(
                    f"{where} holds tensors the manifest does not place there: {extra[:5]}"
                )
            by_file[file] = held
        out: dict[str, np.ndarray] = {}
        for name in sorted(m.tensors):
            entry = m.tensors[name]
            flat = (
                _assembled_bits(m, name, by_file)
                if entry.pieces
                else _view_bits(m, name, entry.file, entry.shape, by_file)
            )
            verify_bits(m, name, dtype=entry.dtype, shape=entry.shape, data=flat)
            out[name] = flat
        return out

    def payloads(self) -> dict[str, memoryview]:
        """Delta: weight name -> codec payload (views of the fetched shard bytes)."""
        m = self.manifest
        if m.kind != "delta" or m.compression_format is None:
            raise ChainError(f"snapshot {m.identity!r} is a {m.kind}, not a delta")
        if self._released:
            raise UnsupportedOperationError(
                f"snapshot {m.identity!r}: its payloads were released as its patches were "
                "decoded (patches(release=True)); fetch it again to decode it again"
            )
        if self._payloads is None:
            payloads: dict[str, memoryview] = {}
            pieced = {n for n, e in m.tensors.items() if e.pieces}
            for file in _weight_files(m):
                shard = read_delta_shard(
                    self.files[file],
                    compression_format=m.compression_format,
                    where=f"snapshot {m.identity!r}, file {file!r}",
                )
                for name, payload in shard.items():
                    # A piece's payload is keyed by its file too: one name, several pieces.
                    payloads[_piece_key(file, name) if name in pieced else name] = payload
            wanted = {_piece_key(p.file, n) for n, e in m.tensors.items() for p in e.pieces} | {
                n for n, e in m.tensors.items() if not e.pieces
            }
            missing = sorted(wanted - set(payloads))
            if missing:
                raise SnapshotCorruptError(
                    f"snapshot {m.identity!r}: no payload for tensors {missing[:5]}"
                )
            self._payloads = payloads
        return self._payloads

    def patches(
        self,
        current: Mapping[str, torch.Tensor],
        *,
        dense_when_smaller: bool = False,
        release: bool = False,
    ) -> dict[str, Patch]:
        """Delta: one patch per tensor against `current` (read only), keyed in name order.

        A tensor missing from `current`, or of another shape or dtype, is a `ChainError`.
        `dense_when_smaller`: each patch takes whichever form holds fewer bytes — a
        patch whose positions + values would outweigh the tensor's new bits is held as
        those bits, decoded straight into them where the codec can (`Codec.decode_compact`;
        a delta that changes most elements then holds about one copy of the model, not
        five). `release`: the fetched bytes are dropped as they are used — each weight
        file as soon as every tensor it holds is decoded — so the payload and the
        patches are never both held whole; afterwards this snapshot holds no payload.
        """
        m = self.manifest
        codec = get_codec(m.compression_format or "")
        payloads = self.payloads()
        # Tensors in the order their last file is reached, so files are freed early.
        order = {f: i for i, f in enumerate(_weight_files(m))}
        last_file = {n: max(order[f] for f in e.payload_files) for n, e in m.tensors.items()}
        users = dict.fromkeys(order, 0)
        for entry in m.tensors.values():
            for file in set(entry.payload_files):
                users[file] += 1
        patches: dict[str, Patch] = {}
        # The tensors whose last file is the same decode as one batch (their chunks
        # share the codec's threads), and that file is freed after it.
        batches: dict[int, list[str]] = {}
        for name in sorted(m.tensors, key=lambda n: (last_file[n], n)):
            batches.setdefault(last_file[name], []).append(name)
        for names in batches.values():
            whole: list[tuple[str, torch.Tensor]] = []
            for name in names:
                old = _current_for(m, name, current)
                if m.tensors[name].pieces:
                    patch = _pieced_patch(m, name, old, payloads)
                    patches[name] = compact(patch, old) if dense_when_smaller else patch
                    del patch
                else:
                    whole.append((name, old))
            try:
                decoded = codec.decode_all(
                    [(payloads[n], old) for n, old in whole], compact=dense_when_smaller
                )
            except PayloadCorruptError as e:
                name = whole[e.index][0]
                raise SnapshotCorruptError(
                    f"snapshot {m.identity!r}, tensor {name!r} ({m.tensors[name].file}): {e}"
                ) from e
            patches.update(zip((n for n, _ in whole), decoded, strict=True))
            del decoded
            if release:
                for name in names:
                    self._release(name, users)
        if release:
            self._released = True
        return {name: patches[name] for name in sorted(patches)}

    def _release(self, name: str, users: dict[str, int]) -> None:
        """Drop `name`'s payload views, and each of its files no tensor still needs."""
        entry = self.manifest.tensors[name]
        assert self._payloads is not None  # set by payloads()
        if entry.pieces:
            for piece in entry.pieces:
                self._payloads.pop(_piece_key(piece.file, name), None)
        else:
            self._payloads.pop(name, None)
        for file in set(entry.payload_files):
            users[file] -= 1
            if users[file] == 0:
                self.files.pop(file, None)

    def verify_patched(self, name: str, current: Mapping[str, torch.Tensor], patch: Patch) -> None:
        """Apply `patch` to a scratch copy of `current[name]` and check the manifest checksum."""
        if name not in current:
            raise ChainError(
                f"delta {self.manifest.identity!r} patches tensor {name!r}, which the current "
                "weights lack"
            )
        # Chunk by chunk: no scratch copy of the tensor (see verify_patched_tensor).
        verify_patched_tensor(self.manifest, name, current[name], patch)


def _current_for(m: Manifest, name: str, current: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """`current[name]`, checked to be what delta `m` patches (else a `ChainError`)."""
    entry = m.tensors[name]
    old = current.get(name)
    if old is None:
        raise ChainError(
            f"delta {m.identity!r} patches tensor {name!r}, which the current weights "
            f"lack; load its parent {m.parent!r} (or a base) first"
        )
    if tuple(old.shape) != entry.shape or _dtype(old) != entry.dtype:
        raise ChainError(
            f"delta {m.identity!r}: tensor {name!r} is {list(old.shape)} {_dtype(old)} "
            f"in the current weights but {list(entry.shape)} {entry.dtype} in the "
            f"snapshot; load its parent {m.parent!r} first"
        )
    return old


class SnapshotStore:
    """The snapshots under one storage root."""

    def __init__(
        self,
        storage: Storage | str | os.PathLike[str],
        *,
        max_manifest_bytes: int = MAX_MANIFEST_BYTES,
    ) -> None:
        """`max_manifest_bytes`: a larger manifest is refused before it is read."""
        self.storage: Storage = open_storage(storage)
        self.max_manifest_bytes = max_manifest_bytes
        # identity -> (xxh3 of the manifest's bytes, parsed manifest), least recently used
        # first. Hashing the bytes is ~100x cheaper than parsing them, and unlike a size
        # or a timestamp it cannot miss a snapshot deleted and re-saved under its name.
        self._manifests: OrderedDict[str, tuple[bytes, int, Manifest]] = OrderedDict()
        self._manifests_lock = threading.Lock()
        self._fireworks = FireworksLayouts(self.storage, self.read_manifest)

    def __repr__(self) -> str:
        return f"SnapshotStore({self.storage.url!r})"

    def list_snapshots(self) -> list[str]:
        """Identities of complete snapshots (manifest present), sorted by name."""
        try:
            names = self.storage.list_dir("")
        except StorageFileNotFoundError:
            return []
        return [n for n in names if _is_identity(n) and self.storage.exists(_manifest_path(n))]

    def exists(self, identity: str) -> bool:
        validate_identity(identity)
        return self.storage.exists(_manifest_path(identity))

    def snapshot_url(self, identity: str) -> str:
        return self.storage.child_url(validate_identity(identity))

    def read_manifest(self, identity: str, *, parent: str | None = None) -> Manifest:
        """Parse and validate the manifest; `SnapshotNotFoundError` if there is none.

        Its size is checked first (over `max_manifest_bytes`: `SnapshotCorruptError`,
        nothing read); bytes already parsed are not parsed again (the last few kept).
        Without `weightsync.json`, a Fireworks layout in `<root>/<identity>/` gets a
        synthesised manifest (`snapshot/fireworks_layout.py`); `parent` is the parent
        of such a delta as the hot-load request names it (remembered for later reads;
        ignored for a snapshot with a manifest, which names its own).
        """
        validate_identity(identity)
        path = _manifest_path(identity)
        try:
            size = self.storage.size_bytes(path)
            check_manifest_size(size, identity=identity, max_bytes=self.max_manifest_bytes)
            data = self.storage.read_bytes(path)
        except StorageFileNotFoundError as e:
            synthesised = self._fireworks.manifest(identity, parent)
            if synthesised is not None:
                return synthesised
            incomplete = self.storage.exists(identity)
            detail = (
                "its directory has no manifest (an incomplete or failed write; not a snapshot)"
                if incomplete
                else "it does not exist"
            )
            raise SnapshotNotFoundError(
                f"no snapshot {identity!r} in {self.storage.url}: {detail}; "
                "list the snapshots with `weightsync snapshot list`"
            ) from e
        digest = xxhash.xxh3_128_digest(data)
        with self._manifests_lock:
            cached = self._manifests.get(identity)
            if cached is not None and cached[0] == digest:
                self._manifests.move_to_end(identity)
                return cached[2]
        manifest = Manifest.from_json_bytes(
            data, identity=identity, max_bytes=self.max_manifest_bytes
        )
        with self._manifests_lock:
            self._manifests[identity] = (digest, len(data), manifest)
            self._manifests.move_to_end(identity)
            while len(self._manifests) > MANIFEST_CACHE_ENTRIES or (
                sum(size for _, size, _ in self._manifests.values()) > MANIFEST_CACHE_BYTES
            ):
                self._manifests.popitem(last=False)
        return manifest

    def read_file(self, manifest: Manifest, name: str) -> bytes:
        """One file of a snapshot, checked against its manifest entry."""
        try:
            data = self.storage.read_bytes(f"{manifest.identity}/{name}")
        except StorageFileNotFoundError as e:
            raise SnapshotCorruptError(
                f"snapshot {manifest.identity!r}, file {name!r} is listed in the manifest but "
                f"missing from {self.storage.child_url(manifest.identity)}; re-save the snapshot"
            ) from e
        verify_file(manifest, name, data)
        return data

    def read_config(self, identity: str) -> dict[str, Any]:
        """`config.json` (base/delta) or `adapter_config.json` (lora), verified."""
        manifest = self.read_manifest(identity)
        name = ADAPTER_CONFIG_FILE if manifest.kind == "lora" else CONFIG_FILE
        data = self.read_file(manifest, name)
        try:
            doc = json.loads(data)
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise SnapshotCorruptError(f"snapshot {identity!r}, {name} is not JSON: {e}") from e
        if not isinstance(doc, dict):
            raise SnapshotCorruptError(f"snapshot {identity!r}, {name} is not a JSON object")
        return doc

    def chain(self, identity: str) -> list[Manifest]:
        """The chain that ends at `identity`: its base first, `identity` last."""
        chain = [self.read_manifest(identity)]
        seen = {identity}
        while chain[-1].kind == "delta":
            child = chain[-1]
            if child.parent is None:  # a Fireworks delta no one has named the parent of
                raise ChainError(
                    f"delta {child.identity!r} (Fireworks layout) does not name its parent; "
                    "pass it (read_manifest(..., parent=), `--parent`, or the hot-load "
                    "request's previous_snapshot_identity)"
                )
            parent_id = child.parent
            if parent_id in seen:
                raise ChainError(
                    f"the chain of {identity!r} has a cycle at {parent_id!r}; write a new base"
                )
            seen.add(parent_id)
            try:
                parent = self.read_manifest(parent_id)
            except SnapshotNotFoundError as e:
                raise ChainError(
                    f"delta {child.identity!r} needs parent {parent_id!r}, which is not in "
                    f"{self.storage.url}; the chain of {identity!r} is broken (write a new base)"
                ) from e
            _check_link(child, parent)
            chain.append(parent)
        return chain[::-1]

    def local_tokenizer_dir(self, identity: str) -> pathlib.Path | None:
        """The local directory holding the chain base's tokenizer files, if any."""
        base = self.chain(identity)[0]
        if base.kind != "base" or not any(m in base.files for m in TOKENIZER_MARKERS):
            return None
        return self.storage.local_path(base.identity)

    def fetch(self, identity: str) -> FetchedSnapshot:
        """Read every weight file of the snapshot and check it against the manifest."""
        manifest = self.read_manifest(identity)
        names = _weight_files(manifest)
        with ThreadPoolExecutor(max_workers=min(_READ_THREADS, max(1, len(names)))) as pool:
            datas = list(pool.map(lambda n: self.read_file(manifest, n), names))
        return FetchedSnapshot(manifest=manifest, files=dict(zip(names, datas, strict=True)))

    def materialize(self, identity: str) -> dict[str, torch.Tensor]:
        """The weights `identity` stands for, rebuilt along its chain and verified."""
        chain = self.chain(identity)
        weights = self.fetch(chain[0].identity).tensors()
        for manifest in chain[1:]:
            fetched = self.fetch(manifest.identity)
            for name, patch in fetched.patches(weights).items():
                patch.apply_(weights[name])
            # Checked after every link so a corrupt delta is named, not just the last one.
            verify_tensors(manifest, weights)
        return weights

    def verify(self, identity: str) -> VerifyReport:
        """Check every file of every snapshot in the chain, then the materialized weights.

        Corruption and broken chains are reported, not raised; a missing snapshot or
        an invalid identity still raises.
        """
        head = self.read_manifest(identity)
        report = VerifyReport(identity=identity, kind=head.kind)
        try:
            chain = self.chain(identity)
        except (ChainError, SnapshotCorruptError, UnknownCodecError, UnknownChecksumError) as e:
            report.problems.append(str(e))
            return report
        report.chain = [m.identity for m in chain]
        for manifest in chain:
            for name in sorted(manifest.files):
                try:
                    data = self.read_file(manifest, name)
                except SnapshotCorruptError as e:
                    report.problems.append(str(e))
                    continue
                report.files_checked += 1
                report.bytes_checked += len(data)
        if report.problems:
            return report
        try:
            weights = self.materialize(identity)
        except (ChainError, SnapshotCorruptError) as e:
            report.problems.append(str(e))
            return report
        report.tensors_checked = len(weights)
        return report


def _weight_files(m: Manifest) -> list[str]:
    """Every file holding a tensor or a piece of one, sorted."""
    return sorted({f for e in m.tensors.values() for f in e.payload_files})


def _names_by_file(m: Manifest) -> dict[str, set[str]]:
    out: dict[str, set[str]] = {}
    for name, entry in m.tensors.items():
        for file in entry.payload_files:
            out.setdefault(file, set()).add(name)
    return out


def _piece_key(file: str, name: str) -> str:
    # Files and names cannot hold a NUL (identities and JSON keys of ours never do).
    return f"{file}\0{name}"


def _assembled(
    m: Manifest, name: str, by_file: Mapping[str, Mapping[str, torch.Tensor]]
) -> torch.Tensor:
    """A base tensor stored in pieces, as one tensor (shapes and dtypes checked per piece)."""
    entry = m.tensors[name]
    out: torch.Tensor | None = None
    for piece in entry.pieces:
        part = by_file[piece.file].get(name)
        where = f"snapshot {m.identity!r}, tensor {name!r}, piece in {piece.file!r}"
        if part is None:
            raise SnapshotCorruptError(f"{where} is missing from that file; re-save the snapshot")
        if tuple(part.shape) != piece.shape or _dtype(part) != entry.dtype:
            raise SnapshotCorruptError(
                f"{where} is {list(part.shape)} {_dtype(part)}, the manifest says "
                f"{list(piece.shape)} {entry.dtype}; re-save the snapshot"
            )
        if out is None:
            out = torch.empty(entry.shape, dtype=part.dtype)
        out[piece.slices()] = part
    assert out is not None  # the manifest parser refuses a tensor with no pieces
    return out


def _view_bits(
    m: Manifest,
    name: str,
    file: str,
    shape: tuple[int, ...],
    by_file: Mapping[str, Mapping[str, TensorView]],
) -> np.ndarray:
    """The bits of `name` (or of its piece) in `file`, flat, as a view of the file's bytes."""
    entry = m.tensors[name]
    view = by_file[file].get(name)
    where = f"snapshot {m.identity!r}, tensor {name!r} in {file!r}"
    if view is None:
        raise SnapshotCorruptError(f"{where} is missing from that file; re-save the snapshot")
    if view.shape != shape or view.dtype != entry.dtype:
        raise SnapshotCorruptError(
            f"{where} is {list(view.shape)} {view.dtype}, the manifest says {list(shape)} "
            f"{entry.dtype}; re-save the snapshot"
        )
    return np.frombuffer(view.data, dtype=_uint_dtype(entry.dtype))


def _assembled_bits(
    m: Manifest, name: str, by_file: Mapping[str, Mapping[str, TensorView]]
) -> np.ndarray:
    """A base tensor stored in pieces, as the flat bits of one new array."""
    entry = m.tensors[name]
    out = np.empty(entry.shape, dtype=_uint_dtype(entry.dtype))
    for piece in entry.pieces:
        out[piece.slices()] = _view_bits(m, name, piece.file, piece.shape, by_file).reshape(
            piece.shape
        )
    return out.reshape(-1)


def _pieced_patch(
    m: Manifest, name: str, old: torch.Tensor, payloads: Mapping[str, memoryview]
) -> Patch:
    """One whole-tensor patch from the patches of a delta's pieces (FORMAT.md §9).

    Each piece's payload is decoded against the same box of `old`. Sparse pieces
    give sparse whole-tensor positions; if any piece is dense, the result is dense
    (`old`'s bits with every piece written in).
    """
    codec = get_codec(m.compression_format or "")
    entry = m.tensors[name]
    shape = entry.shape
    decoded: list[tuple[Any, Patch]] = []
    for piece in entry.pieces:
        old_piece = old[piece.slices()].contiguous()
        try:
            decoded.append(
                (piece, codec.decode_patch(payloads[_piece_key(piece.file, name)], old_piece))
            )
        except SnapshotCorruptError as e:
            raise SnapshotCorruptError(
                f"snapshot {m.identity!r}, tensor {name!r}, piece in {piece.file!r}: {e}"
            ) from e
    if any(patch.positions is None for _, patch in decoded):
        dense = bits(old.detach().contiguous()).reshape(shape).copy()
        for piece, patch in decoded:
            box = np.ascontiguousarray(dense[piece.slices()])
            if patch.positions is None:
                box.reshape(-1)[:] = patch.values
            else:
                box.reshape(-1)[patch.positions] = patch.values
            dense[piece.slices()] = box
        return Patch(None, dense.reshape(-1))
    positions: list[np.ndarray] = []
    values: list[np.ndarray] = []
    for piece, patch in decoded:
        assert patch.positions is not None
        local = np.unravel_index(patch.positions, piece.shape)
        moved = tuple(idx + off for idx, off in zip(local, piece.offset, strict=True))
        positions.append(np.ravel_multi_index(moved, shape).astype(np.int64))
        values.append(patch.values)
    flat = np.concatenate(positions)
    vals = np.concatenate(values)
    order = np.argsort(flat, kind="stable")
    return Patch(flat[order], vals[order])


def _uint_dtype(name: str) -> np.dtype:
    """The unsigned-integer numpy dtype of a supported dtype's width (its bits)."""
    return np.dtype(f"<u{torch_dtype(name).itemsize}")


def _check_link(child: Manifest, parent: Manifest) -> None:
    where = f"delta {child.identity!r} onto parent {parent.identity!r}"
    if parent.kind == "lora":
        raise ChainError(f"{where}: the parent is a LoRA adapter, which cannot be patched")
    if child.base != parent.base:
        raise ChainError(
            f"{where}: the delta names base {child.base!r} but the parent's chain starts at "
            f"{parent.base!r}; the parent was replaced (write a new base)"
        )
    if set(child.tensors) != set(parent.tensors):
        raise ChainError(f"{where}: the tensor names differ; a delta keeps its parent's names")
    for name, entry in child.tensors.items():
        other = parent.tensors[name]
        if (entry.shape, entry.dtype) != (other.shape, other.dtype):
            raise ChainError(
                f"{where}: tensor {name!r} is {list(entry.shape)} {entry.dtype} but "
                f"{list(other.shape)} {other.dtype} in the parent"
            )


def read_delta_shard(data: bytes, *, compression_format: str, where: str) -> dict[str, memoryview]:
    """Weight name -> payload of one delta shard, in the layout its codec uses."""
    if get_codec(compression_format).shard_layout == "fireworks":
        return fireworks_layout.decode_shard(data, where=where).payloads
    return decode_delta_shard(data, compression_format=compression_format, where=where)


def _manifest_path(identity: str) -> str:
    return f"{identity}/{MANIFEST_FILE}"


def _is_identity(name: str) -> bool:
    try:
        validate_identity(name)
    except InvalidIdentityError:
        return False
    return True


def _dtype(t: torch.Tensor) -> str:
    try:
        return dtype_name(t.dtype)
    except UnsupportedDtypeError:
        return str(t.dtype)
