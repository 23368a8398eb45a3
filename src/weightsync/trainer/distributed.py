"""Sharded saves: under `torch.distributed` every rank writes its own shard of a snapshot.

`TrainingClient` uses this when a process group with more than one rank is
initialized (a `torchrun` launch) and every rank calls the same saves in the same
order. Per tensor of the model's state dict:

- a `DTensor` sharded on some mesh dimension (FSDP2's `Shard(0)`, tensor
  parallelism's `Shard(1)`, or both on a 2-D mesh) is stored in pieces: each
  rank writes its own box, the first replica of a box when a mesh dimension
  replicates it. A rank keeps the previous bits of its own boxes only and
  encodes a delta of them only;
- a plain tensor or an all-`Replicate` `DTensor` (DDP, a model copied on every
  rank) is written whole by one rank, the owner of its shard file (files dealt
  round-robin over the ranks); the others hold nothing of it.

The manifest's per-tensor checksums are of the whole tensor, so they equal a
single-process save's: each sharded tensor has one owner rank (round-robin)
that streams the tensor's rows from the ranks holding them, one bucket of at
most `bucket_bytes` (or one row, if a row is larger) at a time, through a
hasher. Beyond its own shard's current and previous bits a rank therefore holds
at most two buckets of other ranks' bits at any moment.

Ranks agree through the process group's store (a barrier with a timeout at each
step, never the process group's own collectives, whose timeout is the job's):
rank 0 checks that every rank saves the same snapshot, kind and parent, with
the same tensor layout; then every rank writes its files; then rank 0 writes the
manifest once every rank reported its part durable, and tells the others. A
rank that fails reports why; one that dies is named when its report does not
come within `barrier_timeout_s`. In both cases no manifest is written and every
rank raises `DistributedSaveError` (a disagreement: `ChainError`) within twice
the timeout. The timeout counts from rank 0's arrival at each step, so it must
exceed the slowest rank's work in one step (its export and encode, or its upload).
"""

from __future__ import annotations

import itertools
import json
import logging
import pathlib
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor
from torch.distributed.tensor._utils import _compute_local_shape_and_global_offset
from torch.distributed.tensor.placement_types import _StridedShard

from weightsync.codec import checksum_bytes, checksum_tensor, get_codec
from weightsync.codec.bits import bits, dtype_name
from weightsync.codec.checksums import checksum_hasher
from weightsync.errors import ChainError, DistributedSaveError, InvalidInputError
from weightsync.snapshot import Manifest, SnapshotStore
from weightsync.snapshot.layout import (
    CONFIG_FILE,
    INDEX_FILE,
    SPEC_FILE,
    index_doc,
    is_tokenizer_file,
    json_bytes,
    shard_file,
    spec_doc,
)
from weightsync.snapshot.manifest import (
    MANIFEST_FILE,
    FileEntry,
    Piece,
    TensorEntry,
    format_version_for,
)
from weightsync.snapshot.pieces import encode_base_pieces, encode_delta_pieces, piece_file
from weightsync.snapshot.writer import (
    _config_bytes,
    _encode_torch,
    _now,
    _read_parent_side_files,
    _remove_quietly,
)
from weightsync.storage import Storage
from weightsync.trainer.export import ExportBuffers, plan_export

logger = logging.getLogger(__name__)

DEFAULT_BUCKET_BYTES = 64 * 1024**2
DEFAULT_BARRIER_TIMEOUT_S = 300.0
_POLL_S = 0.02
_STORE_PREFIX = "weightsync"
# Clients are numbered in creation order, the same on every rank, to key the store.
_client_numbers = itertools.count()


def world() -> tuple[int, int] | None:
    """(rank, world size) of the initialized default process group, if it has > 1 rank."""
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        return dist.get_rank(), dist.get_world_size()
    return None


@dataclass(frozen=True)
class _Box:
    offset: tuple[int, ...]
    shape: tuple[int, ...]

    @property
    def numel(self) -> int:
        return _numel(self.shape)


