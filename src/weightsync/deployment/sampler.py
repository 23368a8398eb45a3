"""`DeploymentSampler`: token-in/token-out sampling from a deployment's OpenAI endpoints.

With a tokenizer, messages are rendered with its chat template here and sent
as token ids to `/v1/completions`, so the tokens the trainer scores are exactly
the tokens the deployment saw. Without one, messages go to
`/v1/chat/completions` and the deployment's tokenizer renders them. Every
result names the snapshot identity that produced it.

Connections are reused: a sampler holds one pooled HTTP client for its synchronous
calls and, since an httpx async pool belongs to the event loop that opened it, one
per event loop for its async calls (see `DeploymentSampler`).
"""

from __future__ import annotations

import asyncio
import logging
import os
import threading
import weakref
from collections.abc import AsyncGenerator
from dataclasses import dataclass
from types import TracebackType
from typing import Any, Self

import httpx
from pydantic import ValidationError

from weightsync.deployment.http import (
    AsyncDeploymentHTTP,
    DeploymentHTTP,
    RetryPolicy,
    auth_headers,
)
from weightsync.errors import DeploymentError, InvalidInputError, UnsupportedOperationError
from weightsync.wire.inference import (
    ChatChoice,
    ChatCompletionResponse,
    CompletionChoice,
    CompletionResponse,
    ContentLogprobs,
    LegacyLogprobs,
    SnapshotChange,
)
from weightsync.wire.paths import CHAT_COMPLETIONS_PATH, COMPLETIONS_PATH

logger = logging.getLogger(__name__)

Message = dict[str, str]


