"""`TrainingClient`: sampler snapshots, resume state and promotion from a live PyTorch model.

The client wraps the user's model (a `transformers` model, or any `nn.Module`
with a state dict) and optionally its optimizer. Each save exports the live
tensors cast to `export_dtype` and writes a base or a delta snapshot named
``{name}-{session_id}``. A delta is encoded against the bits of the previous
snapshot this client saved, kept in CPU memory, never read back from storage.
A delta's changes are found next to the parameters (on their device, where the
previous bits are kept by `previous_bits_device`; `trainer/device_diff.py`) and
only the changed positions and bits are copied to the host.

Chain state (the previous snapshot and its bits) changes only after a snapshot
is fully written, so a failed save leaves the next delta on the last good one.
"""

from __future__ import annotations

import logging
import os
import pathlib
import time
import warnings
from collections.abc import Mapping
from dataclasses import KW_ONLY, dataclass
from typing import Any, Literal, cast

import torch

from weightsync.codec import DEFAULT_CHECKSUM, canonical_checksum_name, get_codec
from weightsync.errors import (
    ChainError,
    InvalidInputError,
    SnapshotNotFoundError,
    StorageError,
    UnsupportedOperationError,
)
from weightsync.identity import new_session_id, session_identity, validate_identity
from weightsync.sdk_defaults import (
    CHECKPOINT_TYPES,
    DEFAULT_COMPRESSION_FORMAT,
    CheckpointType,
    normalize_checkpoint_type,
)
from weightsync.snapshot import Manifest, SnapshotStore, write_base, write_delta, write_lora
from weightsync.storage import Storage, open_storage
from weightsync.trainer import distributed, lora, state
from weightsync.trainer.device_diff import ChangeExporter
from weightsync.trainer.export import (
    ExportBuffers,
    ExportPlan,
    export_copy,
    hf_config,
    num_bytes,
    plan_export,
    resolve_export_dtype,
)
from weightsync.trainer.progress import write_progress
from weightsync.trainer.promote import LoraBase, promote

logger = logging.getLogger(__name__)

__all__ = ["CHECKPOINT_TYPES", "CheckpointType", "SaveSamplerResult", "TrainingClient"]


@dataclass(frozen=True)
class SaveSamplerResult:
    """What one `save_weights_for_sampler_ext` wrote.

    `checkpoint_type` is how a deployment hot-loads it: ``"delta"`` (incremental,
    onto `parent`) or ``"base"`` (standalone: bases, merged bases and LoRA
    adapters); `kind` is the snapshot kind in its manifest (``base``, ``delta``,
    ``lora``).
    """

    path: str  # storage URL (or local path) of the snapshot directory
    snapshot_name: str  # the session-qualified identity
    _: KW_ONLY
    checkpoint_type: Literal["base", "delta"] = "base"
    kind: Literal["base", "delta", "lora"] = "base"
    parent: str | None = None
    payload_bytes: int = 0  # bytes of weight files written
    full_bytes: int = 0  # bytes of the weights it stands for, uncompressed
    num_changed: int = 0  # elements whose bits differ from the parent (all, for a base)
    seconds: float = 0.0


@dataclass(frozen=True)
class _Previous:
    """The last snapshot this client saved and the exact bits it stands for."""

    manifest: Manifest
    tensors: dict[str, torch.Tensor]