@dataclass(frozen=True)
class _Tensor:
    """One exported tensor: its whole shape, this rank's live data, and who stores what."""

    name: str
    shape: tuple[int, ...]
    source: torch.Tensor  # this rank's live data: a DTensor's local shard, or the whole tensor
    pieces: dict[int, _Box] | None  # sharded: writing rank -> its box; None: written whole

    @property
    def file(self) -> str:
        return shard_file(self.name)


class _Layout:
    """Who writes which tensor, box and file; the same on every rank of a consistent job."""

    def __init__(self, tensors: dict[str, _Tensor], *, rank: int, world_size: int) -> None:
        self.tensors = {name: tensors[name] for name in sorted(tensors)}
        self.rank = rank
        self.world_size = world_size
        whole_files = sorted({t.file for t in self.tensors.values() if t.pieces is None})
        self.file_owner = {f: i % world_size for i, f in enumerate(whole_files)}
        sharded = [n for n, t in self.tensors.items() if t.pieces is not None]
        self.checksum_owner = {n: i % world_size for i, n in enumerate(sharded)}
        for n, t in self.tensors.items():
            if t.pieces is None:
                self.checksum_owner[n] = self.file_owner[t.file]

    def mine(self) -> dict[str, torch.Tensor]:
        """The live tensors (or boxes) this rank stores."""
        return {
            n: t.source
            for n, t in self.tensors.items()
            if (t.pieces is None and self.file_owner[t.file] == self.rank)
            or (t.pieces is not None and self.rank in t.pieces)
        }

    def entry_file(self, t: _Tensor) -> str:
        if t.pieces is None:
            return t.file
        return piece_file(t.file, min(t.pieces))

    def digest(self) -> str:
        """Names, shapes and boxes: ranks that disagree on it cannot write one snapshot."""
        doc = {
            n: [
                list(t.shape),
                None
                if t.pieces is None
                else sorted((r, list(b.offset), list(b.shape)) for r, b in t.pieces.items()),
            ]
            for n, t in self.tensors.items()
        }
        return checksum_bytes("xxh3_64", json.dumps(doc, sort_keys=True).encode())


def plan_layout(model: torch.nn.Module, *, rank: int, world_size: int) -> _Layout:
    """The layout of `model`'s state dict on this rank; refuses what cannot be stored."""
    what = f"state dict of {type(model).__name__} on rank {rank}"
    entries = list(model.state_dict().items())
    locals_ = [(n, t.to_local() if isinstance(t, DTensor) else t) for n, t in entries]
    kept = plan_export(locals_, what=what).sources  # tied duplicates dropped, dtypes checked
    tensors: dict[str, _Tensor] = {}
    for name, t in entries:
        if name not in kept:
            continue
        if isinstance(t, DTensor):
            tensors[name] = _sharded(name, t, kept[name], world_size=world_size, what=what)
        else:
            tensors[name] = _Tensor(name, tuple(t.shape), kept[name], None)
    return _Layout(tensors, rank=rank, world_size=world_size)


