"""The inference wire: OpenAI completion and chat requests, responses and stream chunks.

Requests accept what the OpenAI clients and the Fireworks SDK's sampler send
(`logprobs` as a count or `true`, `top_k`, `raw_output`, `echo`, stop strings or
token ids); fields this server does not use are accepted and ignored. Every
response names the snapshot that produced it: `model` is
`"<model_name>@<identity>"`; a stream chunk names the snapshot of its own tokens.

Logprobs come in two shapes. `logprobs: <int>` on `/v1/completions` gets the
legacy OpenAI shape (`tokens`, `token_logprobs`, `top_logprobs`, `text_offset`);
`logprobs: true` (with `top_logprobs: <k>`), and every chat request, gets
`content[]` entries with `token`, `token_id`, `logprob`, `sampling_logprob`
(the behaviour policy's logprob, after temperature/top-k/top-p), `bytes` and
`top_logprobs[]` — what the Fireworks SDK parses.
"""

from __future__ import annotations

from typing import Any, ClassVar, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SerializerFunctionWrapHandler,
    field_validator,
    model_serializer,
    model_validator,
)

MAX_CHOICES = 16
MAX_LOGPROBS = 20
MAX_STOP_STRINGS = 16
DEFAULT_MAX_TOKENS = 16

FinishReason = Literal["stop", "length"]


def split_model(model: str) -> tuple[str, str]:
    """A request's `model` as a replica reads it: (what names the deployment, what it serves).

    `accounts/a/deployments/d@adapter` names LoRA adapter `adapter` of deployment
    `accounts/a/deployments/d`; a name without `@` is both (the model's name, or an
    adapter's identity). A served name that is no loaded adapter means the base weights.
    """
    deployment, at, served = model.partition("@")
    return (deployment, served) if at else (model, model)


# --- requests ----------------------------------------------------------------


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="allow")

    #: One more chunk at the end with `choices: []` and the request's `usage`.
    include_usage: bool = False


