"""Streaming (SSE) completions, stop strings, echo, and the Fireworks SDK's sampler and warmup."""

from __future__ import annotations

import asyncio
import json
import threading
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest

from _support.serving import PROMPT_IDS, greedy, hot_load, reference_greedy, wait_loaded
from weightsync.server.gateway import create_gateway_app
from weightsync.server.runner import ServerThread

BASE, D1 = "base-0badcafe", "step1-0badcafe"
pytestmark = pytest.mark.timeout(120)


def sse_events(response: httpx.Response) -> Iterator[tuple[str | None, str]]:
    """(event, data) per SSE event of a streamed response, `[DONE]` included."""
    event: str | None = None
    for line in response.iter_lines():
        if line.startswith("event:"):
            event = line.partition(":")[2].strip()
        elif line.startswith("data:"):
            yield event, line.partition(":")[2].strip()
            event = None


def stream(client: httpx.Client, path: str, body: dict[str, Any]) -> list[dict[str, Any]]:
    """Every chunk of a streamed completion; asserts the stream ends with `[DONE]`."""
    with client.stream("POST", path, json={**body, "stream": True}) as r:
        assert r.status_code == 200, r.read()
        assert r.headers["content-type"].startswith("text/event-stream")
        events = list(sse_events(r))
    assert events[-1] == (None, "[DONE]"), events[-3:]
    assert all(event is None for event, _ in events), events
    return [json.loads(data) for _, data in events[:-1]]


def joined(chunks: list[dict[str, Any]], key: str) -> Any:
    """One choice's field across chunks: text concatenated, lists concatenated."""
    if key == "text":
        return "".join(c["choices"][0]["text"] for c in chunks if c["choices"])
    return [x for c in chunks if c["choices"] for x in c["choices"][0].get(key) or []]


def test_streamed_tokens_equal_the_unstreamed_greedy_and_the_reference(serve, chain) -> None:
    client, _ = serve()
    reference, ref_logprobs = reference_greedy(chain.config, chain.weights[BASE], PROMPT_IDS, 12)
    body = {
        "prompt": PROMPT_IDS,
        "max_tokens": 12,
        "temperature": 0,
        "logprobs": True,
        "return_token_ids": True,
        "raw_output": True,
    }
    answer = client.post("/v1/completions", json=body)
    assert float(answer.headers["fireworks-prefill-queue-duration"]) >= 0
    plain = answer.json()["choices"][0]
    for path in ("/v1/completions", "/inference/v1/completions"):
        chunks = stream(client, path, body)
        tokens = joined(chunks, "token_ids")
        assert tokens == plain["token_ids"] == reference[: len(tokens)]
        content = [
            x for c in chunks for x in (c["choices"][0]["logprobs"] or {}).get("content", [])
        ]
        assert [x["token_id"] for x in content] == tokens
        assert [x["logprob"] for x in content] == ref_logprobs[: len(tokens)]
        assert joined(chunks, "text") == plain["text"]
        assert {c["model"] for c in chunks} == {f"weightsync@{BASE}"}
        last = chunks[-1]["choices"][0]
        assert last["finish_reason"] == plain["finish_reason"]
        assert all(c["choices"][0]["finish_reason"] is None for c in chunks[:-1])
        assert last["raw_output"]["completion_token_ids"] == tokens
        assert last["raw_output"]["prompt_token_ids"] == PROMPT_IDS
        assert chunks[-1]["usage"]["completion_tokens"] == len(tokens)
        assert "perf_metrics" not in chunks[-1]
    timed = stream(client, "/v1/completions", {**body, "perf_metrics_in_response": True})
    perf = timed[-1]["perf_metrics"]
    assert 0 <= perf["prefill-queue-duration"] <= perf["server-time-to-first-token"]
    assert perf["server-time-to-first-token"] <= perf["server-processing-time"]


