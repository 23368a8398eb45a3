"""Which replicas a gateway fronts, and which of them may take traffic.

A gateway over local replica processes has a fixed set, all admitted
(`StaticMembership`). An elastic deployment (replicas as Ray actors that come,
go and restart; `elastic_membership.ElasticMembership`) admits a replica only
once it serves the deployment's head. The gateway asks its membership on every
request; it never keeps a list of its own.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from dataclasses import dataclass
from typing import Any, Protocol

from weightsync.wire import DeploymentMembership, HotLoadRequest, MemberState


@dataclass(frozen=True, kw_only=True)
class Member:
    """One replica as the gateway sees it: where it answers (None while it is missing)."""

    replica_id: str
    url: str | None
    #: Its standing in an elastic deployment; None in a fixed pool (always admitted).
    state: MemberState | None = None
    #: Why it is missing or not admitted yet, in words (for status).
    problem: str | None = None


class Membership(Protocol):
    """What the gateway asks about its replicas (one implementation per kind of deployment)."""

    def members(self) -> list[Member]:
        """Every replica, admitted ones first (the Fireworks SDK reads the first status entry)."""
        ...

    def serving(self) -> list[Member]:
        """The replicas inference and hot-loads go to."""
        ...

    def hot_load_round(self) -> AbstractAsyncContextManager[list[Member]]:
        """Hold admissions still while one hot-load fans out; yields the replicas it goes to."""
        ...

    def accepted(self, request: HotLoadRequest, body: dict[str, Any]) -> None:
        """Every replica of the round accepted `request` (inside `hot_load_round`)."""
        ...

    def lost(self, replica_ids: set[str]) -> None:
        """Replicas a hot-load round could not reach (inside `hot_load_round`)."""
        ...

    def view(self) -> DeploymentMembership | None:
        """Who counts as "every replica" right now (None where all are, always)."""
        ...

    def adapters(self) -> frozenset[str]:
        """LoRA adapters the deployment loaded that a serving replica may lack (a request
        naming one goes only to the replicas `holding` it); empty where none can lack one."""
        ...

    def holding(self, adapter: str) -> list[Member]:
        """The serving replicas whose last reported status lists LoRA adapter `adapter`."""
        ...


class StaticMembership:
    """A fixed set of replica processes, all admitted (`weightsync serve --replicas N`)."""

    def __init__(self, replica_urls: list[str], replica_ids: list[str]) -> None:
        self._members = [
            Member(replica_id=replica_id, url=url)
            for replica_id, url in zip(replica_ids, replica_urls, strict=True)
        ]

    def members(self) -> list[Member]:
        return list(self._members)

    def serving(self) -> list[Member]:
        return list(self._members)

    @asynccontextmanager
    async def _round(self) -> AsyncIterator[list[Member]]:
        yield list(self._members)

    def hot_load_round(self) -> AbstractAsyncContextManager[list[Member]]:
        return self._round()

    def accepted(self, request: HotLoadRequest, body: dict[str, Any]) -> None:
        """Nothing to record: a fixed pool's replicas keep their own ledgers."""

    def lost(self, replica_ids: set[str]) -> None:
        """Nothing to withdraw: a fixed pool answers with the unreachable replica's 503."""

    def view(self) -> DeploymentMembership | None:
        return None

    def adapters(self) -> frozenset[str]:
        """None to route by: every replica of the pool was sent every adapter's hot-load (one
        that unloaded an adapter since refuses a request naming it, 404)."""
        return frozenset()

    def holding(self, adapter: str) -> list[Member]:
        return []
