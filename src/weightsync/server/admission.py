"""What a replica admits: the checks a hot-load request passes before any work starts.

A refused request changes nothing: the replica keeps serving what it had. A delta
must apply onto exactly what the replica serves (its parent, by identity); after a
ledger reset only a base is admitted; a base (or delta) must be the same model as
the one served: every config key that changes outputs (`rms_norm_eps`,
`rope_theta`, `eos_token_id`, `architectures`, ...), tensor names, shapes, dtypes —
`engines.base.model_mismatches`, the rule every engine's in-place load uses too; a
differing one is refused naming what differs (the replica never rebuilds its model
on a hot-load). A LoRA adapter needs an engine that loads adapters.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from weightsync.codec import canonical_checksum_name, get_codec
from weightsync.errors import (
    ChainError,
    HotloadRefusedError,
    InvalidInputError,
    UnsupportedOperationError,
)
from weightsync.server.engines.base import Engine, model_mismatches, tensor_specs
from weightsync.snapshot import Manifest
from weightsync.wire import IncrementalSnapshotMetadata


def check_admissible(
    manifest: Manifest,
    meta: IncrementalSnapshotMetadata | None,
    *,
    replica_id: str,
    current: str | None,
    requires_base: bool,
    engine: Engine,
    served_config: Mapping[str, Any],
    read_snapshot_config: Callable[[], Mapping[str, Any]],
) -> None:
    """Raise (4xx categories) unless the replica can load `manifest` now.

    `read_snapshot_config` is called only once the cheaper checks passed.
    """
    identity = manifest.identity
    if (
        meta is not None
        and meta.checksum_format is not None
        and not _names_a_checksum_of(manifest, meta.checksum_format)
    ):
        raise InvalidInputError(
            f"checksum_format {meta.checksum_format!r} does not match snapshot "
            f"{identity!r}, which uses {manifest.checksum_format!r}"
        )
    if manifest.kind == "delta":
        codec = get_codec(manifest.compression_format or "")
        if meta is not None and meta.compression_format not in (None, codec.name):
            raise InvalidInputError(
                f"compression_format {meta.compression_format!r} does not match snapshot "
                f"{identity!r}, which uses {codec.name!r}"
            )
        _check_parent(
            manifest, meta, replica_id=replica_id, current=current, requires_base=requires_base
        )
    elif meta is not None:
        raise HotloadRefusedError(
            f"snapshot {identity!r} is a {manifest.kind}, but the request carries "
            "incremental_snapshot_metadata; send a base or adapter without it"
        )
    if manifest.kind == "lora":
        if type(engine).load_adapter is Engine.load_adapter:
            raise UnsupportedOperationError(
                f"engine {engine.name!r} cannot load LoRA snapshot {identity!r}; "
                "use the torch engine"
            )
        return
    _check_same_model(manifest, engine, served_config, read_snapshot_config())


def _names_a_checksum_of(manifest: Manifest, checksum_format: str) -> bool:
    """Whether `checksum_format` is one the snapshot carries: its manifest's, or the per-tensor
    adler32 that Fireworks-layout shards hold (the SDK names it, as "alder32", in requests)."""
    requested = canonical_checksum_name(checksum_format)
    if requested == canonical_checksum_name(manifest.checksum_format):
        return True
    return (
        manifest.kind == "delta"
        and requested == "adler32"
        and manifest.compression_format is not None
        and get_codec(manifest.compression_format).shard_layout == "fireworks"
    )


def _check_parent(
    manifest: Manifest,
    meta: IncrementalSnapshotMetadata | None,
    *,
    replica_id: str,
    current: str | None,
    requires_base: bool,
) -> None:
    identity = manifest.identity
    if requires_base:
        raise HotloadRefusedError(
            f"delta {identity!r} refused: the ledger was reset, so only a base is "
            "accepted next; save and hot-load a base snapshot"
        )
    if current is None:
        raise HotloadRefusedError(
            f"delta {identity!r} refused: replica {replica_id} serves nothing "
            "yet; hot-load a base first"
        )
    claimed = meta.previous_snapshot_identity if meta is not None else manifest.parent
    for what, parent in (("previous_snapshot_identity", claimed), ("parent", manifest.parent)):
        if parent != current:
            raise HotloadRefusedError(
                f"delta {identity!r} refused: its {what} is {parent!r} but replica "
                f"{replica_id} serves {current!r}; hot-load the chain in order "
                "or start a new chain with a base (WeightSyncer.reset_delta_chain)"
            )


def _check_same_model(
    manifest: Manifest,
    engine: Engine,
    served_config: Mapping[str, Any],
    snapshot_config: Mapping[str, Any],
) -> None:
    incoming = {name: (tuple(e.shape), e.dtype) for name, e in manifest.tensors.items()}
    served = tensor_specs(engine.named_weights())
    problems = model_mismatches(served_config, served, snapshot_config, incoming)
    if problems:
        raise ChainError(
            f"snapshot {manifest.identity!r} does not match the served model "
            f"({'; '.join(problems[:8])}); start a deployment of that model instead"
        )