def test_streamed_chat_and_several_choices(serve) -> None:
    client, _ = serve()
    body = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 6, "temperature": 0}
    plain = client.post("/v1/chat/completions", json=body).json()
    chunks = stream(client, "/inference/v1/chat/completions", body)
    assert chunks[0]["object"] == "chat.completion.chunk"
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    text = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks)
    assert text == plain["choices"][0]["message"]["content"]
    # Two prompts x n 2 with stream_options.include_usage: four choices, then a usage chunk.
    many = stream(
        client,
        "/v1/completions",
        {
            "prompt": [PROMPT_IDS, PROMPT_IDS[:5]],
            "n": 2,
            "max_tokens": 4,
            "temperature": 0.7,
            "seed": 1,
            "return_token_ids": True,
            "stream_options": {"include_usage": True},
        },
    )
    assert many[-1]["choices"] == [] and many[-1]["usage"]["completion_tokens"] > 0
    finished = [c["choices"][0]["index"] for c in many[:-1] if c["choices"][0]["finish_reason"]]
    assert finished == [0, 1, 2, 3]
    assert (
        sum(len(c["choices"][0].get("token_ids") or []) for c in many[:-1])
        == (many[-1]["usage"]["completion_tokens"])
    )


def test_stop_strings_and_stop_token_ids(serve) -> None:
    client, _ = serve()
    body = {"prompt": "Hello", "max_tokens": 24, "temperature": 0, "return_token_ids": True}
    full = client.post("/v1/completions", json=body).json()["choices"][0]
    text = full["text"]
    assert len(text) > 8, text
    stop = text[4:6]
    expected = text[: text.find(stop)]
    stopped = client.post("/v1/completions", json={**body, "stop": [stop, "never-there"]})
    choice = stopped.json()["choices"][0]
    assert choice["text"] == expected and choice["finish_reason"] == "stop"
    # The tokens stop at the one that completed the stop string.
    assert full["token_ids"][: len(choice["token_ids"])] == choice["token_ids"]
    assert len(choice["token_ids"]) < len(full["token_ids"])
    chunks = stream(client, "/v1/completions", {**body, "stop": stop})
    assert joined(chunks, "text") == expected
    assert chunks[-1]["choices"][0]["finish_reason"] == "stop"
    # A stop token id ends the output after that token.
    stop_id = full["token_ids"][3]
    first = full["token_ids"].index(stop_id)
    by_id = client.post("/v1/completions", json={**body, "stop_token_ids": [stop_id]}).json()
    assert by_id["choices"][0]["token_ids"] == full["token_ids"][: first + 1]
    assert by_id["choices"][0]["finish_reason"] == "stop"
    no_stop = client.post("/v1/completions", json={**body, "max_tokens": 3}).json()
    assert no_stop["choices"][0]["finish_reason"] == "length"


def _reference_prompt_logprobs(
    config: dict[str, Any], weights: dict[str, Any], prompt: list[int]
) -> list[float]:
    """A plain `transformers` forward: the logprob of prompt[i] given prompt[:i], i >= 1."""
    import torch
    from transformers import AutoModelForCausalLM, Qwen3Config

    model = AutoModelForCausalLM.from_config(Qwen3Config(**config), dtype=torch.bfloat16)
    model.load_state_dict(weights, strict=False)
    model.tie_weights()
    model.eval()
    with torch.inference_mode():
        logits = model(input_ids=torch.tensor([prompt])).logits[0].float()
    logprobs = torch.log_softmax(logits, -1)
    return [float(logprobs[i - 1, prompt[i]]) for i in range(1, len(prompt))]


def test_echo_scores_the_prompt(serve, chain) -> None:
    client, _ = serve()
    prompt = PROMPT_IDS[:6]  # under one prefill block: one forward, as the reference
    expected = _reference_prompt_logprobs(chain.config, chain.weights[BASE], prompt)
    scoring = {"prompt": prompt, "max_tokens": 0, "echo": True, "logprobs": True}
    r = client.post("/v1/completions", json={**scoring, "raw_output": True})
    assert r.status_code == 200, r.text
    choice = r.json()["choices"][0]
    content = choice["logprobs"]["content"]
    assert [x["token_id"] for x in content] == prompt
    assert content[0]["logprob"] == 0.0  # no context: the SDK drops this row
    assert [x["logprob"] for x in content[1:]] == expected
    assert choice["raw_output"]["completion_token_ids"] == prompt
    legacy = client.post(
        "/v1/completions", json={"prompt": prompt, "max_tokens": 2, "echo": True, "logprobs": 0}
    ).json()["choices"][0]
    assert legacy["logprobs"]["token_logprobs"][: len(prompt)] == [None, *expected]
    assert len(legacy["logprobs"]["tokens"]) == len(prompt) + 2
    refused = client.post("/v1/completions", json={"prompt": prompt, "max_tokens": 0})
    assert refused.status_code == 400 and "echo" in refused.text


