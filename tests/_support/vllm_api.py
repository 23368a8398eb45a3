"""Checks of what vLLM's own OpenAI server answers, through the `openai` client.

Every check teacher-forces vLLM's tokens through a `transformers` reference that
holds the snapshot's weights (`_support.vllm_reference.check_against_reference`), and checks
the snapshot label weightsync's middleware puts on the answer and its chunks.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from _support.vllm_reference import check_against_reference
from weightsync.server.engines.base import GenerateResult


@dataclass
class Streamed:
    """One streamed completion: its tokens, logprobs and each token's snapshot label."""

    prompt_token_ids: list[int] = field(default_factory=list)
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    labels: list[str] = field(default_factory=list)
    text: str = ""
    finish_reason: str | None = None
    cached_tokens: int | None = None
    header: str | None = None


def stream_completion(
    client: Any, model: str, prompt: str, *, on_tokens: Any = None, **options: Any
) -> Streamed:
    """A `stream=true` completion with token ids and logprobs, chunk by chunk.

    `on_tokens()` is called after each chunk that carried tokens.
    """
    out = Streamed()
    raw = client.completions.with_raw_response.create(
        model=model,
        prompt=prompt,
        temperature=0.0,
        logprobs=0,
        stream=True,
        stream_options={"include_usage": True},
        extra_body={"return_token_ids": True, **options.pop("extra_body", {})},
        **options,
    )
    out.header = raw.headers.get("x-weightsync-snapshot-identity")
    for chunk in raw.parse():
        extra = chunk.model_extra or {}
        if chunk.usage is not None and chunk.usage.prompt_tokens_details is not None:
            out.cached_tokens = chunk.usage.prompt_tokens_details.cached_tokens
        for choice in chunk.choices:
            ids = list((choice.model_extra or {}).get("token_ids") or [])
            prompt_ids = (choice.model_extra or {}).get("prompt_token_ids")
            if prompt_ids:
                out.prompt_token_ids = list(prompt_ids)
            out.token_ids += ids
            out.labels += [extra["snapshot_identity"]] * len(ids)
            out.text += choice.text
            if choice.logprobs is not None:
                out.logprobs += [float(lp) for lp in choice.logprobs.token_logprobs or []]
            if choice.finish_reason is not None:
                out.finish_reason = choice.finish_reason
            if ids and on_tokens is not None:
                on_tokens()
    return out


def as_result(token_ids: list[int], logprobs: list[float]) -> GenerateResult:
    return GenerateResult(token_ids=list(token_ids), logprobs=list(logprobs))


def check_vllm_api(client: Any, model: str, tokenizer: Any, ref: Any, identity: str) -> None:
    """vLLM's completions (streamed, with a stop string) and chat serve `identity` as `ref` does."""
    prompt = "the quick brown"
    full = stream_completion(client, model, prompt, max_tokens=8)
    assert full.header == identity
    assert full.labels == [identity] * len(full.token_ids) and len(full.token_ids) == 8
    assert full.finish_reason == "length"
    assert full.prompt_token_ids == tokenizer(prompt)["input_ids"]
    check_against_reference(ref, full.prompt_token_ids, as_result(full.token_ids, full.logprobs))
    assert full.text == tokenizer.decode(full.token_ids)

    # A stop string inside the greedy text: vLLM cuts the text before it and says "stop".
    stop = full.text[3:5]
    cut = full.text[: full.text.index(stop)]
    stopped = stream_completion(client, model, prompt, max_tokens=8, stop=[stop])
    assert stopped.finish_reason == "stop"
    assert stopped.text == cut
    assert set(stopped.labels) <= {identity}

    messages = [{"role": "user", "content": "fox?"}]
    raw = client.chat.completions.with_raw_response.create(
        model=model,
        messages=messages,
        max_tokens=6,
        temperature=0.0,
        logprobs=True,
        extra_body={"return_token_ids": True},
    )
    chat = raw.parse()
    assert raw.headers.get("x-weightsync-snapshot-identity") == identity
    extra = chat.model_extra or {}
    assert extra["snapshot_identity"] == identity and extra["snapshot_identities"] == [identity]
    [choice] = chat.choices
    prompt_ids = list(extra["prompt_token_ids"])
    # vLLM rendered the tokenizer's own chat template.
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert prompt_ids == tokenizer(text, add_special_tokens=False)["input_ids"]
    ids = list((choice.model_extra or {})["token_ids"])
    assert choice.logprobs is not None and choice.logprobs.content is not None
    logprobs = [float(t.logprob) for t in choice.logprobs.content]
    check_against_reference(ref, prompt_ids, as_result(ids, logprobs))