class TrainingClient:
    """Saves sampler snapshots and resume state of a live model; see the module docstring.

    With `lora_rank > 0` a model that is not already a `peft.PeftModel` is wrapped
    with a LoRA adapter on every linear projection (`lora_alpha` defaults to twice
    the rank); train `client.model` then, with an optimizer over its trainable
    parameters. LoRA snapshots are PEFT adapter directories, always standalone.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        *,
        storage: str | os.PathLike[str] | Storage,
        optimizer: torch.optim.Optimizer | None = None,
        lora_rank: int = 0,
        lora_alpha: int | None = None,
        tokenizer_dir: str | os.PathLike[str] | None = None,
        export_dtype: str | torch.dtype = "bfloat16",
        compression_format: str = DEFAULT_COMPRESSION_FORMAT,
        checksum_format: str = DEFAULT_CHECKSUM,
        storage_options: Mapping[str, Any] | None = None,
        barrier_timeout_s: float = distributed.DEFAULT_BARRIER_TIMEOUT_S,
        bucket_bytes: int = distributed.DEFAULT_BUCKET_BYTES,
        previous_bits_device: str = "auto",
    ) -> None:
        """Under an initialized process group of > 1 rank every rank creates a client and
        saves its own shard (`trainer/distributed.py`): `barrier_timeout_s` bounds each
        wait for another rank, `bucket_bytes` the rows of other ranks held at a time.

        `previous_bits_device` ("auto", "device", "host"): where the bits a delta is
        diffed against are kept; "auto" keeps them on the parameters' accelerator when it
        has more than twice their size free, else on the (pinned) host
        (`trainer/device_diff.py`). Sharded saves keep their own path."""
        if not isinstance(model, torch.nn.Module):
            raise InvalidInputError(
                f"TrainingClient needs a torch.nn.Module, got {type(model).__name__}"
            )
        if optimizer is not None and not isinstance(optimizer, torch.optim.Optimizer):
            raise InvalidInputError(
                f"optimizer must be a torch.optim.Optimizer or None, got {type(optimizer).__name__}"
            )
        if isinstance(lora_rank, bool) or not isinstance(lora_rank, int) or lora_rank < 0:
            raise InvalidInputError(
                f"lora_rank must be an integer >= 0 (0 = full-parameter), got {lora_rank!r}"
            )
        self.export_dtype = resolve_export_dtype(export_dtype)
        self.compression_format = get_codec(compression_format).name
        self.checksum_format = canonical_checksum_name(checksum_format)
        self.tokenizer_dir = _tokenizer_dir(tokenizer_dir)
        if isinstance(storage, (str, os.PathLike)):
            self.storage: Storage = open_storage(storage, **dict(storage_options or {}))
        else:
            self.storage = open_storage(storage)
        self.store = SnapshotStore(self.storage)
        self.session_id = new_session_id()

        self.is_lora = lora_rank > 0 or lora.is_peft_model(model)
        if self.is_lora and not lora.is_peft_model(model):
            alpha = int(lora_alpha) if lora_alpha is not None else 2 * lora_rank
            model = lora.wrap_for_lora(model, rank=lora_rank, alpha=alpha)
            _check_optimizer_trains(optimizer, model)
        if self.is_lora:
            config = lora.active_lora_config(model)
            if lora_rank and lora_rank != config.r:
                logger.warning(
                    "lora_rank=%d differs from the PeftModel's adapter rank %d; using %d",
                    lora_rank,
                    config.r,
                    config.r,
                )
            self.lora_rank = int(config.r)
        else:
            self.lora_rank = 0
        self.model = model
        self.optimizer = optimizer
        self._sharded: distributed.ShardedSaver | None = None
        if distributed.world() is not None:
            if self.is_lora:
                raise UnsupportedOperationError(
                    "LoRA snapshots under torch.distributed with more than one rank are not "
                    "supported: every rank would write the same adapter; save the adapter "
                    "from one process"
                )
            self._sharded = distributed.ShardedSaver(
                self.storage,
                session_id=self.session_id,
                checksum_format=self.checksum_format,
                compression_format=self.compression_format,
                export_dtype=self.export_dtype,
                barrier_timeout_s=barrier_timeout_s,
                bucket_bytes=bucket_bytes,
            )
            self.session_id = self._sharded.session_id  # rank 0's, on every rank

        self._previous: _Previous | None = None
        self._spare = ExportBuffers(self.export_dtype)
        self._changes = ChangeExporter(self.export_dtype, previous_bits_device=previous_bits_device)
        self._saved_names: set[str] = set()
        logger.info(
            "training client session %s: storage %s, export %s, %s",
            self.session_id,
            self.storage.url,
            self.export_dtype,
            f"LoRA rank {self.lora_rank}" if self.is_lora else f"deltas: {self.compression_format}",
        )

    def __repr__(self) -> str:
        return f"TrainingClient(session_id={self.session_id!r}, storage={self.storage.url!r})"

    @property
    def sharded_saver(self) -> distributed.ShardedSaver | None:
        """The rank logic of a sharded save (None outside a process group of > 1 rank)."""
        return self._sharded

    # --- chain state ---------------------------------------------------------

    @property
    def last_snapshot(self) -> str | None:
        """Identity of the snapshot the next delta would apply onto (None: next is a base)."""
        return None if self._previous is None else self._previous.manifest.identity

    def reset_delta_chain(self) -> None:
        """Forget the previous snapshot (and free its bits): the next save is a base."""
        self._previous = None
        self._spare.release()
        self._changes.reset()

    @property
    def diff_location(self) -> Literal["device", "host"] | None:
        """Where the next delta's changes are found: "device" (a copy of the previous bits
        next to the parameters) or "host" (the previous host image); None before a base."""
        return self._changes.where

    # --- sampler snapshots ---------------------------------------------------

    def save_weights_for_sampler_ext(
        self,
        name: str,
        checkpoint_type: str | None = None,
        ttl_seconds: int | None = None,
        export_precision: str | None = None,
        metadata: Any = None,
    ) -> SaveSamplerResult:
        """Save the live weights as snapshot ``{name}-{session_id}``; see the module docstring.

        `checkpoint_type` (any case, as in the SDK): None (base first, then deltas),
        ``"base"``, ``"delta"``, or ``"merged_base"`` (LoRA only: the adapter folded into
        a full base). With LoRA every save is a standalone adapter unless
        ``"merged_base"`` is asked for. The SDK's `ttl_seconds` (it refuses them too),
        `export_precision` other than ``"source"`` and `metadata` are not supported.
        """
        identity = session_identity(name, self.session_id)
        _check_sdk_options(identity, checkpoint_type, ttl_seconds, export_precision, metadata)
        kind = self._resolve_type(identity, checkpoint_type)
        if name in self._saved_names:
            warnings.warn(
                f"snapshot name {name!r} was already saved in session {self.session_id}",
                UserWarning,
                stacklevel=2,
            )
        if self.store.exists(identity):
            raise InvalidInputError(
                f"snapshot {identity!r} already exists at {self.store.snapshot_url(identity)}; "
                "snapshots are immutable: save under a new name"
            )
        started = time.perf_counter()
        try:
            manifest = self._write(identity, kind)
        except OSError as e:  # StorageError, or a raw OSError from a third-party storage
            following = self.last_snapshot or "nothing (the next save is a base)"
            raise StorageError(
                f"saving snapshot {identity!r} to {self.storage.url} failed: {e}; nothing was "
                f"published and the next delta still applies onto {following}; make sure the "
                "storage is writable and has space, then save again"
            ) from e
        self._saved_names.add(name)
        stats = manifest.stats
        result = SaveSamplerResult(
            self.store.snapshot_url(identity),
            identity,
            checkpoint_type="delta" if manifest.kind == "delta" else "base",
            kind=manifest.kind,
            parent=manifest.parent,
            payload_bytes=int(stats.get("payload_bytes", 0)),
            full_bytes=int(stats.get("full_bytes", 0)),
            num_changed=int(stats.get("num_changed", 0)),
            seconds=time.perf_counter() - started,
        )
        logger.info(
            "saved %s snapshot %s: %d of %d bytes written in %.2fs",
            result.kind,
            identity,
            result.payload_bytes,
            result.full_bytes,
            result.seconds,
        )
        return result

    def _resolve_type(
        self, identity: str, requested: str | None
    ) -> Literal["base", "delta", "lora", "merged_base"]:
        checkpoint_type: CheckpointType | None = normalize_checkpoint_type(
            requested, where=f" for snapshot {identity!r}"
        )
        if checkpoint_type == "merged_base":
            if not self.is_lora:
                raise InvalidInputError(
                    f"checkpoint_type 'merged_base' for snapshot {identity!r} folds a LoRA "
                    "adapter into the base, but this client trains all parameters "
                    "(lora_rank=0); use 'base'"
                )
            return "merged_base"
        if self.is_lora:
            if checkpoint_type == "delta":
                logger.warning(
                    "snapshot %s: LoRA adapters are always standalone; saving it as an "
                    "adapter, not a delta",
                    identity,
                )
            return "lora"
        if checkpoint_type == "delta" and self._previous is None:
            raise self._no_parent_error(identity)
        if checkpoint_type is None:
            return "base" if self._previous is None else "delta"
        return "base" if checkpoint_type == "base" else "delta"

    def _no_parent_error(self, identity: str) -> ChainError:
        return ChainError(
            f"cannot save snapshot {identity!r} as a delta: this client (session "
            f"{self.session_id}) has no previous snapshot to apply it onto; save a base "
            "first (checkpoint_type='base' or None)"
        )

    def _write(self, identity: str, kind: str) -> Manifest:
        if kind == "lora":
            adapter = export_copy(lora.adapter_tensors(self.model), self.export_dtype)
            with write_progress(self.storage, identity, expected_bytes=num_bytes(adapter)) as out:
                return write_lora(
                    out,
                    identity,
                    adapter_tensors=adapter,
                    adapter_config=lora.adapter_config_dict(self.model),
                    checksum_format=self.checksum_format,
                    session_id=self.session_id,
                )
        if kind == "merged_base":
            merged = self._merged_weights(what=f"snapshot {identity!r}")
            return self._write_base(
                identity, merged, hf_config(self._base_model(), self.export_dtype)
            )
        if self._sharded is not None:
            return self._write_sharded(identity, kind)
        sources = self._export_plan(what=f"snapshot {identity!r}").sources
        previous = self._previous
        if kind != "base" and previous is None:
            raise self._no_parent_error(identity)
        try:
            if kind == "base" or previous is None:
                current = self._changes.export_base(sources, self._spare)
                manifest = self._write_base(
                    identity, current, hf_config(self.model, self.export_dtype)
                )
            else:
                current = self._changes.export_delta(sources, previous.tensors, self._spare).tensors
                with write_progress(
                    self.storage, identity, expected_bytes=num_bytes(current)
                ) as out:
                    manifest = write_delta(
                        out,
                        identity,
                        parent=previous.manifest,
                        old=previous.tensors,
                        new=current,
                        compression_format=self.compression_format,
                        checksum_format=self.checksum_format,
                        session_id=self.session_id,
                        # The parent was written and checksummed from these very buffers.
                        verify_old=False,
                    )
        except BaseException:
            self._changes.abandoned()
            raise
        self._changes.committed()
        # Written: these bits become the parent; the old parent's buffers are reused next.
        if self._previous is not None:
            self._spare.adopt(self._previous.tensors)
        else:
            self._spare.reserve(current)  # no old parent to reuse: the next save's buffers
        self._previous = _Previous(manifest=manifest, tensors=current)
        return manifest

    def _write_sharded(self, identity: str, kind: str) -> Manifest:
        """This rank's part of a sharded save; the chain state holds this rank's bits only."""
        assert self._sharded is not None
        previous = self._previous
        if kind == "delta" and previous is None:
            raise self._no_parent_error(identity)
        onto = None if kind == "base" else previous
        manifest, current = self._sharded.save(
            identity,
            kind,
            model=self.model,
            parent=None if onto is None else onto.manifest,
            previous=None if onto is None else onto.tensors,
            buffers=self._spare,
            config=hf_config(self.model, self.export_dtype),
            tokenizer_dir=self.tokenizer_dir,
        )
        # Written: these bits become the parent; the old parent's buffers are reused next.
        if previous is not None:
            self._spare.adopt(previous.tensors)
        else:
            self._spare.reserve(current)  # no old parent to reuse: the next save's buffers
        self._previous = _Previous(manifest=manifest, tensors=current)
        return manifest

    def _write_base(
        self, identity: str, tensors: dict[str, torch.Tensor], config: dict[str, Any]
    ) -> Manifest:
        with write_progress(self.storage, identity, expected_bytes=num_bytes(tensors)) as out:
            return write_base(
                out,
                identity,
                tensors,
                config=config,
                checksum_format=self.checksum_format,
                tokenizer_dir=self.tokenizer_dir,
                session_id=self.session_id,
            )

    # --- what a save holds -----------------------------------------------------

    def exported_weights(self) -> dict[str, torch.Tensor]:
        """A fresh CPU copy of what a snapshot saved now would hold (LoRA: the adapter)."""
        if self._sharded is not None:
            raise UnsupportedOperationError(
                "exported_weights() is not available under a sharded trainer: each rank holds "
                "only its shard and gathering the whole model is what a sharded save avoids; "
                "read a saved snapshot with SnapshotStore(...).materialize(identity) instead"
            )
        if self.is_lora:
            return export_copy(lora.adapter_tensors(self.model), self.export_dtype)
        return export_copy(self._export_plan(what="exported weights").sources, self.export_dtype)

    def _export_plan(self, *, what: str) -> ExportPlan:
        return plan_export(
            self.model.state_dict().items(), what=f"{what} of {type(self.model).__name__}"
        )

    def _base_model(self) -> Any:
        return cast(Any, self.model).get_base_model() if self.is_lora else self.model

    def _base_sources(self, *, what: str) -> dict[str, torch.Tensor]:
        return plan_export(
            lora.base_named_tensors(self.model),
            what=f"{what} of {type(self._base_model()).__name__}",
        ).sources

    def _merged_weights(self, *, what: str) -> dict[str, torch.Tensor]:
        return lora.fold_adapter(
            self._base_sources(what=what),
            lora.adapter_tensors(self.model),
            lora.adapter_config_dict(self.model),
            dtype=self.export_dtype,
            what=what,
        )

    # --- resume state -----------------------------------------------------------

    def save_state(
        self,
        name: str,
        ttl_seconds: int | None = None,
        overwrite: bool = False,
        *,
        timeout: float | None = None,
    ) -> str:
        """Save model and optimizer with torch DCP as ``{name}-{session_id}``; return its path.

        The SDK's parameters: `ttl_seconds` and `overwrite=True` are refused (as the SDK
        does); `timeout` is accepted and moot (the save is done when this returns).
        """
        identity = session_identity(name, self.session_id)
        if ttl_seconds is not None or overwrite:
            raise UnsupportedOperationError(
                f"resume state {identity!r}: ttl_seconds and overwrite=True are not supported "
                "(the Fireworks SDK refuses them too); save under a new name"
            )
        return state.save_state(self.storage, identity, self.model, self.optimizer)

    def load_state(
        self, path: str | os.PathLike[str], weights_access_token: str | None = None
    ) -> str:
        """Restore the model's weights from a resume state (a name, identity or path)."""
        _refuse_access_token(path, weights_access_token)
        return state.load_state(self.storage, path, self.model, None, session_id=self.session_id)

    def load_state_with_optimizer(
        self, path: str | os.PathLike[str], weights_access_token: str | None = None
    ) -> str:
        """Restore weights and optimizer state, so training resumes exactly where it was."""
        _refuse_access_token(path, weights_access_token)
        if self.optimizer is None:
            raise InvalidInputError(
                f"cannot load the optimizer state of {os.fspath(path)!r}: this client has no "
                "optimizer; pass optimizer= when creating it, or use load_state()"
            )
        return state.load_state(
            self.storage, path, self.model, self.optimizer, session_id=self.session_id
        )

    # --- promotion ---------------------------------------------------------------

    def promote_checkpoint(
        self,
        snapshot_name: str,
        output_dir: str | os.PathLike[str],
        *,
        materialize: bool = False,
    ) -> pathlib.Path:
        """Write a base or LoRA snapshot as a standalone Hugging Face model directory.

        A delta is refused unless `materialize=True` (then it is rebuilt from its chain).
        A LoRA snapshot is folded into this client's base weights.
        """
        identity = self._find_snapshot(snapshot_name)
        lora_base = None
        if self.is_lora:
            lora_base = LoraBase(
                base_weights=self._base_sources(what=f"base weights for {identity!r}"),
                config=hf_config(self._base_model(), self.export_dtype),
                dtype=self.export_dtype,
                tokenizer_dir=self.tokenizer_dir,
            )
        return promote(
            self.store, identity, output_dir, materialize=materialize, lora_base=lora_base
        )

    def _find_snapshot(self, snapshot_name: str) -> str:
        validate_identity(snapshot_name, what="snapshot name")
        if self.store.exists(snapshot_name):
            return snapshot_name
        mine = f"{snapshot_name}-{self.session_id}"
        if self.store.exists(mine):
            return mine
        raise SnapshotNotFoundError(
            f"no snapshot {snapshot_name!r} (nor {mine!r}) in {self.storage.url}; pass the "
            "snapshot_name that save_weights_for_sampler_ext returned"
        )


