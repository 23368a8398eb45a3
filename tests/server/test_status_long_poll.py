"""The hot-load status long-poll (`?wait_s=`): answered when the load ends, bounded, and the
wait of weightsync's DeploymentManager built on it (with its fallback to polling)."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest

from _support.chain import Chain
from _support.serving import hot_load
from weightsync.deployment.manager import DeploymentManager
from weightsync.server.app import create_app
from weightsync.server.config import ReplicaConfig
from weightsync.server.replica import Replica
from weightsync.server.runner import ServerThread
from weightsync.wire import HOT_LOAD_PATH, HOT_LOAD_WAIT_PARAM, MAX_HOT_LOAD_WAIT_S

BASE, D1 = "base-0badcafe", "step1-0badcafe"
pytestmark = pytest.mark.timeout(120)


class HeldLoad:
    """A stage hook that holds the load of `D1` at `decoding` until released."""

    def __init__(self) -> None:
        self.reached = threading.Event()
        self.release = threading.Event()

    def __call__(self, stage: str, identity: str) -> None:
        if stage == "decoding" and identity == D1:
            self.reached.set()
            assert self.release.wait(60)


@contextmanager
def replica_url(chain: Chain, tmp_path: Path, hook: HeldLoad) -> Iterator[str]:
    config = ReplicaConfig(storage=str(chain.root), snapshot=BASE, state_dir=tmp_path / "s")
    replica = Replica(config, on_stage=hook)
    replica.start()
    try:
        with ServerThread(create_app(replica)) as url:
            yield url
    finally:
        hook.release.set()


def _entry(response: httpx.Response) -> dict[str, Any]:
    assert response.status_code == 200, response.text
    return dict(response.json()["replicas"][0])


def test_a_long_poll_answers_when_the_load_ends(chain: Chain, tmp_path: Path) -> None:
    hook = HeldLoad()
    with replica_url(chain, tmp_path, hook) as url, httpx.Client(base_url=url, timeout=60) as c:
        assert hot_load(c, D1, BASE).status_code == 200
        assert hook.reached.wait(60)
        answers: list[httpx.Response] = []
        poll = threading.Thread(
            target=lambda: answers.append(
                c.get(HOT_LOAD_PATH, params={HOT_LOAD_WAIT_PARAM: MAX_HOT_LOAD_WAIT_S})
            )
        )
        poll.start()
        poll.join(0.5)
        assert poll.is_alive(), f"answered while the load was held: {answers}"
        hook.release.set()
        poll.join(60)
        entry = _entry(answers[0])
    # Answered after the load ended, not at the moment it was asked (it was decoding then).
    assert entry["loading_state"]["stage"] == "ready"
    assert entry["current_snapshot_identity"] == D1


def test_a_long_poll_is_bounded_by_its_wait(chain: Chain, tmp_path: Path) -> None:
    hook = HeldLoad()
    with replica_url(chain, tmp_path, hook) as url, httpx.Client(base_url=url, timeout=60) as c:
        idle = _entry(c.get(HOT_LOAD_PATH, params={HOT_LOAD_WAIT_PARAM: MAX_HOT_LOAD_WAIT_S}))
        assert idle["loading_state"]["stage"] == "ready"  # no load runs: answered at once
        assert hot_load(c, D1, BASE).status_code == 200
        assert hook.reached.wait(60)
        held = _entry(c.get(HOT_LOAD_PATH, params={HOT_LOAD_WAIT_PARAM: 0.2}))
        assert held["loading_state"]["stage"] == "decoding"  # the wait ran out first
        assert held["current_snapshot_identity"] == BASE
        for bad in (MAX_HOT_LOAD_WAIT_S + 1, -1):
            refused = c.get(HOT_LOAD_PATH, params={HOT_LOAD_WAIT_PARAM: bad})
            assert refused.status_code == 400, refused.text
            assert HOT_LOAD_WAIT_PARAM in refused.text


class CountingTransport(httpx.HTTPTransport):
    """Counts status GETs; `strip_wait` drops the long-poll parameter (a server without it)."""

    def __init__(self, *, strip_wait: bool) -> None:
        super().__init__()
        self.strip_wait = strip_wait
        self.status_gets: list[str] = []
        self.first_status_get = threading.Event()

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        if request.method == "GET" and request.url.path == HOT_LOAD_PATH:
            if self.strip_wait:
                request.url = request.url.copy_remove_param(HOT_LOAD_WAIT_PARAM)
            self.status_gets.append(str(request.url))
            self.first_status_get.set()
        return super().handle_request(request)


@pytest.mark.parametrize("long_poll", [True, False], ids=["long-poll", "server-without-it"])
def test_hotload_and_wait_long_polls_and_falls_back_to_polling(
    chain: Chain, tmp_path: Path, long_poll: bool
) -> None:
    hook = HeldLoad()
    transport = CountingTransport(strip_wait=not long_poll)
    with replica_url(chain, tmp_path, hook) as url:
        mgr = DeploymentManager(
            hotload_api_url=url,
            registry_dir=tmp_path / "registry",
            stop_on_exit=False,
            transport=transport,
        )
        results: list[bool] = []
        waiter = threading.Thread(
            target=lambda: results.append(
                mgr.hotload_and_wait(
                    "d",
                    "m",
                    D1,
                    {"previous_snapshot_identity": BASE},
                    timeout_seconds=60,
                    poll_interval=0.05,
                )
            )
        )
        waiter.start()
        try:
            assert hook.reached.wait(60)
            assert transport.first_status_get.wait(60)
            waiter.join(0.3)  # the load stays held while the first status GET is answered
        finally:
            hook.release.set()
        waiter.join(60)
        mgr.close()
    assert results == [True], mgr.last_hotload_error
    assert mgr.last_hotload_result is not None
    assert mgr.last_hotload_result.identity == D1
    if long_poll:
        # One GET, answered when the load ended: no polling.
        assert len(transport.status_gets) == 1, transport.status_gets
        assert f"{HOT_LOAD_WAIT_PARAM}=" in transport.status_gets[0]
    else:
        # Each GET answered at once while the load was held: the manager polled.
        assert len(transport.status_gets) > 1, transport.status_gets
        assert all(HOT_LOAD_WAIT_PARAM not in u for u in transport.status_gets)
