"""Admission in an elastic deployment: replicas come, go and restart; only those at the head serve.

A reconciler thread keeps the gateway's view of the replicas current. Each round
it asks the `EndpointSource` (the Ray actors) where every replica answers, reads
each replica's hot-load status, and then:

    missing ──(answers)──► catching_up ──(serves the head, idle)──► admitted
       ▲                        ▲  │ replays the chain's next load      │
       └──(gone / restarted)────┴──┴────(falls behind the allowance)────┘

An admitted replica stays admitted while it serves a version of the chain no
further behind the newest one an admitted replica serves than the transition
allows (`async`: one version, the one it serves while it loads the next; `sync`:
none). A replica that is behind — late, restarted from its ledger or its start
snapshot, or one that missed a load — is sent the chain's next load, one at a
time, from the `HeadRecord`, until it serves the head — and then each LoRA adapter
the record lists that it lacks, so a completion naming an adapter is never answered
by a replica that would serve it with base weights. Each replica verifies what it
loads on its own, from the shared storage. Replicas keep their newest adapters by
use, so admitted ones can still differ in which they hold: the published view says
which admitted replicas hold each adapter, and the gateway sends a completion naming
one only to those (`holding`).

Hot-loads and admission never interleave: the gateway holds `hot_load_round`
while it fans a hot-load out to the admitted replicas, and the reconciler holds
the same lock while it admits; so a replica admitted at the head always gets
every later hot-load.
"""

from __future__ import annotations

import asyncio
import logging
import re
import threading
import time
from collections import OrderedDict
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from dataclasses import dataclass, field
from typing import Any, Protocol

import httpx
from pydantic import ValidationError

from weightsync.errors import HotloadTimeoutError
from weightsync.server.config import DEFAULT_MAX_ADAPTERS
from weightsync.server.head_record import HeadRecord, HeadRecordFile
from weightsync.server.membership import Member
from weightsync.wire import (
    AUTHORIZATION_HEADER,
    HOT_LOAD_PATH,
    LOADING_STAGES,
    DeploymentMembership,
    HotLoadRequest,
    HotLoadStatus,
    MemberState,
    ReplicaStatus,
    Transition,
)

logger = logging.getLogger(__name__)

DEFAULT_POLL_INTERVAL_S = 0.2
STATUS_TIMEOUT_S = 5.0
#: Replicas polled (and sent catch-up loads) at once in a round: a hung one costs a round
#: its status timeout once, not once per replica behind it.
MAX_CONCURRENT_POLLS = 16
#: Wait before resending a catch-up load that did not take (doubles up to the maximum).
CATCH_UP_RETRY_S = 1.0
CATCH_UP_RETRY_MAX_S = 30.0
#: LoRA adapters remembered as the deployment's (names only, newest kept) once the head
#: record dropped them: a request naming one is refused rather than answered by the base.
ADAPTERS_REMEMBERED = 4096


@dataclass(frozen=True, kw_only=True)
class Endpoint:
    """Where one replica answers now; `incarnation` changes whenever its process restarts."""

    replica_id: str
    url: str | None
    incarnation: str | None = None
    #: Why there is no URL (the node is gone, Ray is restarting it, ...).
    problem: str | None = None


class EndpointSource(Protocol):
    """The replicas a deployment runs, wherever they run (Ray actors, ...)."""

    def endpoints(self) -> list[Endpoint]: ...


@dataclass(kw_only=True)
class _Tracked:
    replica_id: str
    url: str | None = None
    incarnation: str | None = None
    admitted: bool = False
    status: ReplicaStatus | None = None
    problem: str | None = None
    sent_identity: str | None = None
    sent_at: float = 0.0
    #: Why the last catch-up load did not take (kept until the replica moves on).
    catch_up_problem: str | None = None
    retry_s: float = CATCH_UP_RETRY_S


