"""Draining a replica's server before it stops (what a Ray replica does when scaled down).

A real replica behind its real HTTP server on 127.0.0.1, a long streamed completion
in flight: a drain lets it finish, bounded; past the bound it is cancelled. No Ray.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from _support.long_completion import LONG_MAX_TOKENS, LongCompletion
from weightsync.deployment.ray_replicas import drain_server, in_flight
from weightsync.server.app import create_app
from weightsync.server.config import ReplicaConfig
from weightsync.server.replica import Replica
from weightsync.server.runner import ServerThread
from weightsync.toymodel import build_model, build_tokenizer
from weightsync.trainer import TrainingClient

pytestmark = pytest.mark.timeout(180)


@pytest.fixture
def served(tmp_path: Path) -> Iterator[tuple[Replica, ServerThread, str]]:
    client = TrainingClient(
        build_model("tiny", seed=0),
        storage=str(tmp_path / "store"),
        tokenizer_dir=build_tokenizer(tmp_path / "tok"),
    )
    base = client.save_weights_for_sampler_ext("base").snapshot_name
    replica = Replica(
        ReplicaConfig(
            storage=client.storage.url,
            snapshot=base,
            state_dir=tmp_path / "replica",
            model_name="tiny",
            engine_options={"num_threads": 1},
        )
    )
    replica.start()
    server = ServerThread(create_app(replica))
    url = server.start()
    try:
        yield replica, server, url
    finally:
        server.stop()


def test_a_drain_lets_the_completion_in_flight_finish_then_refuses_connections(
    served: tuple[Replica, ServerThread, str],
) -> None:
    replica, server, url = served
    completion = LongCompletion(url).start()
    assert in_flight(replica) == 1
    drain_started = time.monotonic()
    cancelled = drain_server(server, replica, timeout_s=120)
    completion.join()
    assert cancelled == 0
    assert completion.error is None, completion.error
    assert completion.done and completion.finish_reasons == ["length"]
    assert completion.tokens == LONG_MAX_TOKENS
    assert completion.last_chunk_at > drain_started, "it had finished before the drain began"
    with pytest.raises(httpx.ConnectError):
        httpx.get(f"{url}/health", timeout=5.0)


def test_a_drain_past_its_bound_cancels_the_completion(
    served: tuple[Replica, ServerThread, str],
) -> None:
    replica, server, url = served
    completion = LongCompletion(url).start()
    cancelled = drain_server(server, replica, timeout_s=0)
    completion.join()
    assert cancelled == 1
    assert not completion.done, "the completion ran to its end although the drain had no time"
    assert completion.tokens == 0  # no final usage chunk: the stream was cut