def _read_stream_in_thread(
    client: httpx.Client, body: dict[str, Any], out: dict[str, Any], started: threading.Event
) -> threading.Thread:
    def run() -> None:
        chunks = []
        with client.stream("POST", "/v1/completions", json={**body, "stream": True}) as r:
            for _event, data in sse_events(r):
                if data == "[DONE]":
                    break
                chunks.append(json.loads(data))
                started.set()
        out["chunks"] = chunks

    thread = threading.Thread(target=run)
    thread.start()
    return thread


def test_chunk_model_changes_mid_stream_across_an_async_swap(serve, chain) -> None:
    client, _ = serve(transition="async")
    long = {
        "prompt": PROMPT_IDS,
        "max_tokens": 2000,
        "temperature": 0,
        "return_token_ids": True,
        "stop_token_ids": [],
    }
    unswapped = greedy(client, PROMPT_IDS, max_tokens=2000)["choices"][0]["token_ids"]
    out: dict[str, Any] = {}
    started = threading.Event()
    thread = _read_stream_in_thread(client, long, out, started)
    assert started.wait(60)  # the first chunk came from the base
    assert hot_load(client, D1, BASE).status_code == 200
    wait_loaded(client, D1)
    thread.join(90)
    chunks = out["chunks"]
    models = [c["model"] for c in chunks]
    switch = models.index(f"weightsync@{D1}")
    assert set(models[:switch]) == {f"weightsync@{BASE}"}, "the swap must land mid-stream"
    assert set(models[switch:]) == {f"weightsync@{D1}"}
    assert all(c["snapshot_identity"] == c["model"].split("@")[1] for c in chunks)
    tokens = joined(chunks, "token_ids")
    before = joined(chunks[:switch], "token_ids")
    assert 0 < len(before) < len(tokens)
    assert before == unswapped[: len(before)]


def test_gateway_relays_streams_and_the_inference_aliases(serve, chain, tmp_path: Path) -> None:
    with ExitStack() as stack:
        urls = []
        for i in range(2):
            client, _ = serve(state_dir=tmp_path / f"state-{i}", replica_id=f"replica-{i}")
            urls.append(str(client.base_url).rstrip("/"))
        app = create_gateway_app(urls, api_key=None, max_body_bytes=1 << 20)
        gateway = stack.enter_context(ServerThread(app))
        gw = stack.enter_context(httpx.Client(base_url=gateway, timeout=60))
        body = {"prompt": PROMPT_IDS, "max_tokens": 8, "temperature": 0, "return_token_ids": True}
        direct = greedy(httpx.Client(base_url=urls[0], timeout=60), PROMPT_IDS)
        for path in ("/v1/completions", "/inference/v1/completions"):
            chunks = stream(gw, path, body)
            assert joined(chunks, "token_ids") == direct["choices"][0]["token_ids"]
            plain = gw.post(path, json=body)
            assert plain.status_code == 200, plain.text
            assert float(plain.headers["fireworks-prefill-queue-duration"]) >= 0
            assert plain.json()["choices"][0]["token_ids"] == direct["choices"][0]["token_ids"]
        chat = gw.post(
            "/inference/v1/chat/completions",
            json={"messages": [{"role": "user", "content": "hi"}], "max_tokens": 3},
        )
        assert chat.status_code == 200, chat.text
        assert gw.get("/inference/v1/models").json()["data"][0]["id"] == "weightsync"
        for bad in ([], [1] * 2048):  # empty; as long as the model's whole context
            refused = gw.post("/v1/completions", json={"prompt": bad, "stream": True})
            assert refused.status_code == 400, refused.text