def _check_sdk_options(
    identity: str,
    checkpoint_type: str | None,
    ttl_seconds: int | None,
    export_precision: str | None,
    metadata: Any,
) -> None:
    """Refuse the SDK's save options weightsync does not implement, before anything is written."""
    if ttl_seconds is not None:
        raise UnsupportedOperationError(
            f"snapshot {identity!r}: checkpoint ttl_seconds is not supported (the Fireworks SDK "
            "refuses it too); snapshots live until removed from storage. Pass ttl_seconds=None"
        )
    if export_precision is not None:
        normalized = normalize_checkpoint_type(checkpoint_type)
        if normalized != "merged_base":
            raise InvalidInputError(
                f"snapshot {identity!r}: export_precision requires checkpoint_type='merged_base'"
            )
        if export_precision.lower() != "source":
            raise UnsupportedOperationError(
                f"snapshot {identity!r}: export_precision {export_precision!r} is not supported; "
                "a merged base is written in the client's export_dtype ('source'). Pass None"
            )
    if metadata is not None:
        raise UnsupportedOperationError(
            f"snapshot {identity!r}: sampler checkpoint metadata (decision calibration) is not "
            "supported by weightsync's TrainingClient. Pass metadata=None"
        )


def _refuse_access_token(name: str | os.PathLike[str], token: str | None) -> None:
    if token is not None:
        raise UnsupportedOperationError(
            f"resume state {os.fspath(name)!r}: weights_access_token is not supported (the "
            "Fireworks SDK refuses it too); states are read from this client's storage"
        )


def _tokenizer_dir(tokenizer_dir: str | os.PathLike[str] | None) -> pathlib.Path | None:
    if tokenizer_dir is None:
        return None
    path = pathlib.Path(tokenizer_dir).expanduser()
    if not path.is_dir():
        raise InvalidInputError(f"tokenizer_dir {path} is not a directory")
    return path


def _check_optimizer_trains(optimizer: torch.optim.Optimizer | None, model: Any) -> None:
    """Refuse an optimizer built before LoRA wrapping: it would hold no adapter weights."""
    if optimizer is None:
        return
    held = {id(p) for group in optimizer.param_groups for p in group["params"]}
    trainable = [p for p in model.parameters() if p.requires_grad]
    if not any(id(p) in held for p in trainable):
        raise InvalidInputError(
            "the optimizer holds none of the LoRA adapter's parameters (it was built before "
            "the client wrapped the model); create the client without optimizer=, build the "
            "optimizer over client.model's trainable parameters and set client.optimizer, "
            "or wrap the model with peft yourself before creating both"
        )
