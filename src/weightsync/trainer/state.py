"""Resume state: model and optimizer saved and loaded with `torch.distributed.checkpoint`.

A state lives under ``<storage root>/states/<name>-<session_id>/`` in DCP's own
layout (DCP writes its `.metadata` last, so a state without it is incomplete).
It works on one process without a process group and inside an initialized one
(every rank calls it). Local storage uses DCP's file-system writer; object stores
its fsspec writer.
"""

from __future__ import annotations

import contextlib
import logging
import os
import pathlib
import re
import warnings
from collections.abc import Iterator
from typing import Any

import torch
import torch.distributed as dist
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.filesystem import FileSystemReader, FileSystemWriter
from torch.distributed.checkpoint.state_dict import (
    get_model_state_dict,
    get_state_dict,
    set_model_state_dict,
    set_state_dict,
)
from torch.distributed.checkpoint.state_dict_loader import load as dcp_load
from torch.distributed.checkpoint.state_dict_saver import save as dcp_save
from torch.distributed.checkpoint.storage import StorageReader, StorageWriter

from weightsync.errors import InvalidInputError, SnapshotNotFoundError, StorageError
from weightsync.identity import validate_identity
from weightsync.storage import Storage

logger = logging.getLogger(__name__)

STATES_DIR = "states"
_METADATA_FILE = ".metadata"
_SESSION_SUFFIX = re.compile(r"-[0-9a-f]{8}$")


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


@contextlib.contextmanager
def _single_process_quietly() -> Iterator[None]:
    # DCP warns that it "assumes" a single process when none is initialized; here
    # that is the documented intent, not a guess.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        yield


def _writer(location: str, storage: Storage) -> StorageWriter:
    if "://" not in location:
        return FileSystemWriter(location)
    from torch.distributed.checkpoint._fsspec_filesystem import FsspecWriter

    return FsspecWriter(location, **_storage_options(storage))


def _reader(location: str, storage: Storage) -> StorageReader:
    if "://" not in location:
        return FileSystemReader(location)
    from torch.distributed.checkpoint._fsspec_filesystem import FsspecReader

    return FsspecReader(location, **_storage_options(storage))


def _storage_options(storage: Storage) -> dict[str, Any]:
    fs = getattr(storage, "fs", None)
    return dict(getattr(fs, "storage_options", {}) or {})


def save_state(
    storage: Storage,
    identity: str,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer | None,
) -> str:
    """Write the model (and optimizer) state under `states/<identity>`; return its location."""
    location = state_location(storage, identity)
    if optimizer is None:
        state: dict[str, Any] = {"model": get_model_state_dict(model)}
    else:
        model_state, optim_state = get_state_dict(model, optimizer)
        state = {"model": model_state, "optimizer": optim_state}
    try:
        if "://" not in location:
            pathlib.Path(location).mkdir(parents=True, exist_ok=True)
        with _single_process_quietly():
            dcp_save(state, storage_writer=_writer(location, storage), no_dist=not _distributed())
    except (OSError, CheckpointException) as e:
        raise StorageError(
            f"cannot save resume state {identity!r} to {location}: {e}; check that the "
            "storage is writable and has space, then save again"
        ) from e
    logger.info("saved resume state %s to %s", identity, location)
    return location


def load_state(
    storage: Storage,
    name_or_location: str | os.PathLike[str],
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer | None,
    *,
    session_id: str,
) -> str:
    """Restore the model (and, when given, the optimizer) in place; return the location."""
    location = resolve_state(storage, name_or_location, session_id=session_id)
    if optimizer is None:
        model_state = get_model_state_dict(model)
        state: dict[str, Any] = {"model": model_state}
    else:
        model_state, optim_state = get_state_dict(model, optimizer)
        state = {"model": model_state, "optimizer": optim_state}
    try:
        with _single_process_quietly():
            dcp_load(state, storage_reader=_reader(location, storage), no_dist=not _distributed())
    except (OSError, CheckpointException, RuntimeError) as e:
        what = "model and optimizer" if optimizer is not None else "model"
        raise InvalidInputError(
            f"cannot load the {what} from resume state {location}: {e}; the state must come "
            "from the same model architecture (and, with the optimizer, the same optimizer "
            "type and parameter groups)"
        ) from e
    if optimizer is None:
        set_model_state_dict(model, state["model"])
    else:
        set_state_dict(
            model,
            optimizer,
            model_state_dict=state["model"],
            optim_state_dict=state["optimizer"],
        )
    logger.info("loaded resume state from %s", location)
    return location


def state_location(storage: Storage, identity: str) -> str:
    return storage.child_url(STATES_DIR, validate_identity(identity, what="state name"))


def resolve_state(
    storage: Storage, name_or_location: str | os.PathLike[str], *, session_id: str
) -> str:
    """Find a complete state from a location, an identity, or a name saved by any session.

    A bare name is tried as an identity, then as this session's `{name}-{session_id}`,
    then as the only `{name}-<session>` under `states/`.
    """
    if isinstance(name_or_location, os.PathLike) or pathlib.Path(name_or_location).is_absolute():
        location = os.fspath(name_or_location)
        if not (pathlib.Path(location) / _METADATA_FILE).exists():
            raise SnapshotNotFoundError(
                f"no complete resume state at {location} (its {_METADATA_FILE} is missing)"
            )
        return location
    if "://" in name_or_location:
        return name_or_location
    name = validate_identity(name_or_location, what="state name")
    candidates = [name, f"{name}-{session_id}"]
    if not _SESSION_SUFFIX.search(name):
        candidates += _other_sessions(storage, name)
    complete = [c for c in dict.fromkeys(candidates) if _is_complete(storage, c)]
    if len(complete) > 1 and complete[0] != name and complete[0] != f"{name}-{session_id}":
        raise InvalidInputError(
            f"resume state name {name!r} matches states of several sessions: "
            f"{', '.join(complete)}; pass the full name returned by save_state"
        )
    if not complete:
        raise SnapshotNotFoundError(
            f"no resume state named {name!r} under {storage.child_url(STATES_DIR)}; pass the "
            "name or path that save_state returned"
        )
    return state_location(storage, complete[0])


def _other_sessions(storage: Storage, name: str) -> list[str]:
    try:
        entries = storage.list_dir(STATES_DIR)
    except FileNotFoundError:
        return []
    prefix = f"{name}-"
    return [
        e for e in entries if e.startswith(prefix) and _SESSION_SUFFIX.fullmatch(e[len(name) :])
    ]


def _is_complete(storage: Storage, identity: str) -> bool:
    return storage.exists(f"{STATES_DIR}/{identity}/{_METADATA_FILE}")
