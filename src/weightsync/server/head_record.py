"""The head of an elastic deployment: the chain of hot-loads it accepted, kept on disk.

A replica that joins late, or that Ray restarts after a crash, catches up by
replaying this chain from where it stands (its ledger's last verified load, or
the snapshot it was started from) — or from the chain's first link, a base,
when what it serves is not in the chain. The record starts with the snapshot
the deployment was started from; a delta's hot-load appends a link, a base's
hot-load starts a new chain. Beside the chain it keeps the LoRA adapters the
deployment loaded (the newest `max_adapters`, as each replica keeps them), which
a joining replica loads, verified, once it serves the head. It is written to a
temporary name and renamed, so a gateway that restarts (or a crash mid-write)
finds the last whole record.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from weightsync.errors import DeploymentError
from weightsync.wire import HotLoadRequest

#: Version 2 added `adapters`; a version-1 record (no adapters) still loads.
HEAD_RECORD_VERSION = 2
READABLE_VERSIONS = (1, 2)


@dataclass(frozen=True, kw_only=True)
class RecordedLoad:
    """One accepted load: its identity and the request body that loads it (replayed verbatim)."""

    identity: str
    request: dict[str, Any]


@dataclass(frozen=True, kw_only=True)
class HeadRecord:
    """The accepted chain, oldest first: `links[0]` is a base, each later link a delta on the
    one before it. `head` is the identity every admitted replica must reach. `adapters` are
    the LoRA adapters loaded beside it, least recently loaded first."""

    links: tuple[RecordedLoad, ...]
    adapters: tuple[RecordedLoad, ...] = ()

    @classmethod
    def starting_at(cls, identity: str) -> HeadRecord:
        """The record of a deployment started from snapshot `identity`."""
        return cls(links=(RecordedLoad(identity=identity, request={"identity": identity}),))

    @property
    def head(self) -> str:
        return self.links[-1].identity

    @property
    def previous(self) -> str | None:
        """The identity before the head (None when the head is the chain's base)."""
        return self.links[-2].identity if len(self.links) > 1 else None

    def position(self, identity: str | None) -> int | None:
        """Where `identity` is in the chain (0 = its base), or None when it is not in it."""
        for i in range(len(self.links) - 1, -1, -1):
            if self.links[i].identity == identity:
                return i
        return None

    @property
    def adapter_identities(self) -> list[str]:
        return [adapter.identity for adapter in self.adapters]

    def next_link(self, current: str | None) -> RecordedLoad | None:
        """The load that moves a replica serving `current` one step toward the head.

        None when `current` is the head; the chain's base when `current` is not in it.
        """
        position = self.position(current)
        if position is None:
            return self.links[0]
        if position == len(self.links) - 1:
            return None
        return self.links[position + 1]

    def next_load(self, current: str | None, loaded_adapters: list[str]) -> RecordedLoad | None:
        """What a replica serving `current` with `loaded_adapters` loads next to match the
        deployment: the chain's next link, then each recorded adapter it lacks (oldest first);
        None when it serves the head with every recorded adapter."""
        link = self.next_link(current)
        if link is not None:
            return link
        return next((a for a in self.adapters if a.identity not in loaded_adapters), None)

    def missing_adapters(self, loaded_adapters: list[str]) -> list[str]:
        """The recorded adapters that are not in `loaded_adapters`."""
        return [a for a in self.adapter_identities if a not in loaded_adapters]

    def adapter_loaded(
        self, request: HotLoadRequest, body: dict[str, Any], *, max_adapters: int
    ) -> HeadRecord:
        """The record after the admitted replicas accepted adapter `request` (sent as `body`).

        It becomes the newest adapter; past `max_adapters` the least recently loaded is
        dropped, as each replica unloads its least recently used one. The chain is unchanged.
        """
        if self.adapters and self.adapters[-1].identity == request.identity:
            return self  # a retried load
        kept = [a for a in self.adapters if a.identity != request.identity]
        kept.append(RecordedLoad(identity=request.identity, request=body))
        return HeadRecord(links=self.links, adapters=tuple(kept[-max_adapters:]))

    def adapters_kept(self, served: set[str]) -> HeadRecord:
        """The record without the adapters not in `served` (self when it keeps them all)."""
        kept = tuple(a for a in self.adapters if a.identity in served)
        return self if kept == self.adapters else HeadRecord(links=self.links, adapters=kept)

    def accepted(self, request: HotLoadRequest, body: dict[str, Any]) -> HeadRecord:
        """The record after every admitted replica accepted `request` (sent as `body`).

        A delta on the head is appended; a base starts a new chain; the head again
        (a retried request) changes nothing. A delta whose parent is not the head
        never reaches here: the replicas serving the head refuse it (409). The adapters
        stay: a base must be the same model, and replicas load it under their adapters.
        """
        if request.identity == self.head:
            return self
        link = RecordedLoad(identity=request.identity, request=body)
        if request.incremental_snapshot_metadata is None:
            return HeadRecord(links=(link,), adapters=self.adapters)
        return HeadRecord(links=(*self.links, link), adapters=self.adapters)

    def to_json(self) -> str:
        def listed(loads: tuple[RecordedLoad, ...]) -> list[dict[str, Any]]:
            return [{"identity": load.identity, "request": load.request} for load in loads]

        return json.dumps(
            {
                "version": HEAD_RECORD_VERSION,
                "links": listed(self.links),
                "adapters": listed(self.adapters),
            },
            indent=1,
        )

    @classmethod
    def from_json(cls, text: str, *, where: str) -> HeadRecord:
        def loads(items: list[Any]) -> tuple[RecordedLoad, ...]:
            return tuple(
                RecordedLoad(identity=str(item["identity"]), request=dict(item["request"]))
                for item in items
            )

        try:
            data = json.loads(text)
            if data.get("version") not in READABLE_VERSIONS:
                raise ValueError(
                    f"version {data.get('version')!r}, expected one of {READABLE_VERSIONS}"
                )
            links = loads(data["links"])
            adapters = loads(data.get("adapters", []))
            if not links:
                raise ValueError("no links")
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            raise DeploymentError(
                f"head record {where} is unreadable ({e}); delete it to restart the deployment "
                "from its start snapshot"
            ) from e
        return cls(links=links, adapters=adapters)


class HeadRecordFile:
    """The head record at `path`, written by the gateway only (one writer)."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)

    def load(self, *, start_identity: str) -> HeadRecord:
        """The recorded head, or a new record starting at `start_identity` (written now)."""
        try:
            text = self.path.read_text()
        except FileNotFoundError:
            record = HeadRecord.starting_at(start_identity)
            self.save(record)
            return record
        except OSError as e:
            raise DeploymentError(f"cannot read the head record {self.path}: {e}") from e
        return HeadRecord.from_json(text, where=str(self.path))

    def save(self, record: HeadRecord) -> None:
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}.tmp")
            tmp.write_text(record.to_json() + "\n")
            tmp.replace(self.path)
        except OSError as e:
            raise DeploymentError(
                f"cannot write the head record {self.path}: {e}; give the gateway a writable "
                "--state-dir"
            ) from e
