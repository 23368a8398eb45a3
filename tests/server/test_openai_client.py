"""The official `openai` client against a replica (with an API key)."""

from __future__ import annotations

import openai
import pytest

from _support.chain import Chain
from _support.serving import PROMPT_IDS, reference_greedy

pytestmark = pytest.mark.timeout(60)
BASE = "base-0badcafe"


def test_openai_client_completions_and_chat(serve, chain: Chain) -> None:
    http, _ = serve(api_key="k3y")
    client = openai.OpenAI(
        base_url=str(http.base_url).rstrip("/") + "/v1", api_key="k3y", max_retries=0
    )
    out = client.completions.create(
        model="weightsync", prompt=PROMPT_IDS, max_tokens=6, temperature=0, logprobs=2
    )
    tokens, logprobs = reference_greedy(chain.config, chain.weights[BASE], PROMPT_IDS, 6)
    assert out.model == f"weightsync@{BASE}"
    assert out.model_extra is not None and out.model_extra["snapshot_identity"] == BASE
    assert out.choices[0].logprobs is not None
    assert out.choices[0].logprobs.token_logprobs == logprobs
    assert len(out.choices[0].logprobs.top_logprobs[0]) == 2
    assert out.usage is not None and out.usage.completion_tokens == len(tokens)

    text = client.completions.create(
        model="weightsync", prompt="Hello", max_tokens=4, temperature=0.8, seed=3, n=2
    )
    assert len(text.choices) == 2 and all(isinstance(c.text, str) for c in text.choices)

    chat = client.chat.completions.create(
        model="weightsync",
        messages=[{"role": "user", "content": "hi"}],
        max_tokens=4,
        temperature=0,
        logprobs=True,
        top_logprobs=1,
    )
    assert chat.model == f"weightsync@{BASE}"
    assert chat.choices[0].message.role == "assistant"
    assert chat.choices[0].logprobs is not None and chat.choices[0].logprobs.content
    assert [m.id for m in client.models.list()][:2] == ["weightsync", f"weightsync@{BASE}"]

    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(
            base_url=str(http.base_url).rstrip("/") + "/v1", api_key="wrong", max_retries=0
        ).completions.create(model="weightsync", prompt=[1], max_tokens=1)
    # Streaming through the client: the chunks' text is the greedy completion's text.
    plain = client.completions.create(
        model="weightsync", prompt="Hello", max_tokens=6, temperature=0
    )
    chunks = list(
        client.completions.create(
            model="weightsync", prompt="Hello", max_tokens=6, temperature=0, stream=True
        )
    )
    assert "".join(c.choices[0].text for c in chunks) == plain.choices[0].text
    assert chunks[-1].choices[0].finish_reason == plain.choices[0].finish_reason
    assert {c.model for c in chunks} == {f"weightsync@{BASE}"}
    chat_chunks = list(
        client.chat.completions.create(
            model="weightsync",
            messages=[{"role": "user", "content": "hi"}],
            max_tokens=4,
            temperature=0,
            stream=True,
        )
    )
    assert chat_chunks[0].choices[0].delta.role == "assistant"
    streamed = "".join(c.choices[0].delta.content or "" for c in chat_chunks)
    assert streamed == chat.choices[0].message.content