@contextmanager
def _hf_tokenizer(tokenizer_dir: Path) -> Iterator[Any]:
    from transformers import AutoTokenizer

    yield AutoTokenizer.from_pretrained(str(tokenizer_dir))


def test_fireworks_sdk_sampler_and_warmup(serve, chain, tokenizer_dir: Path) -> None:
    from fireworks.training.sdk.deployment import DeploymentManager, DeploymentSampler

    client, _ = serve()
    url = str(client.base_url).rstrip("/")
    manager = DeploymentManager(api_key="k", base_url=url, hotload_api_url=url, inference_url=url)
    # The warmup's first request answers 200 (a failure would sleep 10 s per retry).
    assert manager.warmup("weightsync", max_retries=1, retry_interval_s=0.0) is True
    with _hf_tokenizer(tokenizer_dir) as tokenizer:
        messages = [{"role": "user", "content": "hello"}]
        prompt = tokenizer.apply_chat_template(
            messages, tokenize=True, add_generation_prompt=True, return_dict=False
        )
        sampler = DeploymentSampler(
            inference_url=url, model="weightsync", api_key="k", tokenizer=tokenizer
        )

        async def sample() -> Any:
            # Bounded: the SDK retries transient failures for minutes by default.
            return await asyncio.wait_for(
                sampler.sample_with_tokens(
                    messages, n=2, max_tokens=8, temperature=0.0, logprobs=True, top_logprobs=2
                ),
                timeout=60,
            )

        completions = asyncio.run(sample())
        # The queue wait and first-token time reach the SDK's adaptive concurrency.
        metrics = sampler.drain_metrics()
    expected = greedy(client, prompt, max_tokens=8)["choices"][0]
    reference, ref_logprobs = reference_greedy(chain.config, chain.weights[BASE], prompt, 8)
    assert len(completions) == 2
    for c in completions:
        completion = c.full_tokens[c.prompt_len :]
        assert c.full_tokens[: c.prompt_len] == prompt
        assert completion == expected["token_ids"] == reference[: len(completion)]
        assert c.inference_logprobs == ref_logprobs[: len(completion)]
        assert c.sampling_logprobs == [0.0] * len(completion)  # greedy: the pick is certain
        assert c.finish_reason == expected["finish_reason"]
        assert c.inference_topk_token_ids is not None
        assert [ids[0] for ids in c.inference_topk_token_ids] == completion  # greedy = top-1
    assert len(metrics) == 2
    for m in metrics:
        assert m.prefill_queue_duration is not None and m.prefill_queue_duration >= 0
        assert m.server_ttft is not None and m.server_ttft >= m.prefill_queue_duration
        assert m.num_concurrent_requests is not None and m.num_concurrent_requests >= 1


def test_fireworks_sdk_stop_token_ids_end_the_completion(serve, tokenizer_dir: Path) -> None:
    """The SDK turns `stop=[id]` into that token's text; the server stops on the token."""
    from fireworks.training.sdk.deployment import DeploymentSampler

    client, _ = serve()
    url = str(client.base_url).rstrip("/")
    full = greedy(client, PROMPT_IDS, max_tokens=12)["choices"][0]["token_ids"]
    # A token with text (the toy vocabulary leaves ids past its 99 tokens without any).
    stop_id = next(t for t in full[2:] if 3 <= t < 99)
    expected = full[: full.index(stop_id) + 1]
    empty = client.post("/v1/completions", json={"prompt": PROMPT_IDS, "stop": [""]})
    assert empty.status_code == 400 and "stop_token_ids" in empty.text
    with _hf_tokenizer(tokenizer_dir) as tokenizer:
        sampler = DeploymentSampler(
            inference_url=url, model="weightsync", api_key="k", tokenizer=tokenizer
        )

        async def sample() -> Any:
            return await asyncio.wait_for(
                sampler.sample_with_prompt_tokens(
                    PROMPT_IDS, n=1, max_tokens=12, temperature=0.0, stop=[stop_id]
                ),
                timeout=60,
            )

        (completion,) = asyncio.run(sample())
    assert completion.full_tokens[completion.prompt_len :] == expected
    assert completion.finish_reason == "stop"