class SamplingFields(BaseModel):
    """What completion and chat requests share."""

    model_config = ConfigDict(extra="allow")

    model: str | None = None
    max_tokens: int | None = Field(default=None, ge=0)
    temperature: float = Field(default=1.0, ge=0.0, le=10.0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    #: 0 (or -1, as vLLM spells it): no limit.
    top_k: int = Field(default=0, ge=-1)
    n: int = Field(default=1, ge=1, le=MAX_CHOICES)
    seed: int | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    #: vLLM's spelling: `token_ids` (and `prompt_token_ids`) on each choice.
    return_token_ids: bool = False
    #: Fireworks' spelling: `raw_output.{prompt,completion}_token_ids` on each choice.
    raw_output: bool = False
    #: Fireworks': `perf_metrics` (queue wait, time to first token, ...) on the last chunk
    #: of a stream; the same values are response headers either way.
    perf_metrics_in_response: bool = False

    def stop_strings(self) -> list[str]:
        if self.stop is None:
            return []
        return [self.stop] if isinstance(self.stop, str) else list(self.stop)


class CompletionRequest(SamplingFields):
    prompt: str | list[int] | list[str] | list[list[int]]
    #: A count: legacy logprobs with that many alternatives; true: `content[]` logprobs.
    logprobs: bool | int | None = Field(default=None)
    #: Alternatives per token for `logprobs: true`.
    top_logprobs: int | None = Field(default=None, ge=0, le=MAX_LOGPROBS)
    echo: bool = False

    @field_validator("logprobs")
    @classmethod
    def _logprobs_count(cls, value: bool | int | None) -> bool | int | None:
        if not isinstance(value, bool) and value is not None and not 0 <= value <= MAX_LOGPROBS:
            raise ValueError(f"logprobs must be true, false or a count in [0, {MAX_LOGPROBS}]")
        return value

    @model_validator(mode="after")
    def _zero_tokens_only_with_echo(self) -> CompletionRequest:
        if self.max_tokens == 0 and not self.echo:
            raise ValueError(
                "max_tokens must be >= 1 (0 only with echo=true, to score the prompt alone)"
            )
        return self

    @property
    def content_logprobs(self) -> bool:
        """`logprobs: true` (or a `top_logprobs` count): the `content[]` shape."""
        return self.logprobs is True or (self.logprobs is None and self.top_logprobs is not None)


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")

    role: str
    content: str | list[dict[str, Any]] | None = None


class ChatCompletionRequest(SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(default=None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(default=None, ge=0, le=MAX_LOGPROBS)
    max_completion_tokens: int | None = Field(default=None, ge=1)


# --- response parts ------------------------------------------------------------


class _Out(BaseModel):
    """A response part; fields named in `_omit_if_none` are left out when None."""

    _omit_if_none: ClassVar[frozenset[str]] = frozenset()

    @model_serializer(mode="wrap")
    def _omit(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        data: dict[str, Any] = handler(self)
        return {k: v for k, v in data.items() if not (v is None and k in self._omit_if_none)}


class TopLogprob(_Out):
    token: str
    token_id: int
    logprob: float
    bytes: list[int]


class TokenLogprob(_Out):
    _omit_if_none = frozenset({"sampling_logprob"})

    token: str
    token_id: int
    logprob: float
    #: None when the engine cannot tell (the vLLM engine).
    sampling_logprob: float | None = None
    bytes: list[int]
    top_logprobs: list[TopLogprob] = Field(default_factory=list)


class ContentLogprobs(_Out):
    content: list[TokenLogprob]


class LegacyLogprobs(_Out):
    tokens: list[str]
    token_logprobs: list[float | None]
    top_logprobs: list[dict[str, float]] | None
    text_offset: list[int]


class RawOutput(_Out):
    """Fireworks' `raw_output`: the exact token ids (with `echo`, the prompt's come first)."""

    prompt_token_ids: list[int]
    completion_token_ids: list[int]
    completion: str


class SnapshotChange(_Out):
    token_index: int
    snapshot_identity: str


class PromptTokensDetails(_Out):
    cached_tokens: int


class Usage(_Out):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: PromptTokensDetails


_CHOICE_EXTRAS = frozenset({"token_ids", "prompt_token_ids", "raw_output", "snapshot_changes"})


class CompletionChoice(_Out):
    _omit_if_none = _CHOICE_EXTRAS

    index: int
    text: str
    logprobs: LegacyLogprobs | ContentLogprobs | None = None
    finish_reason: FinishReason | None = None
    token_ids: list[int] | None = None
    prompt_token_ids: list[int] | None = None
    raw_output: RawOutput | None = None
    #: Where an `async` swap changed the weights mid-generation (more than one entry).
    snapshot_changes: list[SnapshotChange] | None = None


class ChatMessageOut(_Out):
    role: Literal["assistant"] = "assistant"
    content: str


class ChatChoice(_Out):
    _omit_if_none = _CHOICE_EXTRAS

    index: int
    message: ChatMessageOut
    logprobs: ContentLogprobs | None = None
    finish_reason: FinishReason | None = None
    token_ids: list[int] | None = None
    prompt_token_ids: list[int] | None = None
    raw_output: RawOutput | None = None
    snapshot_changes: list[SnapshotChange] | None = None


#: `perf_metrics` / header name -> value (seconds, or a count), as the Fireworks SDK reads them.
PerfMetrics = dict[str, float | int]


class _Envelope(_Out):
    _omit_if_none = frozenset({"adapter", "base_snapshot_identity", "usage", "perf_metrics"})

    id: str
    created: int
    #: `<model_name>@<identity>` (the adapter's name for a LoRA request).
    model: str
    #: The identity of the last generated token (the start identity when none).
    snapshot_identity: str
    adapter: str | None = None
    base_snapshot_identity: str | None = None
    usage: Usage | None = None
    #: On a stream's last chunk with `perf_metrics_in_response`.
    perf_metrics: PerfMetrics | None = None


class CompletionResponse(_Envelope):
    object: Literal["text_completion"] = "text_completion"
    #: Every identity in token order (more than one only across an `async` swap).
    snapshot_identities: list[str]
    choices: list[CompletionChoice]


class ChatCompletionResponse(_Envelope):
    object: Literal["chat.completion"] = "chat.completion"
    snapshot_identities: list[str]
    choices: list[ChatChoice]


# --- stream chunks (`data: {...}` lines of the SSE stream, then `data: [DONE]`) --------


class CompletionChunkChoice(_Out):
    _omit_if_none = _CHOICE_EXTRAS

    index: int
    text: str
    logprobs: LegacyLogprobs | ContentLogprobs | None = None
    finish_reason: FinishReason | None = None
    #: This chunk's tokens (with `return_token_ids`).
    token_ids: list[int] | None = None
    prompt_token_ids: list[int] | None = None
    #: On the choice's last chunk, the whole choice's ids (with `raw_output`).
    raw_output: RawOutput | None = None


class CompletionChunk(_Envelope):
    """One chunk; `model` and `snapshot_identity` name the weights of its tokens."""

    object: Literal["text_completion"] = "text_completion"
    choices: list[CompletionChunkChoice]


class ChatDelta(_Out):
    _omit_if_none = frozenset({"role", "content"})

    role: Literal["assistant"] | None = None
    content: str | None = None


class ChatChunkChoice(_Out):
    _omit_if_none = _CHOICE_EXTRAS

    index: int
    delta: ChatDelta
    logprobs: ContentLogprobs | None = None
    finish_reason: FinishReason | None = None
    token_ids: list[int] | None = None
    prompt_token_ids: list[int] | None = None
    raw_output: RawOutput | None = None


class ChatCompletionChunk(_Envelope):
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    choices: list[ChatChunkChoice]


class StreamError(_Out):
    """The body of an `event: error` SSE event (the request failed after its 200)."""

    message: str
    type: str
    code: int
    status_code: int


class StreamErrorEvent(_Out):
    error: StreamError


# --- models list ---------------------------------------------------------------------


class ModelCard(_Out):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "weightsync"


class ModelList(_Out):
    object: Literal["list"] = "list"
    data: list[ModelCard]


SSE_DONE = b"data: [DONE]\n\n"


def sse_data(model: BaseModel) -> bytes:
    """One SSE event carrying `model` as JSON."""
    return b"data: " + model.model_dump_json().encode() + b"\n\n"


def sse_error(error: StreamErrorEvent) -> bytes:
    return b"event: error\ndata: " + error.model_dump_json().encode() + b"\n\n"