@dataclass(frozen=True, kw_only=True)
class SampledCompletion:
    """One generated sequence, with the prompt it continued."""

    prompt_token_ids: list[int]
    token_ids: list[int]
    logprobs: list[float] | None
    text: str
    finish_reason: str | None
    #: The snapshot that produced the tokens (the last one, if it changed mid-sequence).
    snapshot_identity: str | None
    #: Under an async transition, the identity that produced each token, in order.
    snapshot_identities: list[str] | None = None

    @property
    def full_token_ids(self) -> list[int]:
        return self.prompt_token_ids + self.token_ids

    # The Fireworks SDK's names of the same facts (its `SampledCompletion`).
    @property
    def full_tokens(self) -> list[int]:
        return self.full_token_ids

    @property
    def prompt_len(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def completion_len(self) -> int:
        return len(self.token_ids)

    @property
    def inference_logprobs(self) -> list[float] | None:
        return self.logprobs


class DeploymentSampler:
    """Samples completions (tokens, logprobs, snapshot identity) from one deployment.

    Lifetime of its connections: `sample` uses one pooled client, opened on first use
    and kept until `close()`. The async methods use one pooled client per event loop,
    kept while that loop lives: `await aclose()` (or `async with sampler`) closes it
    inside the loop, and the loop's own end does otherwise (`asyncio.run` finalizes it);
    `sample_batch` closes the one of the loop it runs. `with sampler`
    closes the synchronous pool on exit. `transport=` / `async_transport=` replace the
    network (httpx's seam: a recording or fault-injecting transport in tests).
    """

    def __init__(  # noqa: PLR0917  (the SDK's positional order)
        self,
        inference_url: str,
        model: str = "",
        api_key: str | None = None,
        tokenizer: Any = None,
        concurrency_controller: Any = None,
        max_concurrency: int | None = None,
        additional_headers: dict[str, str] | None = None,
        *,
        verify_ssl: bool = True,
        timeout_s: float = 120.0,
        retry: RetryPolicy | None = None,
        transport: httpx.BaseTransport | None = None,
        async_transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        if concurrency_controller is not None or max_concurrency is not None:
            raise UnsupportedOperationError(
                "DeploymentSampler: concurrency_controller / max_concurrency are not supported; "
                "one request carries all n samples, and a weightsync deployment bounds its own "
                "queue (HTTP 429 with Retry-After when full). Pass None"
            )
        self.inference_url = inference_url.rstrip("/")
        self.model = model
        self.tokenizer = _load_tokenizer(tokenizer)
        self._headers = auth_headers(api_key, additional_headers)
        self._verify_ssl = verify_ssl
        self._timeout_s = timeout_s
        self._retry = retry or RetryPolicy()
        self._transport = transport
        self._async_transport = async_transport
        self._lock = threading.Lock()
        self._http: DeploymentHTTP | None = None
        # One async pool per event loop (an entry goes when its loop is collected), each
        # held open by an async generator the loop finalizes (see `_pool_lifetime`).
        self._async_http: weakref.WeakKeyDictionary[
            asyncio.AbstractEventLoop, tuple[AsyncDeploymentHTTP, _PoolLifetime]
        ] = weakref.WeakKeyDictionary()

    # --- connections ----------------------------------------------------------

    def _sync_client(self) -> DeploymentHTTP:
        with self._lock:
            if self._http is None:
                self._http = DeploymentHTTP(
                    headers=self._headers,
                    verify_ssl=self._verify_ssl,
                    timeout_s=self._timeout_s,
                    retry=self._retry,
                    transport=self._transport,
                )
            return self._http

    async def _async_client(self) -> AsyncDeploymentHTTP:
        loop = asyncio.get_running_loop()
        with self._lock:
            entry = self._async_http.get(loop)
            opened = entry is None
            if entry is None:
                client = AsyncDeploymentHTTP(
                    headers=self._headers,
                    verify_ssl=self._verify_ssl,
                    timeout_s=self._timeout_s,
                    retry=self._retry,
                    transport=self._async_transport,
                )
                entry = self._async_http[loop] = (client, _pool_lifetime(client))
        if opened:
            await anext(entry[1])  # started: the loop now finalizes it (never suspends)
        return entry[0]

    def close(self) -> None:
        """Close the synchronous pool (a later `sample` opens a new one)."""
        with self._lock:
            http, self._http = self._http, None
        if http is not None:
            http.close()

    async def aclose(self) -> None:
        """Close the running event loop's async pool, and the synchronous pool."""
        await self._close_loop_pool()
        self.close()

    async def _close_loop_pool(self) -> None:
        with self._lock:
            entry = self._async_http.pop(asyncio.get_running_loop(), None)
        if entry is not None:
            await entry[1].aclose()  # its `finally` closes the pool

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    # --- request building ----------------------------------------------------

    def _request(
        self,
        messages: list[Message] | None,
        prompt_token_ids: list[int] | None,
        *,
        n: int,
        max_tokens: int,
        temperature: float,
        top_p: float,
        seed: int | None,
        stop_token_ids: list[int] | None,
    ) -> tuple[str, dict[str, Any], list[int] | None]:
        if (messages is None) == (prompt_token_ids is None):
            raise InvalidInputError("give exactly one of messages= or prompt_token_ids=")
        if n < 1 or max_tokens < 1:
            raise InvalidInputError(f"n and max_tokens must be >= 1, got n={n}, {max_tokens=}")
        body: dict[str, Any] = {
            "model": self.model or "default",
            "n": n,
            "max_tokens": max_tokens,
            "temperature": temperature,
            "top_p": top_p,
            "return_token_ids": True,
        }
        if seed is not None:
            body["seed"] = seed
        if stop_token_ids:
            body["stop_token_ids"] = list(stop_token_ids)
        if messages is not None and self.tokenizer is None:
            body.update(messages=list(messages), logprobs=True)
            return CHAT_COMPLETIONS_PATH, body, None
        if messages is not None:
            prompt_token_ids = self.render(messages)
        ids = [int(t) for t in prompt_token_ids or []]
        if not ids:
            raise InvalidInputError("the prompt is empty")
        body.update(prompt=ids, logprobs=0)
        return COMPLETIONS_PATH, body, ids

    def render(self, messages: list[Message]) -> list[int]:
        """Token ids of `messages` under the tokenizer's chat template (generation prompt on)."""
        if self.tokenizer is None:
            raise InvalidInputError("rendering messages needs a tokenizer (tokenizer=)")
        ids = self.tokenizer.apply_chat_template(
            messages, add_generation_prompt=True, tokenize=True
        )
        if isinstance(ids, dict) or hasattr(ids, "keys"):
            ids = ids["input_ids"]
        return [int(t) for t in ids]

    # --- sampling --------------------------------------------------------------

    async def sample_with_tokens(
        self,
        messages: list[Message] | None = None,
        n: int = 1,
        max_tokens: int = 1024,
        temperature: float = 1.0,
        max_seq_len: int | None = None,
        *,
        prompt_token_ids: list[int] | None = None,
        top_p: float = 1.0,
        seed: int | None = None,
        stop_token_ids: list[int] | None = None,
        logprobs: bool = True,
    ) -> list[SampledCompletion]:
        """Sample `n` completions; each carries tokens, logprobs and its snapshot identity.

        The SDK's positional order (`messages, n, max_tokens, temperature, max_seq_len`);
        a prompt at least `max_seq_len` tokens long gives `[]`, as in the SDK.
        """
        request = self._request(
            messages,
            prompt_token_ids,
            n=n,
            max_tokens=max_tokens,
            temperature=temperature,
            top_p=top_p,
            seed=seed,
            stop_token_ids=stop_token_ids,
        )
        path, body, prompt_ids = request
        if _too_long(prompt_ids, max_seq_len):
            return []
        client = await self._async_client()
        response = await client.post_json(self.inference_url + path, body)
        return self._parse(
            response, prompt_ids, chat=path == CHAT_COMPLETIONS_PATH, logprobs=logprobs
        )

    async def sample_with_prompt_tokens(
        self,
        prompt_token_ids: list[int],
        n: int = 1,
        max_tokens: int = 1024,
        temperature: float = 1.0,
        max_seq_len: int | None = None,
        *,
        top_p: float = 1.0,
        seed: int | None = None,
        stop_token_ids: list[int] | None = None,
        logprobs: bool = True,
    ) -> list[SampledCompletion]:
        """`sample_with_tokens` for a prompt already tokenized (no chat template applied)."""
        return await self.sample_with_tokens(
            None,
            n,
            max_tokens,
            temperature,
            max_seq_len,
            prompt_token_ids=prompt_token_ids,
            top_p=top_p,
            seed=seed,
            stop_token_ids=stop_token_ids,
            logprobs=logprobs,
        )

    def sample(
        self,
        messages: list[Message] | None = None,
        n: int = 1,
        max_tokens: int = 1024,
        temperature: float = 1.0,
        max_seq_len: int | None = None,
        *,
        prompt_token_ids: list[int] | None = None,
        top_p: float = 1.0,
        seed: int | None = None,
        stop_token_ids: list[int] | None = None,
        logprobs: bool = True,
    ) -> list[SampledCompletion]:
        """The synchronous form of `sample_with_tokens` (usable inside a running event loop)."""
        path, body, prompt_ids = self._request(
            messages,
            prompt_token_ids,
            n=n,
            max_tokens=max_tokens,
            temperature=temperature,
            top_p=top_p,
            seed=seed,
            stop_token_ids=stop_token_ids,
        )
        if _too_long(prompt_ids, max_seq_len):
            return []
        response = self._sync_client().post_json(self.inference_url + path, body)
        return self._parse(
            response, prompt_ids, chat=path == CHAT_COMPLETIONS_PATH, logprobs=logprobs
        )

    def sample_batch(
        self, prompts: list[list[Message]], **kwargs: Any
    ) -> list[list[SampledCompletion]]:
        """Sample several prompts concurrently (one request each, over one pool, in a loop
        of its own); results in prompt order."""

        async def run() -> list[list[SampledCompletion]]:
            try:
                return list(
                    await asyncio.gather(
                        *(self.sample_with_tokens(messages=p, **kwargs) for p in prompts)
                    )
                )
            finally:  # this loop ends here: its pool must close inside it
                await self._close_loop_pool()

        return asyncio.run(run())

    # --- response parsing --------------------------------------------------------

    def _parse(
        self, response: Any, prompt_ids: list[int] | None, *, chat: bool, logprobs: bool = True
    ) -> list[SampledCompletion]:
        """The wire's completion (or chat completion) answer as `SampledCompletion`s."""
        parsed: CompletionResponse | ChatCompletionResponse
        try:
            if chat:
                parsed = ChatCompletionResponse.model_validate(response)
            else:
                parsed = CompletionResponse.model_validate(response)
        except ValidationError as e:
            what = "chat completion" if chat else "completion"
            raise DeploymentError(
                f"{self.inference_url}: the {what} answer is not the wire contract's "
                f"({e.errors()[0]['msg']} at "
                f"{'.'.join(str(x) for x in e.errors()[0]['loc'])}): {str(response)[:500]}"
            ) from e
        # One identity for the whole answer unless an async swap landed during it.
        whole = parsed.snapshot_identities[0] if len(parsed.snapshot_identities) == 1 else None
        results = []
        choices: list[CompletionChoice | ChatChoice] = [*parsed.choices]
        choices.sort(key=lambda c: c.index)
        for choice in choices:
            raw = choice.raw_output
            token_ids = choice.token_ids if raw is None else raw.completion_token_ids
            if token_ids is None:
                raise DeploymentError(
                    f"{self.inference_url}: the deployment returned no token ids "
                    "(`return_token_ids`); token-in/token-out sampling needs a weightsync "
                    "deployment or a server that supports it"
                )
            prompt = prompt_ids
            if prompt is None:
                prompt = choice.prompt_token_ids or (raw.prompt_token_ids if raw else []) or []
            per_token = _per_token_identities(choice.snapshot_changes, len(token_ids))
            identity = per_token[-1] if per_token else whole or parsed.snapshot_identity
            text = choice.message.content if isinstance(choice, ChatChoice) else choice.text
            results.append(
                SampledCompletion(
                    prompt_token_ids=list(prompt),
                    token_ids=list(token_ids),
                    logprobs=_logprobs(choice.logprobs) if logprobs else None,
                    text=text,
                    finish_reason=choice.finish_reason,
                    snapshot_identity=identity,
                    snapshot_identities=per_token,
                )
            )
        return results


_PoolLifetime = AsyncGenerator[AsyncDeploymentHTTP, None]


async def _pool_lifetime(client: AsyncDeploymentHTTP) -> _PoolLifetime:
    """Hold one event loop's pool open until closed, or until the loop itself ends.

    Started inside the loop, the generator is finalized by it (PEP 525): `asyncio.run`
    closes it at the loop's end (`shutdown_asyncgens`), so a caller that never awaited
    `aclose()` still has its connections closed inside the loop they belong to.
    """
    try:
        yield client
    finally:
        await client.aclose()


def _too_long(prompt_ids: list[int] | None, max_seq_len: int | None) -> bool:
    return max_seq_len is not None and prompt_ids is not None and len(prompt_ids) >= max_seq_len


def _per_token_identities(
    changes: list[SnapshotChange] | None, num_tokens: int
) -> list[str] | None:
    """The identity behind each token, from the points where it changed (None: it never did)."""
    if not changes:
        return None
    identities: list[str] = []
    for change, following in zip(changes, [*changes[1:], None], strict=True):
        stop = num_tokens if following is None else following.token_index
        identities += [change.snapshot_identity] * (stop - change.token_index)
    return identities


def _logprobs(logprobs: LegacyLogprobs | ContentLogprobs | None) -> list[float] | None:
    if logprobs is None:
        return None
    if isinstance(logprobs, ContentLogprobs):
        return [item.logprob for item in logprobs.content]
    if any(v is None for v in logprobs.token_logprobs):
        return None
    return [float(v) for v in logprobs.token_logprobs if v is not None]


def _load_tokenizer(tokenizer: Any) -> Any:
    if tokenizer is None or not isinstance(tokenizer, str | os.PathLike):
        return tokenizer
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(tokenizer))