@dataclass(frozen=True, kw_only=True)
class _Published:
    """What the gateway reads, replaced whole (never edited) after each change."""

    members: list[Member]
    view: DeploymentMembership
    #: Every adapter a replica may be asked for, and the admitted replicas holding each.
    adapters: frozenset[str] = frozenset()
    holders: dict[str, list[Member]] = field(default_factory=dict)


def _replica_order(replica_id: str) -> tuple[str, int]:
    match = re.fullmatch(r"(.*?)(\d+)", replica_id)
    return (match.group(1), int(match.group(2))) if match else (replica_id, -1)


class ElasticMembership:
    """The `Membership` of a deployment whose replicas an `EndpointSource` runs."""

    def __init__(
        self,
        source: EndpointSource,
        head_file: HeadRecordFile,
        *,
        start_identity: str,
        transition: Transition,
        api_key: str | None = None,
        poll_interval_s: float = DEFAULT_POLL_INTERVAL_S,
        is_adapter: Callable[[str], bool] | None = None,
        max_adapters: int = DEFAULT_MAX_ADAPTERS,
    ) -> None:
        """`is_adapter(identity)` tells a LoRA adapter's hot-load from a base or delta (an
        adapter does not move the head: replicas keep serving their base under it; it is
        recorded beside the head, the newest `max_adapters` — the replicas' own limit)."""
        self.source = source
        self.is_adapter = is_adapter
        self.max_adapters = max_adapters
        self.head_file = head_file
        self.transition = transition
        self.poll_interval_s = poll_interval_s
        self._record = head_file.load(start_identity=start_identity)
        #: The adapters this deployment accepted, oldest first (the record keeps the newest).
        self._adapters_seen: OrderedDict[str, None] = OrderedDict.fromkeys(
            self._record.adapter_identities
        )
        #: Bumped whenever the record changes (statuses polled before it may not show it).
        self._generation = 0
        self._headers = {AUTHORIZATION_HEADER: f"Bearer {api_key}"} if api_key else {}
        self._tracked: dict[str, _Tracked] = {}
        # Held by a hot-load's fan-out and by each admission pass (never across a status poll).
        self._round_lock = threading.Lock()
        self._published = _Published(members=[], view=self._view([]))
        self._stop = threading.Event()
        self._changed = threading.Condition()
        self._thread: threading.Thread | None = None
        self._client = httpx.Client(
            timeout=STATUS_TIMEOUT_S,
            limits=httpx.Limits(max_connections=MAX_CONCURRENT_POLLS),
        )
        self._pool = ThreadPoolExecutor(
            max_workers=MAX_CONCURRENT_POLLS, thread_name_prefix="membership-poll"
        )

    # --- what the gateway asks ------------------------------------------------

    @property
    def record(self) -> HeadRecord:
        return self._record

    def members(self) -> list[Member]:
        return list(self._published.members)

    def serving(self) -> list[Member]:
        return [m for m in self._published.members if m.state == "admitted"]

    def view(self) -> DeploymentMembership:
        return self._published.view

    def adapters(self) -> frozenset[str]:
        """Every LoRA adapter a replica of this deployment may be asked for: those it
        accepted (the newest `ADAPTERS_REMEMBERED`) and those any replica reports loaded.
        Replicas keep their newest by use, so the admitted ones can differ in which they
        hold, and one that joined late never loaded those the record had dropped."""
        return self._published.adapters

    def holding(self, adapter: str) -> list[Member]:
        """The admitted replicas whose last polled status lists `adapter` loaded."""
        return list(self._published.holders.get(adapter, ()))

    @asynccontextmanager
    async def _round(self) -> AsyncIterator[list[Member]]:
        await asyncio.to_thread(self._round_lock.acquire)
        try:
            yield self.serving()
        finally:
            self._round_lock.release()

    def hot_load_round(self) -> AbstractAsyncContextManager[list[Member]]:
        return self._round()

    def accepted(self, request: HotLoadRequest, body: dict[str, Any]) -> None:
        """Record the new head, or the new adapter, durably (before any replica could be
        admitted with it)."""
        if self.is_adapter is not None and self.is_adapter(request.identity):
            record = self._record.adapter_loaded(request, body, max_adapters=self.max_adapters)
            self._adapters_seen.pop(request.identity, None)
            self._adapters_seen[request.identity] = None
            while len(self._adapters_seen) > ADAPTERS_REMEMBERED:
                self._adapters_seen.popitem(last=False)
            what = f"adapter {request.identity} recorded; the head stays {record.head}"
        else:
            record = self._record.accepted(request, body)
            what = f"deployment head is now {record.head}"
        if record is not self._record:
            self._save(record)
            logger.info("%s", what)
        self._publish()

    def _save(self, record: HeadRecord) -> None:
        self.head_file.save(record)
        self._record = record
        self._generation += 1

    def lost(self, replica_ids: set[str]) -> None:
        """Replicas a hot-load could not reach: withdrawn until the reconciler sees them again."""
        for replica_id in replica_ids:
            tracked = self._tracked.get(replica_id)
            if tracked is not None:
                tracked.admitted = False
                tracked.status = None
                tracked.problem = "unreachable during a hot-load"
        self._publish()

    # --- the reconciler --------------------------------------------------------

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="membership", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(30.0)
        self._pool.shutdown(wait=True, cancel_futures=True)
        self._client.close()

    def wait_until(self, *, num_admitted: int, timeout_s: float) -> DeploymentMembership:
        """Block until `num_admitted` replicas serve the head; the view then."""
        deadline = time.monotonic() + timeout_s
        with self._changed:
            while len(self.view().admitted) < num_admitted:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise HotloadTimeoutError(
                        f"{len(self.view().admitted)} of {num_admitted} replicas serve the head "
                        f"{self._record.head!r} after {timeout_s:g}s: {self._describe()}"
                    )
                self._changed.wait(min(left, 1.0))
        return self.view()

    def wait_until_absent(self, replica_id: str, *, timeout_s: float) -> None:
        """Block until the published view no longer lists `replica_id` (scaled down)."""
        deadline = time.monotonic() + timeout_s
        with self._changed:
            while any(m.replica_id == replica_id for m in self.members()):
                left = deadline - time.monotonic()
                if left <= 0:
                    raise HotloadTimeoutError(
                        f"{replica_id} is still listed {timeout_s:g}s after it was scaled down"
                    )
                self._changed.wait(min(left, 1.0))

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.reconcile()
            except Exception:  # the reconciler must outlive one bad round; it is logged
                logger.exception("membership round failed; retrying")
            self._stop.wait(self.poll_interval_s)

    def reconcile(self) -> None:
        """One round: refresh endpoints and statuses, admit or withdraw, send catch-up loads."""
        generation = self._generation
        endpoints = self.source.endpoints()
        reachable = [e for e in endpoints if e.url is not None]
        polled = self._pool.map(self._poll, reachable)
        statuses = {e.replica_id: status for e, status in zip(reachable, polled, strict=True)}
        with self._round_lock:
            self._refresh(endpoints, statuses)
            if generation == self._generation:
                # Else a hot-load was recorded after these statuses were read: the admitted
                # replicas may not show it yet, so nobody is admitted on them.
                self._forget_unserved_adapters()
                self._admit()
            # Each call touches its own replica's entry only.
            list(self._pool.map(self._catch_up, list(self._tracked.values())))
            self._publish()

    def _poll(self, endpoint: Endpoint) -> ReplicaStatus | str:
        try:
            answer = self._client.get(f"{endpoint.url}{HOT_LOAD_PATH}", headers=self._headers)
            answer.raise_for_status()
            entries = HotLoadStatus.model_validate(answer.json()).replicas
        except (httpx.HTTPError, ValueError, ValidationError) as e:
            return f"status unreadable at {endpoint.url}: {e}"
        return entries[0] if entries else f"no status entry at {endpoint.url}"

    def _refresh(self, endpoints: list[Endpoint], statuses: dict[str, ReplicaStatus | str]) -> None:
        known = {e.replica_id for e in endpoints}
        for gone in set(self._tracked) - known:
            del self._tracked[gone]  # scaled down
        for endpoint in endpoints:
            tracked = self._tracked.setdefault(
                endpoint.replica_id, _Tracked(replica_id=endpoint.replica_id)
            )
            if endpoint.incarnation != tracked.incarnation or endpoint.url != tracked.url:
                if tracked.incarnation is not None:
                    logger.warning("%s restarted or moved; catching it up", endpoint.replica_id)
                fresh = _Tracked(replica_id=endpoint.replica_id, incarnation=endpoint.incarnation)
                self._tracked[endpoint.replica_id] = tracked = fresh
            tracked.url = endpoint.url
            polled = statuses.get(endpoint.replica_id, endpoint.problem or "no endpoint")
            if isinstance(polled, str):
                tracked.status, tracked.problem, tracked.admitted = None, polled, False
            else:
                tracked.status, tracked.problem = polled, None

    def _forget_unserved_adapters(self) -> None:
        """Drop the recorded adapters that no admitted replica holds or is loading: their load
        failed everywhere, or every replica unloaded them. A joining replica is not held
        back by an adapter the deployment does not serve."""
        admitted = [t.status for t in self._tracked.values() if t.admitted and t.status]
        if not admitted or not self._record.adapters:
            return
        served: set[str] = set()
        for status in admitted:
            served.update(status.adapter_identities())
            loading = status.loading_state
            if loading.stage in LOADING_STAGES and loading.target_snapshot_identity is not None:
                served.add(loading.target_snapshot_identity)
        record = self._record.adapters_kept(served)
        if record is not self._record:
            gone = sorted(set(self._record.adapter_identities) - served)
            logger.warning(
                "adapters %s are served by no admitted replica (their load failed, or each "
                "unloaded them); replicas that join will not load them",
                ", ".join(gone),
            )
            self._save(record)

    def _lag(self, identity: str | None) -> int | None:
        """Versions behind the head (0 = at it), or None when `identity` is not in the chain."""
        position = self._record.position(identity)
        return None if position is None else len(self._record.links) - 1 - position

    @staticmethod
    def _serves(t: _Tracked) -> bool:
        """Whether `t` serves, verified, what its status names. A replica is not ready while
        its load swaps and checks the new weights; an admitted one stays admitted through
        those moments (requests wait for the swap there), or each hot-load would withdraw
        it, and admitting it again would reload the record's adapters, undoing its own
        choice of which to keep."""
        status = t.status
        if status is None or status.current_snapshot_identity is None:
            return False
        mid_load = status.loading_state.stage in LOADING_STAGES
        return status.readiness or (t.admitted and mid_load)

    def _admit(self) -> None:
        allowance = 1 if self.transition == "async" else 0
        serving = [
            lag
            for t in self._tracked.values()
            if t.admitted and t.status is not None and self._serves(t)
            for lag in [self._lag(t.status.current_snapshot_identity)]
            if lag is not None
        ]
        newest = min(serving, default=0)
        for t in self._tracked.values():
            status = t.status
            if status is None or not self._serves(t):
                if t.admitted:
                    logger.info("%s withdrawn: not ready", t.replica_id)
                t.admitted = False
                continue
            lag = self._lag(status.current_snapshot_identity)
            idle = status.loading_state.stage not in LOADING_STAGES
            was = t.admitted
            if was:
                # It was in every adapter's round since it was admitted: only its version
                # can take it out.
                t.admitted = lag is not None and lag <= newest + allowance
            else:
                lacks = self._record.missing_adapters(status.adapter_identities())
                t.admitted = lag == 0 and idle and not lacks
            if t.admitted != was:
                logger.info(
                    "%s %s at %s", t.replica_id, "admitted" if t.admitted else "withdrawn",
                    status.current_snapshot_identity,
                )  # fmt: skip

    def _catch_up(self, t: _Tracked) -> None:
        status = t.status
        if status is None or t.url is None or status.loading_state.stage in LOADING_STAGES:
            return
        if t.admitted:
            # Only the chain: adapters reach it through the hot-loads' fan-out, and its own
            # least-recently-used choice of which to keep is not undone here.
            link = self._record.next_link(status.current_snapshot_identity)
        else:
            link = self._record.next_load(
                status.current_snapshot_identity, status.adapter_identities()
            )
        if link is None:
            t.sent_identity, t.retry_s, t.catch_up_problem = None, CATCH_UP_RETRY_S, None
            return
        if t.sent_identity not in (None, link.identity):
            t.retry_s, t.catch_up_problem = CATCH_UP_RETRY_S, None  # the last one took
        now = time.monotonic()
        if t.sent_identity == link.identity:
            if now - t.sent_at < t.retry_s:
                return  # sent, and not taken yet (or it failed): wait before resending
            t.retry_s = min(t.retry_s * 2, CATCH_UP_RETRY_MAX_S)
        t.sent_identity, t.sent_at = link.identity, now
        logger.info(
            "%s serves %s; catching up with %s",
            t.replica_id,
            status.current_snapshot_identity,
            link.identity,
        )
        try:
            answer = self._client.post(
                f"{t.url}{HOT_LOAD_PATH}", json=link.request, headers=self._headers
            )
        except httpx.HTTPError as e:
            t.catch_up_problem = f"catch-up load of {link.identity!r} unreachable: {e}"
            return
        if answer.status_code >= 400:
            t.catch_up_problem = (
                f"catch-up load of {link.identity!r} refused ({answer.status_code}): "
                f"{answer.text[:300]}"
            )
            logger.warning("%s: %s", t.replica_id, t.catch_up_problem)

    # --- the published view ------------------------------------------------------

    def _state(self, t: _Tracked) -> MemberState:
        if t.url is None or t.status is None:
            return "missing"
        return "admitted" if t.admitted else "catching_up"

    def _publish(self) -> None:
        rank = {"admitted": 0, "catching_up": 1, "missing": 2}
        tracked = sorted(
            self._tracked.values(),
            key=lambda t: (rank[self._state(t)], _replica_order(t.replica_id)),
        )
        members = [
            Member(
                replica_id=t.replica_id,
                url=t.url if t.status is not None else None,
                state=self._state(t),
                problem=t.problem or t.catch_up_problem,
            )
            for t in tracked
        ]
        holders: dict[str, list[Member]] = {}
        adapters = set(self._adapters_seen)
        for t, member in zip(tracked, members, strict=True):
            loaded = t.status.adapter_identities() if t.status is not None else []
            adapters.update(loaded)
            if member.state == "admitted":
                for adapter in loaded:
                    holders.setdefault(adapter, []).append(member)
        self._published = _Published(
            members=members,
            view=self._view(members),
            adapters=frozenset(adapters),
            holders=holders,
        )
        with self._changed:
            self._changed.notify_all()

    def _view(self, members: list[Member]) -> DeploymentMembership:
        return DeploymentMembership(
            head_snapshot_identity=self._record.head,
            admitted=[m.replica_id for m in members if m.state == "admitted"],
            catching_up=[m.replica_id for m in members if m.state == "catching_up"],
            missing=[m.replica_id for m in members if m.state == "missing"],
        )

    def _describe(self) -> str:
        parts = []
        for t in sorted(self._tracked.values(), key=lambda t: _replica_order(t.replica_id)):
            current = t.status.current_snapshot_identity if t.status is not None else None
            problem = t.problem or t.catch_up_problem or "ok"
            if t.status is not None and not t.admitted:
                lacks = self._record.missing_adapters(t.status.adapter_identities())
                problem += f"; lacks adapters {', '.join(lacks)}" if lacks else ""
            parts.append(f"{t.replica_id} {self._state(t)} at {current} ({problem})")
        return "; ".join(parts) or "no replicas"
