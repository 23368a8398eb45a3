"""OpenAI-compatible inference: `/v1/completions`, `/v1/chat/completions`, `/v1/models`.

Every response names the snapshot that produced it: `model` is
`"<model_name>@<identity>"`, `snapshot_identity` the identity of the last
generated token, and `snapshot_identities` every identity in token order (more
than one only when an `async` transition swapped weights mid-generation; each
choice then lists `snapshot_changes` with the token index where it changed).
"""

from __future__ import annotations

import time
import uuid
from typing import Any

from fastapi import APIRouter, Header
from pydantic import BaseModel, ConfigDict, Field

from weightsync.errors import InvalidInputError
from weightsync.server.engines.base import GenerateRequest, GenerateResult
from weightsync.server.replica import Replica
from weightsync.server.tokenizer import TextTokenizer

MAX_CHOICES = 16
MAX_LOGPROBS = 20


class _SamplingFields(BaseModel):
    model_config = ConfigDict(extra="allow")

    model: str | None = None
    max_tokens: int | None = Field(default=None, ge=1)
    temperature: float = Field(default=1.0, ge=0.0, le=10.0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    n: int = Field(default=1, ge=1, le=MAX_CHOICES)
    seed: int | None = None
    stream: bool = False
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    return_token_ids: bool = False


class CompletionRequest(_SamplingFields):
    prompt: str | list[int] | list[str] | list[list[int]]
    logprobs: int | None = Field(default=None, ge=0, le=MAX_LOGPROBS)
    echo: bool = False


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")

    role: str
    content: str | list[dict[str, Any]] | None = None


class ChatCompletionRequest(_SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(default=None, ge=0, le=MAX_LOGPROBS)
    max_completion_tokens: int | None = Field(default=None, ge=1)


def _truthy(header: str | None) -> bool:
    return header is not None and header.strip().lower() in ("1", "true", "yes")


class Generator:
    """Runs OpenAI requests on a replica (called from FastAPI's thread pool)."""

    def __init__(self, replica: Replica) -> None:
        self.replica = replica

    # --- request -> GenerateRequests ------------------------------------------

    def _check_common(self, req: _SamplingFields) -> None:
        if req.stream:
            raise InvalidInputError("stream=true is not supported; send stream=false")
        if req.stop:
            raise InvalidInputError(
                "stop strings are not supported; pass stop_token_ids (token ids) instead"
            )

    def _adapter(self, model: str | None) -> str | None:
        """A `model` naming a loaded LoRA adapter selects it; any other name means the base."""
        if not model:
            return None
        name = model.split("@", 1)[1] if "@" in model else model
        return name if name in self.replica.engine.loaded_adapters() else None

    def _prompts(self, prompt: str | list[int] | list[str] | list[list[int]]) -> list[list[int]]:
        if isinstance(prompt, str):
            raw: list[str | list[int]] = [prompt]
        elif prompt and all(isinstance(p, int) for p in prompt):
            raw = [[int(p) for p in prompt]]  # type: ignore[arg-type]
        else:
            raw = list(prompt)  # type: ignore[arg-type]
        if not raw:
            raise InvalidInputError("prompt is empty; send a string or a list of token ids")
        return [self._token_ids(p) for p in raw]

    def _token_ids(self, prompt: str | list[int]) -> list[int]:
        ids: list[int]
        if isinstance(prompt, str):
            ids = self._tokenizer_or_raise("string prompts").encode(prompt)
        else:
            ids = list(prompt)
        if not ids:
            raise InvalidInputError("a prompt has no tokens; send at least one token")
        vocab = int(self.replica.model_config.get("vocab_size", 0) or 0)
        bad = [i for i in ids if i < 0 or (vocab and i >= vocab)]
        if bad:
            raise InvalidInputError(
                f"prompt token ids {bad[:5]} are outside the vocabulary [0, {vocab})"
            )
        return ids

    def _tokenizer_or_raise(self, what: str) -> TextTokenizer:
        tok = self.replica.tokenizer
        if tok is None:
            raise InvalidInputError(
                f"{what} need a tokenizer, and the served snapshot has none; send token-id "
                "prompts to /v1/completions, or save the snapshot with its tokenizer files"
            )
        return tok

    def _stop_ids(self, req: _SamplingFields) -> tuple[int, ...]:
        ids: list[int] = list(req.stop_token_ids or [])
        eos = self.replica.model_config.get("eos_token_id")
        ids += eos if isinstance(eos, list) else ([] if eos is None else [int(eos)])
        tok = self.replica.tokenizer
        if tok is not None and tok.eos_token_id is not None:
            ids.append(tok.eos_token_id)
        return tuple(dict.fromkeys(ids))

    def _run(
        self,
        prompts: list[list[int]],
        req: _SamplingFields,
        *,
        max_tokens: int,
        logprobs: int | None,
        session: str | None,
        no_wait: bool,
    ) -> tuple[list[tuple[int, GenerateResult]], str]:
        adapter = self._adapter(req.model)
        stop = self._stop_ids(req)
        results = []
        with self.replica.generation(no_wait=no_wait) as step_guard:
            started_on = self.replica.current_identity or ""
            for p_index, ids in enumerate(prompts):
                for j in range(req.n):
                    greq = GenerateRequest(
                        prompt_token_ids=ids,
                        max_tokens=max_tokens,
                        temperature=req.temperature,
                        top_p=req.top_p,
                        seed=None if req.seed is None else req.seed + j,
                        logprobs=logprobs,
                        stop_token_ids=stop,
                        adapter=adapter,
                        cache_session=session,
                    )
                    results.append(
                        (p_index, self.replica.engine.generate(greq, step_guard=step_guard))
                    )
        self.replica.metrics.generated_tokens.inc(sum(len(r.token_ids) for _, r in results))
        return results, started_on

    # --- responses ----------------------------------------------------------

    def _envelope(
        self,
        obj: str,
        results: list[tuple[int, GenerateResult]],
        started_on: str,
        prompts: list[list[int]],
        adapter: str | None,
    ) -> dict[str, Any]:
        identities: list[str] = []
        for _, r in results:
            for ident in r.token_snapshots:
                if not identities or identities[-1] != ident:
                    identities.append(ident)
        if not identities:
            identities = [started_on]
        identity = adapter or identities[-1]
        completion_tokens = sum(len(r.token_ids) for _, r in results)
        prompt_tokens = sum(len(p) for p in prompts)
        out: dict[str, Any] = {
            "id": f"{'chatcmpl' if obj == 'chat.completion' else 'cmpl'}-{uuid.uuid4().hex}",
            "object": obj,
            "created": int(time.time()),
            "model": f"{self.replica.config.model_name}@{identity}",
            "snapshot_identity": identity,
            "snapshot_identities": identities,
            "usage": {
                "prompt_tokens": prompt_tokens,
                "completion_tokens": completion_tokens,
                "total_tokens": prompt_tokens + completion_tokens,
                "prompt_tokens_details": {
                    "cached_tokens": sum(r.num_cached_prompt_tokens for _, r in results)
                },
            },
        }
        if adapter is not None:
            out["adapter"] = adapter
            out["base_snapshot_identity"] = identities[-1]
        return out

    @staticmethod
    def _changes(r: GenerateResult) -> list[dict[str, Any]] | None:
        changes = [
            {"token_index": i, "snapshot_identity": ident}
            for i, ident in enumerate(r.token_snapshots)
            if i == 0 or r.token_snapshots[i - 1] != ident
        ]
        return changes if len(changes) > 1 else None

    def _text(self, ids: list[int]) -> str:
        tok = self.replica.tokenizer
        return tok.decode(ids) if tok is not None else ""

    def _token_strings(self, ids: list[int]) -> list[str]:
        tok = self.replica.tokenizer
        return tok.token_strings(ids) if tok is not None else [f"token_id:{i}" for i in ids]

    def completion(
        self, req: CompletionRequest, *, session: str | None, no_wait: bool
    ) -> dict[str, Any]:
        self._check_common(req)
        if req.echo:
            raise InvalidInputError("echo=true is not supported; send echo=false")
        prompts = self._prompts(req.prompt)
        results, started_on = self._run(
            prompts,
            req,
            max_tokens=req.max_tokens or 16,
            logprobs=req.logprobs,
            session=session,
            no_wait=no_wait,
        )
        choices = []
        for index, (p_index, r) in enumerate(results):
            choice: dict[str, Any] = {
                "index": index,
                "text": self._text(r.token_ids),
                "logprobs": self._completion_logprobs(r) if req.logprobs is not None else None,
                "finish_reason": r.finish_reason,
            }
            if req.return_token_ids:
                choice["token_ids"] = list(r.token_ids)
                choice["prompt_token_ids"] = prompts[p_index]
            changes = self._changes(r)
            if changes:
                choice["snapshot_changes"] = changes
            choices.append(choice)
        out = self._envelope(
            "text_completion", results, started_on, prompts, self._adapter(req.model)
        )
        out["choices"] = choices
        return out

    def _completion_logprobs(self, r: GenerateResult) -> dict[str, Any]:
        tokens = self._token_strings(r.token_ids)
        offsets, pos = [], 0
        for t in tokens:
            offsets.append(pos)
            pos += len(t)
        top = None
        if r.top_logprobs is not None:
            top = [
                dict(zip(self._token_strings(list(d)), d.values(), strict=True))
                for d in r.top_logprobs
            ]
        return {
            "tokens": tokens,
            "token_logprobs": list(r.logprobs or []),
            "top_logprobs": top,
            "text_offset": offsets,
        }

    def chat(
        self, req: ChatCompletionRequest, *, session: str | None, no_wait: bool
    ) -> dict[str, Any]:
        self._check_common(req)
        tok = self._tokenizer_or_raise("chat completions")
        messages = [{"role": m.role, "content": _content_text(m.content)} for m in req.messages]
        prompt = self._token_ids(tok.render_chat(messages))
        want = (req.top_logprobs or 0) if req.logprobs else None
        max_tokens = req.max_completion_tokens or req.max_tokens or 16
        results, started_on = self._run(
            [prompt],
            req,
            max_tokens=max_tokens,
            logprobs=want,
            session=session,
            no_wait=no_wait,
        )
        choices = []
        for index, (_, r) in enumerate(results):
            choice: dict[str, Any] = {
                "index": index,
                "message": {"role": "assistant", "content": self._text(r.token_ids)},
                "logprobs": self._chat_logprobs(r) if req.logprobs else None,
                "finish_reason": r.finish_reason,
            }
            if req.return_token_ids:
                choice["token_ids"] = list(r.token_ids)
            changes = self._changes(r)
            if changes:
                choice["snapshot_changes"] = changes
            choices.append(choice)
        out = self._envelope(
            "chat.completion", results, started_on, [prompt], self._adapter(req.model)
        )
        out["choices"] = choices
        return out

    def _chat_logprobs(self, r: GenerateResult) -> dict[str, Any]:
        tokens = self._token_strings(r.token_ids)
        content = []
        for i, (token, lp) in enumerate(zip(tokens, r.logprobs or [], strict=False)):
            top = []
            if r.top_logprobs is not None:
                d = r.top_logprobs[i]
                top = [
                    {"token": s, "logprob": v, "bytes": list(s.encode())}
                    for s, v in zip(self._token_strings(list(d)), d.values(), strict=True)
                ]
            content.append(
                {"token": token, "logprob": lp, "bytes": list(token.encode()), "top_logprobs": top}
            )
        return {"content": content}

    def models(self) -> dict[str, Any]:
        created = int(time.time())
        name = self.replica.config.model_name
        ids = [name]
        if self.replica.current_identity:
            ids.append(f"{name}@{self.replica.current_identity}")
        ids += self.replica.engine.loaded_adapters()
        return {
            "object": "list",
            "data": [
                {"id": i, "object": "model", "created": created, "owned_by": "weightsync"}
                for i in ids
            ],
        }


def _content_text(content: str | list[dict[str, Any]] | None) -> str:
    if content is None or isinstance(content, str):
        return content or ""
    parts = []
    for part in content:
        if part.get("type") != "text" or not isinstance(part.get("text"), str):
            raise InvalidInputError(
                f"message content part {part.get('type')!r} is not supported; send text parts"
            )
        parts.append(part["text"])
    return "".join(parts)


SESSION_HEADER = "x-multi-turn-session-id"
NO_WAIT_HEADER = "x-weightsync-no-wait"


def build_openai_router(replica: Replica) -> APIRouter:
    """Routes of the inference API (sync handlers: FastAPI runs them in its thread pool)."""
    router = APIRouter()
    gen = Generator(replica)

    @router.post("/v1/completions")
    def completions(
        body: CompletionRequest,
        x_multi_turn_session_id: str | None = Header(default=None),
        x_weightsync_no_wait: str | None = Header(default=None),
    ) -> dict[str, Any]:
        return gen.completion(
            body, session=x_multi_turn_session_id, no_wait=_truthy(x_weightsync_no_wait)
        )

    @router.post("/v1/chat/completions")
    def chat_completions(
        body: ChatCompletionRequest,
        x_multi_turn_session_id: str | None = Header(default=None),
        x_weightsync_no_wait: str | None = Header(default=None),
    ) -> dict[str, Any]:
        return gen.chat(
            body, session=x_multi_turn_session_id, no_wait=_truthy(x_weightsync_no_wait)
        )

    @router.get("/v1/models")
    def models() -> dict[str, Any]:
        return gen.models()

    return router