def _sharded(name: str, t: DTensor, local: torch.Tensor, *, world_size: int, what: str) -> _Tensor:
    placements = tuple(t.placements)
    if any(p.is_partial() for p in placements):
        raise InvalidInputError(
            f"{what}: tensor {name!r} is a partial DTensor ({placements}); it is a sum not "
            "yet reduced, so no rank holds its values: redistribute it before saving"
        )
    if any(isinstance(p, _StridedShard) for p in placements):
        raise InvalidInputError(
            f"{what}: tensor {name!r} is sharded with a strided placement ({placements}, "
            "FSDP over tensor parallelism on the same dimension): its local rows are not one "
            "box of the tensor, which a sharded save stores; shard another dimension per "
            "mesh dimension (e.g. Shard(0) and Shard(1))"
        )
    shape = tuple(int(d) for d in t.shape)
    mesh = t.device_mesh
    ranks = mesh.mesh
    if all(p.is_replicate() for p in placements) and ranks.numel() == world_size:
        return _Tensor(name, shape, local, None)
    pieces: dict[int, _Box] = {}
    for r in range(world_size):
        found = (ranks == r).nonzero()
        if found.numel() == 0:
            continue  # this rank is outside the tensor's mesh
        coordinate = [int(c) for c in found[0]]
        if any(coordinate[i] for i, p in enumerate(placements) if p.is_replicate()):
            continue  # a replica of a box another rank writes
        size, offset = _compute_local_shape_and_global_offset(
            shape, tuple(mesh.shape), coordinate, placements
        )
        box = _Box(tuple(int(o) for o in offset), tuple(int(s) for s in size))
        if box.numel:
            pieces[r] = box
    mine = pieces.get(dist.get_rank())
    if mine is not None and tuple(local.shape) != mine.shape:
        raise InvalidInputError(
            f"{what}: tensor {name!r} holds a local shard of shape {list(local.shape)}, but its "
            f"placements {placements} on a mesh of shape {list(mesh.shape)} give "
            f"{list(mine.shape)}; a padded or custom-sharded DTensor cannot be saved in pieces"
        )
    if not pieces:  # an empty tensor: nothing to split, written whole
        return _Tensor(name, shape, local, None)
    return _Tensor(name, shape, local, pieces)


class _Rendezvous:
    """Barriers with a timeout over the process group's store, keyed by one save."""

    def __init__(self, store: Any, prefix: str, *, rank: int, world_size: int, timeout_s: float):
        self.store = store
        self.prefix = prefix
        self.rank = rank
        self.world_size = world_size
        self.timeout_s = timeout_s

    def gather(self, stage: str, report: str, *, waiting_for: str) -> list[str] | None:
        """Every rank reports; rank 0 gets every report, or raises naming the missing ranks."""
        self.store.set(f"{self.prefix}/{stage}/{self.rank}", report)
        self.store.add(f"{self.prefix}/{stage}/count", 1)
        if self.rank != 0:
            return None
        deadline = time.monotonic() + self.timeout_s
        while self.store.add(f"{self.prefix}/{stage}/count", 0) < self.world_size:
            if time.monotonic() > deadline:
                missing = [
                    r
                    for r in range(self.world_size)
                    if not self.store.check([f"{self.prefix}/{stage}/{r}"])
                ]
                raise DistributedSaveError(
                    f"{waiting_for}: rank{'s' if len(missing) > 1 else ''} "
                    f"{', '.join(map(str, missing))} did not report within "
                    f"{self.timeout_s:g} s (dead, or stuck); nothing was published"
                )
            time.sleep(_POLL_S)
        return [
            self.store.get(f"{self.prefix}/{stage}/{r}").decode() for r in range(self.world_size)
        ]

    def announce(self, stage: str, verdict: str) -> None:
        """Rank 0: the outcome of `stage` ("" = go on) for every other rank."""
        self.store.set(f"{self.prefix}/{stage}/verdict", verdict or "ok")

    def verdict(self, stage: str, *, waiting_for: str) -> str:
        """Ranks > 0: rank 0's outcome of `stage` ("" = go on), or raise naming rank 0."""
        key = f"{self.prefix}/{stage}/verdict"
        try:
            # Rank 0 itself waits up to the timeout for the slowest rank first.
            self.store.wait([key], timedelta(seconds=2 * self.timeout_s))
        except RuntimeError as e:  # the store's timeout (DistStoreError) or its loss
            raise DistributedSaveError(
                f"{waiting_for}: rank 0 did not answer within {2 * self.timeout_s:g} s "
                f"({e}); nothing was published by this rank"
            ) from e
        verdict = self.store.get(key).decode()
        return "" if verdict == "ok" else verdict


