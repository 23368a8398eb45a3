"""One pooled HTTP client per sampler and per manager, and httpx's `transport=` seam on both.

Connections are counted on the wire: the sampler talks to the real `weightsync serve`
deployment through a TCP relay on 127.0.0.1 that counts the connections it accepts.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import threading
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from _support.deployments import API_KEY
from weightsync.deployment import DeploymentManager, DeploymentSampler
from weightsync.errors import DeploymentError

pytestmark = pytest.mark.timeout(120)

PROMPT = [5, 6, 7]


class Relay:
    """Forwards every TCP connection to `target`; counts those accepted and those open."""

    def __init__(self, target: tuple[str, int]) -> None:
        self.target = target
        self.accepted = 0
        self.open = 0
        self._lock = threading.Lock()
        self._closed = threading.Condition(self._lock)
        self._server = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self._server.getsockname()[1]}"
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self._server.accept()
            except OSError:  # closed
                return
            upstream = socket.create_connection(self.target)
            with self._lock:
                self.accepted += 1
                self.open += 1
            pipes = [
                threading.Thread(target=self._pipe, args=(conn, upstream), daemon=True),
                threading.Thread(target=self._pipe, args=(upstream, conn), daemon=True),
            ]
            for pipe in pipes:
                pipe.start()
            threading.Thread(target=self._reap, args=(pipes, conn, upstream), daemon=True).start()

    @staticmethod
    def _pipe(src: socket.socket, dst: socket.socket) -> None:
        with contextlib.suppress(OSError):  # the other direction closed the sockets
            while data := src.recv(65536):
                dst.sendall(data)
        for sock in (src, dst):
            with contextlib.suppress(OSError):  # already shut
                sock.shutdown(socket.SHUT_RDWR)

    def _reap(self, pipes: list[threading.Thread], *socks: socket.socket) -> None:
        for pipe in pipes:
            pipe.join()
        for sock in socks:
            sock.close()
        with self._lock:
            self.open -= 1
            self._closed.notify_all()

    def wait_open(self, count: int, timeout_s: float = 30.0) -> int:
        """Wait (bounded) until at most `count` connections are open; the number open."""
        with self._lock:
            self._closed.wait_for(lambda: self.open <= count, timeout=timeout_s)
            return self.open

    def close(self) -> None:
        self._server.close()


class RecordingTransport(httpx.HTTPTransport):
    """The real network transport, recording each request it carries."""

    def __init__(self) -> None:
        super().__init__()
        self.requests: list[str] = []

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(f"{request.method} {request.url.path}")
        return super().handle_request(request)


class RecordingAsyncTransport(httpx.AsyncHTTPTransport):
    def __init__(self) -> None:
        super().__init__()
        self.requests: list[str] = []

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(f"{request.method} {request.url.path}")
        return await super().handle_async_request(request)


@pytest.fixture
def relay(deployment: Any) -> Iterator[Relay]:
    url = httpx.URL(deployment.url)
    relay = Relay((url.host, url.port or 80))
    yield relay
    relay.close()


def _sampler(url: str, **options: Any) -> DeploymentSampler:
    return DeploymentSampler(url, model="tiny", api_key=API_KEY, timeout_s=60.0, **options)


def test_sync_samples_share_one_connection_until_close(relay: Relay) -> None:
    sampler = _sampler(relay.url)
    for _ in range(3):
        [completion] = sampler.sample(prompt_token_ids=PROMPT, max_tokens=2, temperature=0.0)
        assert completion.snapshot_identity and len(completion.token_ids) == 2
    assert relay.accepted == 1  # one connection for three requests
    sampler.close()
    assert relay.wait_open(0) == 0  # close() closed it
    with sampler:  # a closed sampler opens a new pool; `with` closes it again
        sampler.sample(prompt_token_ids=PROMPT, max_tokens=1)
    assert relay.accepted == 2 and relay.wait_open(0) == 0


def test_async_samples_share_one_connection_per_event_loop(relay: Relay) -> None:
    sampler = _sampler(relay.url)

    async def three_in_a_row() -> list[str | None]:
        async with sampler:
            identities = []
            for _ in range(3):
                [c] = await sampler.sample_with_tokens(prompt_token_ids=PROMPT, max_tokens=2)
                identities.append(c.snapshot_identity)
            return identities

    identities = asyncio.run(three_in_a_row())
    assert len(identities) == 3 and all(identities)
    assert relay.accepted == 1
    assert relay.wait_open(0) == 0  # `async with` closed it inside its loop

    # Without aclose(), the end of asyncio.run's loop closes that loop's pool.
    for _ in range(2):
        asyncio.run(sampler.sample_with_tokens(prompt_token_ids=PROMPT, max_tokens=1))
    assert relay.accepted == 3 and relay.wait_open(0) == 0

    # sample_batch runs its own loop: its requests share that loop's pool, closed at the end.
    prompts = [[{"role": "user", "content": f"hi {i}"}] for i in range(4)]
    batches = sampler.sample_batch(prompts, max_tokens=1)
    assert len(batches) == 4 and all(len(b) == 1 for b in batches)
    assert 3 < relay.accepted <= 3 + len(prompts)
    assert relay.wait_open(0) == 0
    sampler.close()


def test_the_transport_seam_of_the_sampler_and_the_manager(deployment: Any) -> None:
    sync_transport, async_transport = RecordingTransport(), RecordingAsyncTransport()
    sampler = _sampler(deployment.url, transport=sync_transport, async_transport=async_transport)
    sampler.sample(prompt_token_ids=PROMPT, max_tokens=1)

    async def one() -> None:
        async with sampler:
            await sampler.sample_with_prompt_tokens(PROMPT, max_tokens=1)

    asyncio.run(one())
    assert sync_transport.requests == ["POST /v1/completions"]
    assert async_transport.requests == ["POST /v1/completions"]

    transport = RecordingTransport()
    mgr = DeploymentManager(
        API_KEY, base_url=deployment.url, stop_on_exit=False, transport=transport
    )
    status = mgr.hotload_check_status("main")
    assert status["replicas"] and transport.requests == ["GET /hot_load/v1/models/hot_load"]
    mgr.close()


def test_a_transport_that_fails_reaches_the_caller_as_a_deployment_error(
    deployment: Any,
) -> None:
    class Refusing(httpx.HTTPTransport):
        def handle_request(self, request: httpx.Request) -> httpx.Response:
            raise httpx.ConnectError("injected: connection refused", request=request)

    sampler = _sampler(deployment.url, transport=Refusing())
    with pytest.raises(DeploymentError, match=r"failed after 4 attempt\(s\)"):
        sampler.sample(prompt_token_ids=PROMPT, max_tokens=1)
    sampler.close()
