"""The `vllm` engine (vLLM's own server + sidecar) under the `sync` transition, directly.

One vLLM server serves the module. `sync` pauses vLLM with `mode=wait`: a stream
running when a swap starts finishes on the old weights (every token labelled
and computed with them), unlike `async` (`keep`; test_vllm_deployment.py), where
it continues on the new ones.
"""

from __future__ import annotations

import json
import socket
import threading
from collections.abc import Iterator
from contextlib import nullcontext
from typing import Any

import openai
import pytest
import torch

from _support.vllm_api import as_result, stream_completion
from _support.vllm_reference import (
    PROMPTS,
    Base,
    check_against_reference,
    perturbed,
    reference_model,
    serving,
    small_base,
)
from weightsync.codec import DEFAULT_CHECKSUM, DEFAULT_CODEC, checksum_tensor, get_codec
from weightsync.server.engines.base import GenerateRequest
from weightsync.server.engines.vllm_server_engine import VllmServerEngine

pytest.importorskip("vllm.engine.arg_utils", reason="the vllm extra is not installed")

pytestmark = [pytest.mark.vllm, pytest.mark.timeout(400)]


@pytest.fixture(scope="module")
def base(tmp_path_factory: pytest.TempPathFactory) -> Base:
    return small_base(tmp_path_factory.mktemp("sync"))


@pytest.fixture(scope="module")
def engine(base: Base) -> Iterator[VllmServerEngine]:
    with serving(base, transition="sync") as eng:
        yield eng


def swap_to(engine: VllmServerEngine, identity: str, new: dict[str, torch.Tensor]) -> None:
    codec = get_codec(DEFAULT_CODEC)
    live = engine.named_weights()
    patches = {n: codec.decode_patch(codec.encode(live[n], new[n]), live[n]) for n in new}
    with engine.swap(identity):
        engine.apply_patches(patches, keep_undo=False)
        engine.reset_prompt_cache("all")


def test_sidecar_generate_and_worker_checksums(engine: VllmServerEngine, base: Any) -> None:
    _, tensors, _ = base
    ref = reference_model(tensors)
    for prompt in PROMPTS:
        result = engine.generate(
            GenerateRequest(prompt_token_ids=prompt, max_tokens=6, temperature=0.0, logprobs=2),
            step_guard=lambda: nullcontext("unused"),
        )
        check_against_reference(ref, prompt, result)
        assert result.token_snapshots == ["base-0"] * 6
        assert result.top_logprobs is not None and all(len(t) == 2 for t in result.top_logprobs)
    want = {n: checksum_tensor(DEFAULT_CHECKSUM, t) for n, t in tensors.items()}
    assert engine.weights_checksums(DEFAULT_CHECKSUM) == want


def test_sync_swap_lets_running_streams_finish_on_the_old_weights(
    engine: VllmServerEngine, base: Any
) -> None:
    _, tensors, _ = base
    url = engine.inference_url
    assert url is not None
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", timeout=120, max_retries=0)
    new = perturbed(tensors, seed=1)
    generating = threading.Event()
    results: list[Any] = []
    errors: list[BaseException] = []

    def run() -> None:
        try:
            out = stream_completion(
                client, "small", "the quick brown", max_tokens=400,
                on_tokens=generating.set, extra_body={"ignore_eos": True},
            )  # fmt: skip
            results.append(out)
        except BaseException as e:
            errors.append(e)
            generating.set()

    stream = threading.Thread(target=run)
    stream.start()
    assert generating.wait(timeout=120)
    swap_to(engine, "delta-1", new)  # `wait`: returns after the running stream finished
    stream.join(timeout=120)
    assert not errors and len(results) == 1, errors
    [out] = results
    assert len(out.token_ids) == 400
    assert out.labels == ["base-0"] * 400
    check_against_reference(
        reference_model(tensors), out.prompt_token_ids, as_result(out.token_ids, out.logprobs)
    )
    after = stream_completion(client, "small", "the quick brown", max_tokens=8)
    assert after.labels == ["delta-1"] * 8 and after.header == "delta-1"
    check_against_reference(
        reference_model(new), after.prompt_token_ids, as_result(after.token_ids, after.logprobs)
    )
    want = {n: checksum_tensor(DEFAULT_CHECKSUM, t) for n, t in new.items()}
    assert engine.weights_checksums(DEFAULT_CHECKSUM) == want


def test_a_client_that_stops_reading_across_a_swap_gets_every_chunk_under_its_snapshot(
    engine: VllmServerEngine, base: Any
) -> None:
    """TCP backpressure: a client reads one piece, stops until a swap is done, then reads all.

    Its socket takes a few KB, so vLLM's server cannot send most of the 400-token stream
    (with top-5 logprobs, ~200 KB) while the `sync` swap waits for the request to finish
    on the old weights; the chunks still unsent when the label changes must keep the old
    label, and every token must be the old weights' (teacher-forced against them).
    """
    url = engine.inference_url
    assert url is not None
    host, _, port = url.removeprefix("http://").rpartition(":")
    old = engine.named_weights()
    old = {n: t.clone() for n, t in old.items()}
    body = json.dumps(
        {
            "model": "small", "prompt": "the quick brown", "max_tokens": 400,
            "temperature": 0.0, "logprobs": 5, "ignore_eos": True, "stream": True,
            "return_token_ids": True,
        }
    ).encode()  # fmt: skip
    request = (
        b"POST /v1/completions HTTP/1.1\r\nHost: vllm\r\nContent-Type: application/json\r\n"
        b"Connection: close\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body)
    )
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # before connect: the window
        sock.settimeout(120)
        sock.connect((host, int(port)))
        sock.sendall(request)
        received = bytearray(sock.recv(2048))  # the stream has begun
        assert received.startswith(b"HTTP/1.1 200"), bytes(received[:200])
        swap_to(engine, "delta-2", perturbed(old, seed=2))  # returns once the request ended
        while piece := sock.recv(1 << 16):
            received += piece
    head, _, chunked = bytes(received).partition(b"\r\n\r\n")
    assert b"x-weightsync-snapshot-identity: delta-1" in head.lower()
    events = [e for e in _dechunk(chunked).split(b"\n\n") if e.startswith(b"data: {")]
    token_ids: list[int] = []
    logprobs: list[float] = []
    labels: list[str] = []
    for event in events:
        chunk = json.loads(event[len(b"data: ") :])
        for choice in chunk["choices"]:
            ids = choice.get("token_ids") or []
            token_ids += ids
            logprobs += choice["logprobs"]["token_logprobs"] if ids else []
            labels += [chunk["snapshot_identity"]] * len(ids)
    assert len(token_ids) == 400 and len(logprobs) == 400
    assert labels == ["delta-1"] * 400, sorted(set(labels))
    first = json.loads(events[0][len(b"data: ") :])
    prompt_ids = first["choices"][0]["prompt_token_ids"]
    check_against_reference(reference_model(old), prompt_ids, as_result(token_ids, logprobs))


def _dechunk(data: bytes) -> bytes:
    """The body of an HTTP/1.1 `Transfer-Encoding: chunked` answer."""
    out = bytearray()
    while data:
        size_line, _, rest = data.partition(b"\r\n")
        size = int(size_line.split(b";")[0], 16)
        if size == 0:
            break
        out += rest[:size]
        data = rest[size + 2 :]
    return bytes(out)