class ShardedSaver:
    """The rank logic of a sharded `TrainingClient`; see the module docstring."""

    def __init__(
        self,
        storage: Storage,
        *,
        session_id: str,
        checksum_format: str,
        compression_format: str,
        export_dtype: torch.dtype,
        barrier_timeout_s: float = DEFAULT_BARRIER_TIMEOUT_S,
        bucket_bytes: int = DEFAULT_BUCKET_BYTES,
    ) -> None:
        where = world()
        if where is None:
            raise InvalidInputError("ShardedSaver needs an initialized process group of > 1 rank")
        if not barrier_timeout_s > 0 or bucket_bytes < 1:
            raise InvalidInputError(
                f"barrier_timeout_s must be > 0 and bucket_bytes >= 1, got {barrier_timeout_s!r} "
                f"and {bucket_bytes!r}"
            )
        self.rank, self.world_size = where
        self.storage = storage
        self.checksum_format = checksum_format
        self.compression_format = compression_format
        self.export_dtype = export_dtype
        self.barrier_timeout_s = float(barrier_timeout_s)
        self.bucket_bytes = int(bucket_bytes)
        self._store = dist.distributed_c10d._get_default_store()
        self._number = next(_client_numbers)
        self._next_save = 0  # the sequence number of the next save, the same on every rank
        self.session_id = self._agree_on_session(session_id)

    def _agree_on_session(self, proposed: str) -> str:
        """Rank 0's session id, on every rank: every rank then names snapshots alike."""
        key = f"{_STORE_PREFIX}/client{self._number}/session"
        if self.rank == 0:
            self._store.set(key, proposed)
            return proposed
        try:
            self._store.wait([key], timedelta(seconds=self.barrier_timeout_s))
        except RuntimeError as e:
            raise DistributedSaveError(
                f"rank {self.rank}: rank 0 did not create its TrainingClient within "
                f"{self.barrier_timeout_s:g} s ({e}); every rank must create one, in the same order"
            ) from e
        return str(self._store.get(key).decode())

    def rank0_checkpoint_type(self, kind: str, *, name: str, timeout_s: float) -> str:
        """Rank 0's `kind` for the next save, on every rank (`WeightSyncer` on every rank).

        Rank 0 posts its choice for the next save and returns at once; the others wait
        up to `timeout_s` for it and return it, so a base that rank 0 chose from what the
        deployment serves (or after a failed load) is a base on every rank. Call it once
        before each save, on every rank or on rank 0 only; raises `DistributedSaveError`
        naming rank 0 when it does not post within the timeout.
        """
        key = f"{_STORE_PREFIX}/client{self._number}/save{self._next_save}/checkpoint_type"
        if self.rank == 0:
            self._store.set(key, kind)
            return kind
        try:
            self._store.wait([key], timedelta(seconds=timeout_s))
        except RuntimeError as e:  # the store's timeout (DistStoreError) or its loss
            raise DistributedSaveError(
                f"rank {self.rank}: rank 0 did not choose the checkpoint type of save {name!r} "
                f"within {timeout_s:g} s ({e}); every rank must call the same WeightSyncer "
                "saves in the same order; nothing was saved"
            ) from e
        chosen = self._store.get(key).decode()
        if chosen != kind:
            logger.info(
                "save %r: rank 0 chose a %s (this rank would have saved a %s); saving a %s",
                name,
                chosen,
                kind,
                chosen,
            )
        return str(chosen)

    def save(
        self,
        identity: str,
        kind: str,
        *,
        model: torch.nn.Module,
        parent: Manifest | None,
        previous: Mapping[str, torch.Tensor] | None,
        buffers: ExportBuffers,
        config: Mapping[str, Any],
        tokenizer_dir: pathlib.Path | None,
    ) -> tuple[Manifest, dict[str, torch.Tensor]]:
        """Write this rank's part of `identity`; return the manifest and this rank's bits.

        `kind` is ``"base"`` or ``"delta"``; `parent` / `previous`: a delta's parent and
        this rank's bits of it (what the last save returned). Every rank calls it with
        the same identity and kind, in the same order.
        """
        seq = self._next_save
        self._next_save += 1
        rv = _Rendezvous(
            self._store,
            f"{_STORE_PREFIX}/client{self._number}/save{seq}",
            rank=self.rank,
            world_size=self.world_size,
            timeout_s=self.barrier_timeout_s,
        )
        what = f"sharded save of snapshot {identity!r} on rank {self.rank}"
        # 1. Plan and export locally; every rank reports, a failed one too.
        error: Exception | None = None
        layout: _Layout | None = None
        current: dict[str, torch.Tensor] = {}
        try:
            layout = plan_layout(model, rank=self.rank, world_size=self.world_size)
            current = buffers.fill(layout.mine())
            if kind == "delta":
                _check_previous(identity, current, previous)
            if self.rank == 0 and self.storage.exists(identity):
                logger.warning("removing incomplete snapshot directory %s", identity)
                _remove_quietly(self.storage, identity)
        except Exception as e:  # noqa: BLE001  (reported to rank 0, then raised here)
            error = e
        intent = {
            "identity": identity,
            "kind": kind,
            "parent": None if parent is None else parent.identity,
            "layout": None if layout is None else layout.digest(),
            "error": _describe(error),
        }
        self._step(rv, "intent", intent, _check_intents, identity=identity, what=what, own=error)
        assert layout is not None  # planned, since nothing failed
        # 2. Whole-tensor checksums at their owners; 3. this rank's files.
        part: dict[str, Any]
        try:
            checksums = self._checksums(layout, current, buffers.dtype)
            part = self._write_part(
                identity,
                kind=kind,
                layout=layout,
                current=current,
                previous=previous,
                parent=parent,
                config=config,
                tokenizer_dir=tokenizer_dir,
            )
            part["checksums"] = checksums
        except Exception as e:  # noqa: BLE001  (reported to rank 0, then raised here)
            error = e
            part = {"error": _describe(e)}
        # 4. Rank 0 publishes once every rank's part is durable.
        publisher = _Publisher(self, identity, kind, layout, parent)
        self._step(rv, "parts", part, publisher.publish, identity=identity, what=what, own=error)
        if publisher.manifest is not None:
            return publisher.manifest, current
        return SnapshotStore(self.storage).read_manifest(identity), current

    def _step(
        self,
        rv: _Rendezvous,
        stage: str,
        report: dict[str, Any],
        decide: Callable[[list[dict[str, Any]]], str],
        *,
        identity: str,
        what: str,
        own: Exception | None,
    ) -> None:
        """One barrier: every rank reports, rank 0 decides, every rank learns the verdict.

        A rank whose own step failed (`own`) raises that error once the others know.
        """
        waiting_for = f"{what}, step {stage!r}"
        if self.rank == 0:
            try:
                reports = rv.gather(stage, json.dumps(report), waiting_for=waiting_for)
                assert reports is not None  # rank 0 gets every report
                verdict = decide([json.loads(r) for r in reports])
            except BaseException as e:
                rv.announce(stage, _describe(e) or "failed")
                _remove_quietly(self.storage, identity)
                raise
            if verdict:
                _remove_quietly(self.storage, identity)
            rv.announce(stage, verdict)
        else:
            rv.gather(stage, json.dumps(report), waiting_for=waiting_for)
            verdict = rv.verdict(stage, waiting_for=waiting_for)
        if own is not None:
            raise own
        if verdict.startswith("ChainError: "):
            raise ChainError(f"{what}: {verdict.removeprefix('ChainError: ')}")
        if verdict:
            raise DistributedSaveError(f"{what} failed, nothing was published: {verdict}")

    # --- checksums ---------------------------------------------------------------

    def _checksums(
        self, layout: _Layout, current: Mapping[str, torch.Tensor], dtype: torch.dtype
    ) -> dict[str, str]:
        """Checksums of the whole tensors this rank owns; it sends its rows to the others'."""
        device = _wire_device()
        out: dict[str, str] = {}
        for name, t in layout.tensors.items():
            owner = layout.checksum_owner[name]
            if t.pieces is None:
                if owner == self.rank:
                    out[name] = checksum_tensor(self.checksum_format, current[name])
                continue
            if owner != self.rank and self.rank not in t.pieces:
                continue
            hasher = checksum_hasher(self.checksum_format) if owner == self.rank else None
            for block in self._blocks(t, current.get(name), owner, dtype, device):
                assert hasher is not None  # only the owner gets blocks
                hasher.update(bits(block).view(np.uint8).data)
            if hasher is not None:
                out[name] = hasher.hexdigest()
        return out

    def _blocks(
        self,
        t: _Tensor,
        mine: torch.Tensor | None,
        owner: int,
        dtype: torch.dtype,
        device: torch.device,
    ) -> Iterator[torch.Tensor]:
        """The owner: yields the tensor's rows, one bucket at a time; the others send theirs.

        Every rank walks the same blocks in the same order, so each send meets its recv.
        """
        assert t.pieces is not None
        itemsize = torch.empty((), dtype=dtype).element_size()
        row_bytes = itemsize * _numel(t.shape[1:])
        rows_per_block = max(1, self.bucket_bytes // max(1, row_bytes))
        for start in range(0, t.shape[0], rows_per_block):
            stop = min(t.shape[0], start + rows_per_block)
            block = (
                torch.empty((stop - start, *t.shape[1:]), dtype=dtype)
                if owner == self.rank
                else None
            )
            for r, box in sorted(t.pieces.items()):
                lo, hi = max(start, box.offset[0]), min(stop, box.offset[0] + box.shape[0])
                if lo >= hi or self.rank not in (r, owner):
                    continue
                if r == self.rank:
                    assert mine is not None
                    part = mine[lo - box.offset[0] : hi - box.offset[0]].contiguous()
                    if block is None:
                        dist.send(_as_bytes(part).to(device), dst=owner)
                        continue
                else:
                    shape = (hi - lo, *box.shape[1:])
                    wire = torch.empty(
                        int(np.prod(shape, dtype=np.int64)) * itemsize,
                        dtype=torch.uint8,
                        device=device,
                    )
                    dist.recv(wire, src=r)
                    part = wire.cpu().view(dtype).reshape(shape)
                assert block is not None  # only the owner receives
                rest = zip(box.offset[1:], box.shape[1:], strict=True)
                index = (slice(lo - start, hi - start), *(slice(o, o + n) for o, n in rest))
                block[index] = part
            if block is not None:
                yield block

    # --- this rank's files -----------------------------------------------------

    def _write_part(
        self,
        identity: str,
        *,
        kind: str,
        layout: _Layout,
        current: Mapping[str, torch.Tensor],
        previous: Mapping[str, torch.Tensor] | None,
        parent: Manifest | None,
        config: Mapping[str, Any],
        tokenizer_dir: pathlib.Path | None,
    ) -> dict[str, Any]:
        """Write this rank's files (rank 0: the side files too); return what it wrote."""
        files: dict[str, list[Any]] = {}
        changed: dict[str, int] = {}

        def put(name: str, data: bytes, *, weights: bool) -> None:
            self.storage.write_bytes(f"{identity}/{name}", data)
            files[name] = [len(data), checksum_bytes(self.checksum_format, data), weights]

        groups: dict[str, dict[str, torch.Tensor]] = {}
        for name, bits_now in current.items():
            t = layout.tensors[name]
            file = t.file if t.pieces is None else piece_file(t.file, self.rank)
            groups.setdefault(file, {})[name] = bits_now
        for file in sorted(groups):
            new = groups[file]
            pieced = layout.tensors[next(iter(new))].pieces is not None
            if kind == "base":
                data = encode_base_pieces(new) if pieced else _encode_torch(new)
                changed.update({n: t.numel() for n, t in new.items()})
            else:
                assert previous is not None  # checked by _check_previous
                data, counts = encode_delta_pieces(
                    {n: previous[n] for n in new}, new, compression_format=self.compression_format
                )
                changed.update(counts)
            put(file, data, weights=True)
        if self.rank == 0:
            for name, data in self._side_files(
                identity,
                kind=kind,
                layout=layout,
                parent=parent,
                config=config,
                tokenizer_dir=tokenizer_dir,
            ).items():
                put(name, data, weights=False)
        return {"files": files, "changed": changed}

    def _side_files(
        self,
        identity: str,
        *,
        kind: str,
        layout: _Layout,
        parent: Manifest | None,
        config: Mapping[str, Any],
        tokenizer_dir: pathlib.Path | None,
    ) -> dict[str, bytes]:
        if kind == "delta":
            assert parent is not None
            return _read_parent_side_files(self.storage, parent, identity)
        weight_map = {n: layout.entry_file(t) for n, t in layout.tensors.items()}
        itemsize = torch.empty((), dtype=self.export_dtype).element_size()
        total = sum(_numel(t.shape) * itemsize for t in layout.tensors.values())
        dtype = dtype_name(self.export_dtype)
        side = {
            CONFIG_FILE: _config_bytes(config),
            INDEX_FILE: json_bytes(index_doc(weight_map, total_size_bytes=total)),
            SPEC_FILE: json_bytes(
                spec_doc({n: (t.shape, dtype) for n, t in layout.tensors.items()})
            ),
        }
        if tokenizer_dir is not None:
            side.update(_tokenizer_files(tokenizer_dir))
        return side


class _Publisher:
    """Rank 0's decision at the last barrier: the manifest, once every part is durable."""

    def __init__(
        self,
        saver: ShardedSaver,
        identity: str,
        kind: str,
        layout: _Layout,
        parent: Manifest | None,
    ) -> None:
        self.saver = saver
        self.identity = identity
        self.kind = kind
        self.layout = layout
        self.parent = parent
        self.manifest: Manifest | None = None

    def publish(self, parts: list[dict[str, Any]]) -> str:
        """Write the manifest and return "" , or return why not (naming the failed ranks)."""
        failed = [f"rank {r}: {p['error']}" for r, p in enumerate(parts) if p.get("error")]
        if failed:
            return "; ".join(failed)
        saver, layout = self.saver, self.layout
        files: dict[str, FileEntry] = {}
        payload_bytes = 0
        checksums: dict[str, str] = {}
        changed: dict[str, int] = {}
        for part in parts:
            for name, (size, checksum, weights) in part["files"].items():
                files[name] = FileEntry(size_bytes=int(size), checksum=str(checksum))
                payload_bytes += int(size) if weights else 0
            checksums.update(part["checksums"])
            for name, n in part["changed"].items():
                changed[name] = changed.get(name, 0) + int(n)
        tensors: dict[str, TensorEntry] = {}
        dtype = dtype_name(saver.export_dtype)
        for name, t in layout.tensors.items():
            pieces = (
                ()
                if t.pieces is None
                else tuple(
                    Piece(file=piece_file(t.file, r), offset=b.offset, shape=b.shape)
                    for r, b in sorted(t.pieces.items())
                )
            )
            tensors[name] = TensorEntry(
                shape=t.shape,
                dtype=dtype,
                file=layout.entry_file(t),
                checksum=checksums[name],
                num_changed=changed.get(name, 0) if self.kind == "delta" else None,
                pieces=pieces,
            )
        itemsize = torch.empty((), dtype=saver.export_dtype).element_size()
        num_elements = sum(e.num_elements for e in tensors.values())
        stats: dict[str, Any] = {
            "num_tensors": len(tensors),
            "num_elements": num_elements,
            "num_changed": sum(changed.values()) if self.kind == "delta" else num_elements,
            "payload_bytes": payload_bytes,
            "full_bytes": num_elements * itemsize,
            "num_ranks": saver.world_size,
        }
        if self.kind == "delta":
            stats["num_changed_tensors"] = sum(1 for n in changed.values() if n)
        manifest = Manifest(
            format_version=format_version_for(tensors),
            identity=self.identity,
            kind="delta" if self.kind == "delta" else "base",
            parent=None if self.parent is None else self.parent.identity,
            base=self.identity if self.parent is None else self.parent.base,
            compression_format=get_codec(saver.compression_format).name
            if self.kind == "delta"
            else None,
            checksum_format=saver.checksum_format,
            tensors=tensors,
            files=files,
            session_id=saver.session_id,
            created_at=_now(),
            stats=stats,
        )
        # Last write: this is what makes the snapshot exist.
        saver.storage.write_bytes(f"{self.identity}/{MANIFEST_FILE}", manifest.to_json_bytes())
        logger.info(
            "wrote sharded %s snapshot %s from %d ranks (%d payload bytes)",
            self.kind,
            self.identity,
            saver.world_size,
            payload_bytes,
        )
        self.manifest = manifest
        return ""


def _check_intents(intents: list[dict[str, Any]]) -> str:
    """Rank 0: "" when every rank saves the same snapshot onto the same parent, else why not."""
    failed = [f"rank {r}: {i['error']}" for r, i in enumerate(intents) if i.get("error")]
    if failed:
        return "; ".join(failed)
    first = intents[0]
    for r, intent in enumerate(intents[1:], start=1):
        for key in ("identity", "kind", "parent"):
            if intent[key] != first[key]:
                return (
                    f"ChainError: rank {r} saves {key} {intent[key]!r} but rank 0 saves "
                    f"{first[key]!r}; every rank must make the same saves in the same order "
                    "(reset_delta_chain on all of them, or none)"
                )
        if intent["layout"] != first["layout"]:
            return (
                f"rank {r} holds another set of tensors (names, shapes or boxes) than rank 0; "
                "every rank must hold the same model, sharded the same way"
            )
    return ""


def _check_previous(
    identity: str,
    current: Mapping[str, torch.Tensor],
    previous: Mapping[str, torch.Tensor] | None,
) -> None:
    if previous is None:
        raise ChainError(f"cannot save snapshot {identity!r} as a delta: no previous snapshot")
    for name, t in current.items():
        old = previous.get(name)
        if old is None or old.shape != t.shape:
            raise ChainError(
                f"cannot save snapshot {identity!r} as a delta: tensor {name!r} "
                f"({list(t.shape)} on this rank) is not in the previous snapshot in that "
                "shape; a changed model or sharding needs a base"
            )


def _tokenizer_files(tokenizer_dir: pathlib.Path) -> dict[str, bytes]:
    try:
        paths = sorted(p for p in tokenizer_dir.iterdir() if p.is_file())
    except OSError as e:
        raise InvalidInputError(f"cannot read tokenizer directory {tokenizer_dir}: {e}") from e
    return {p.name: p.read_bytes() for p in paths if is_tokenizer_file(p.name)}


def _describe(error: BaseException | None) -> str | None:
    return None if error is None else f"{type(error).__name__}: {error}"


def _numel(shape: tuple[int, ...]) -> int:
    return int(np.prod(shape, dtype=np.int64))


def _as_bytes(t: torch.Tensor) -> torch.Tensor:
    """A contiguous tensor's bytes as uint8 (what every backend sends, whatever the dtype)."""
    return t.reshape(-1).view(torch.uint8)


def _wire_device() -> torch.device:
    """Where tensors must be for the default group: CUDA for NCCL, else the CPU."""
    if "nccl" in str(dist.get_backend()).lower():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")
