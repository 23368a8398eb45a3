"""Generating OpenAI completions on a replica: plan, run, and shape the answers and chunks.

A request is planned against the served model (token ids, stops, logprob shape),
then run on an inference worker: each choice is one engine sequence, decoded as
it comes (`IncrementalText`: stop strings, held-back text) and, when streaming,
emitted as one chunk per decoding step whose `model` names the snapshot of that
step's tokens. `openai_api` serves it over HTTP.
"""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

from weightsync.errors import (
    DeploymentNotFoundError,
    InvalidInputError,
    SnapshotNotFoundError,
    UnsupportedOperationError,
)
from weightsync.server.engines.base import GenerateRequest, GenerateResult
from weightsync.server.inference_admission import (
    cancellable,
)
from weightsync.server.replica import Replica
from weightsync.server.tokenizer import IncrementalText, TextTokenizer
from weightsync.wire.inference import (
    DEFAULT_MAX_TOKENS,
    MAX_STOP_STRINGS,
    ChatChoice,
    ChatChunkChoice,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatDelta,
    ChatMessageOut,
    CompletionChoice,
    CompletionChunk,
    CompletionChunkChoice,
    CompletionRequest,
    CompletionResponse,
    ContentLogprobs,
    LegacyLogprobs,
    ModelCard,
    ModelList,
    PerfMetrics,
    PromptTokensDetails,
    RawOutput,
    SamplingFields,
    SnapshotChange,
    TokenLogprob,
    TopLogprob,
    Usage,
    split_model,
    sse_data,
)

__all__ = ["Emit", "Generator", "Plan", "RequestTiming"]

Kind = Literal["completion", "chat"]
LogprobsShape = Literal["legacy", "content"]
#: Hands the event loop one SSE event's bytes (`b""` first: the request has started).
Emit = Callable[[bytes], None]


@dataclass
class Plan:
    """A request resolved against the served model: token ids, stops, logprob shape."""

    kind: Kind
    req: SamplingFields
    prompts: list[list[int]]
    max_tokens: int
    #: Alternatives per token (None: no logprobs).
    logprobs: int | None
    shape: LogprobsShape
    echo: bool
    stop_strings: list[str]
    stop_ids: tuple[int, ...]
    adapter: str | None
    session: str | None
    no_wait: bool
    id: str = field(default_factory=lambda: uuid.uuid4().hex)
    created: int = field(default_factory=lambda: int(time.time()))
    timing: RequestTiming | None = None


@dataclass
class RequestTiming:
    """When a request arrived, started on a worker, and produced its first token."""

    arrived: float
    started: float
    concurrent: int
    first_token: float | None = None

    def perf_metrics(self, sequences: list[_Sequence] | None = None) -> PerfMetrics:
        """The Fireworks SDK's server metrics (it adapts its concurrency to the queue wait)."""
        now = time.perf_counter()
        out: PerfMetrics = {
            "prefill-queue-duration": self.started - self.arrived,
            "num-concurrent-requests": self.concurrent,
        }
        if self.first_token is not None:
            out["server-time-to-first-token"] = self.first_token - self.arrived
        if sequences is not None:
            out["server-processing-time"] = now - self.arrived
            out["generation-duration"] = now - self.started
        return out


@dataclass
class _Sequence:
    """One choice being generated, and what of it was already streamed."""

    index: int
    prompt_index: int
    text: IncrementalText
    result: GenerateResult | None = None
    sent_tokens: int = 0
    counted_tokens: int = 0
    text_offset: int = 0
    started: bool = False


class Generator:
    """Runs OpenAI requests on a replica (on its inference executor, one thread per request)."""

    def __init__(self, replica: Replica) -> None:
        self.replica = replica

    # --- request -> plan ---------------------------------------------------------

    def plan_completion(
        self, req: CompletionRequest, *, session: str | None, no_wait: bool
    ) -> Plan:
        want: int | None
        if req.content_logprobs:
            want = req.top_logprobs or 0
        elif req.logprobs is None or req.logprobs is False:
            want = None
        else:
            want = int(req.logprobs)
        if req.echo and want is not None and not self.replica.engine.supports_prompt_logprobs:
            raise UnsupportedOperationError(
                f"echo with logprobs needs prompt logprobs, which engine "
                f"{self.replica.engine.name!r} does not compute; use the torch engine or "
                "send echo=false"
            )
        return self._plan(
            "completion",
            req,
            self._prompts(req.prompt),
            max_tokens=DEFAULT_MAX_TOKENS if req.max_tokens is None else req.max_tokens,
            logprobs=want,
            shape="content" if req.content_logprobs else "legacy",
            echo=req.echo,
            session=session,
            no_wait=no_wait,
        )

    def plan_chat(self, req: ChatCompletionRequest, *, session: str | None, no_wait: bool) -> Plan:
        tok = self._tokenizer_or_raise("chat completions")
        messages = [{"role": m.role, "content": _content_text(m.content)} for m in req.messages]
        prompt = self._token_ids(tok.render_chat(messages))
        max_tokens = req.max_completion_tokens or req.max_tokens
        return self._plan(
            "chat",
            req,
            [prompt],
            max_tokens=DEFAULT_MAX_TOKENS if max_tokens is None else max_tokens,
            logprobs=(req.top_logprobs or 0) if req.logprobs else None,
            shape="content",
            echo=False,
            session=session,
            no_wait=no_wait,
        )

    def _plan(
        self,
        kind: Kind,
        req: SamplingFields,
        prompts: list[list[int]],
        *,
        max_tokens: int,
        logprobs: int | None,
        shape: LogprobsShape,
        echo: bool,
        session: str | None,
        no_wait: bool,
    ) -> Plan:
        stops = req.stop_strings()
        if len(stops) > MAX_STOP_STRINGS:
            raise InvalidInputError(
                f"{len(stops)} stop strings given; send at most {MAX_STOP_STRINGS}"
            )
        if "" in stops:
            raise InvalidInputError(
                "a stop string is empty, and an empty string cannot be matched; to stop on a "
                "token id (one whose text is empty, too), send stop_token_ids"
            )
        stop_ids = list(req.stop_token_ids or [])
        if stops:
            tok = self._tokenizer_or_raise("stop strings")
            # A stop string that is one special token (e.g. "<|im_end|>") never shows in
            # the decoded text (special tokens are skipped), so stop on its id.
            stop_ids += [i for i in map(tok.single_token_id, stops) if i is not None]
        return Plan(
            kind=kind,
            req=req,
            prompts=prompts,
            max_tokens=max_tokens,
            logprobs=logprobs,
            shape=shape,
            echo=echo,
            stop_strings=stops,
            stop_ids=self._stop_ids(stop_ids),
            adapter=self._adapter(req.model),
            session=session,
            no_wait=no_wait,
        )

    def _adapter(self, model: str | None) -> str | None:
        """A `model` naming a loaded LoRA adapter selects it; any other name means the base.

        A Fireworks deployment name (`accounts/{a}/deployments/{d}`) of another deployment
        is refused (`DeploymentNotFoundError`, 404) naming the one served here, and so is an
        adapter this replica unloaded past its limit (`SnapshotNotFoundError`, 404).
        """
        if not model:
            return None
        deployment, name = split_model(model)
        mismatch = self.replica.config.served.mismatch(deployment, "the body's model")
        if mismatch is not None:
            raise DeploymentNotFoundError(mismatch)
        if name in self.replica.engine.loaded_adapters():
            return name
        if self.replica.pipeline.was_unloaded(name):
            raise SnapshotNotFoundError(
                f"LoRA adapter {name!r} was unloaded from replica "
                f"{self.replica.config.replica_id} (least recently used past --max-adapters "
                f"{self.replica.pipeline.max_adapters}); hot-load it again, or raise the limit"
            )
        return None

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
        # Checked here too (the engine checks again) so a stream refuses it with a 400.
        max_positions = self.replica.model_config.get("max_position_embeddings")
        if isinstance(max_positions, int) and len(ids) >= max_positions:
            raise InvalidInputError(
                f"the prompt has {len(ids)} tokens; this model takes fewer than "
                f"{max_positions} (prompt and output together)"
            )
        return ids

    def _tokenizer_or_raise(self, what: str) -> TextTokenizer:
        tok = self.replica.tokenizer
        if tok is None:
            raise InvalidInputError(
                f"{what} need a tokenizer, and the served snapshot has none; send token-id "
                "prompts and stop_token_ids to /v1/completions, or save the snapshot with "
                "its tokenizer files"
            )
        return tok

    def _stop_ids(self, extra: list[int]) -> tuple[int, ...]:
        ids: list[int] = list(extra)
        eos = self.replica.model_config.get("eos_token_id")
        ids += eos if isinstance(eos, list) else ([] if eos is None else [int(eos)])
        tok = self.replica.tokenizer
        if tok is not None and tok.eos_token_id is not None:
            ids.append(tok.eos_token_id)
        return tuple(dict.fromkeys(ids))

    # --- running -----------------------------------------------------------------

    def run(
        self, plan: Plan, cancel: threading.Event, emit: Emit | None = None
    ) -> tuple[list[_Sequence], str]:
        """Generate every choice of `plan`; with `emit`, stream each step's chunk as it comes.

        Returns the finished sequences and the identity served when the request started.
        """
        req = plan.req
        tokenizer = self.replica.tokenizer
        sequences: list[_Sequence] = []
        with self.replica.generation(no_wait=plan.no_wait) as step_guard:
            started_on = self.replica.current_identity or ""
            if emit is not None:
                emit(b"")  # the request runs: the caller may now send the 200
            guard = cancellable(step_guard, cancel)
            for p_index, ids in enumerate(plan.prompts):
                for j in range(req.n):
                    seq = _Sequence(
                        index=len(sequences),
                        prompt_index=p_index,
                        text=IncrementalText(tokenizer, plan.stop_strings),
                    )
                    sequences.append(seq)
                    greq = GenerateRequest(
                        prompt_token_ids=ids,
                        max_tokens=plan.max_tokens,
                        temperature=req.temperature,
                        top_p=req.top_p,
                        top_k=max(req.top_k, 0),
                        seed=None if req.seed is None else req.seed + j,
                        logprobs=plan.logprobs,
                        prompt_logprobs=plan.echo and plan.logprobs is not None,
                        stop_token_ids=plan.stop_ids,
                        adapter=plan.adapter,
                        cache_session=plan.session,
                    )
                    seq.result = self.replica.engine.generate(
                        greq,
                        step_guard=guard,
                        on_token=self._on_token(plan, seq, emit, started_on),
                    )
                    seq.text.update(seq.result.token_ids)
                    # The stop token itself ends the sequence without a callback.
                    self.replica.metrics.generated_tokens.inc(
                        len(seq.result.token_ids) - seq.counted_tokens
                    )
                    if emit is not None:
                        last = p_index == len(plan.prompts) - 1 and j == req.n - 1
                        emit(self._final_chunk(plan, seq, started_on, sequences if last else None))
        return sequences, started_on

    def _on_token(
        self, plan: Plan, seq: _Sequence, emit: Emit | None, started_on: str
    ) -> Callable[[GenerateResult], bool]:
        counter = self.replica.metrics.generated_tokens

        def on_token(result: GenerateResult) -> bool:
            seq.result = result
            if plan.timing is not None and plan.timing.first_token is None:
                plan.timing.first_token = time.perf_counter()
            # Counted as they come, so /metrics shows a generation progress (or stop).
            counter.inc(len(result.token_ids) - seq.counted_tokens)
            seq.counted_tokens = len(result.token_ids)
            go_on = seq.text.update(result.token_ids)
            if emit is not None:
                emit(self._step_chunk(plan, seq, started_on))
            return go_on

        return on_token

    # --- pieces of choices ----------------------------------------------------------

    def _token_strings(self, ids: list[int]) -> list[str]:
        tok = self.replica.tokenizer
        return tok.token_strings(ids) if tok is not None else [f"token_id:{i}" for i in ids]

    def _content(
        self,
        ids: list[int],
        logprobs: list[float],
        tops: list[dict[int, float]] | None,
        sampling: list[float] | None,
    ) -> list[TokenLogprob]:
        strings = self._token_strings(ids)
        out = []
        for i, (token_id, token, lp) in enumerate(zip(ids, strings, logprobs, strict=True)):
            top: list[TopLogprob] = []
            if tops is not None:
                alternatives = tops[i]
                for alt_id, alt_string, alt_lp in zip(
                    alternatives,
                    self._token_strings(list(alternatives)),
                    alternatives.values(),
                    strict=True,
                ):
                    top.append(
                        TopLogprob(
                            token=alt_string,
                            token_id=alt_id,
                            logprob=alt_lp,
                            bytes=list(alt_string.encode()),
                        )
                    )
            out.append(
                TokenLogprob(
                    token=token,
                    token_id=token_id,
                    logprob=lp,
                    sampling_logprob=None if sampling is None else sampling[i],
                    bytes=list(token.encode()),
                    top_logprobs=top,
                )
            )
        return out

    def _legacy(
        self,
        ids: list[int],
        logprobs: list[float | None],
        tops: list[dict[int, float]] | None,
        seq: _Sequence,
    ) -> LegacyLogprobs:
        strings = self._token_strings(ids)
        offsets = []
        for s in strings:
            offsets.append(seq.text_offset)
            seq.text_offset += len(s)
        top = None
        if tops is not None:
            top = [dict(zip(self._token_strings(list(d)), d.values(), strict=True)) for d in tops]
        return LegacyLogprobs(
            tokens=strings, token_logprobs=logprobs, top_logprobs=top, text_offset=offsets
        )

    def _logprobs(
        self, plan: Plan, seq: _Sequence, start: int, end: int, *, with_prompt: bool
    ) -> LegacyLogprobs | ContentLogprobs | None:
        """Logprobs of generated tokens [start, end), after the prompt's when `with_prompt`."""
        r = seq.result
        if plan.logprobs is None or r is None or r.logprobs is None:
            return None
        if start == end and not (with_prompt and plan.echo):
            return None  # a chunk without tokens (the finish reason alone)
        ids = list(r.token_ids[start:end])
        lps: list[float | None] = list(r.logprobs[start:end])
        tops = None if r.top_logprobs is None else list(r.top_logprobs[start:end])
        sampling = None if r.sampling_logprobs is None else list(r.sampling_logprobs[start:end])
        if with_prompt and plan.echo and r.prompt_logprobs is not None:
            prompt = plan.prompts[seq.prompt_index]
            # The first prompt token has no context: None in the legacy shape; 0.0 in the
            # content shape, whose readers (the Fireworks SDK) need a number and drop it.
            first: float | None = None if plan.shape == "legacy" else 0.0
            ids = prompt + ids
            lps = [first, *r.prompt_logprobs, *lps]
            if tops is not None:
                tops = [{}, *(r.prompt_top_logprobs or []), *tops]
            if sampling is not None:
                sampling = [0.0] * len(prompt) + sampling
        if plan.shape == "legacy":
            return self._legacy(ids, lps, tops, seq)
        return ContentLogprobs(content=self._content(ids, [x or 0.0 for x in lps], tops, sampling))

    def _raw_output(self, plan: Plan, seq: _Sequence) -> RawOutput | None:
        if not plan.req.raw_output or seq.result is None:
            return None
        prompt = plan.prompts[seq.prompt_index]
        completion = list(seq.result.token_ids)
        return RawOutput(
            prompt_token_ids=prompt,
            completion_token_ids=(prompt + completion) if plan.echo else completion,
            completion=self._prompt_text(plan, seq) + seq.text.text,
        )

    def _prompt_text(self, plan: Plan, seq: _Sequence) -> str:
        tok = self.replica.tokenizer
        if not plan.echo or tok is None:
            return ""
        return tok.decode(plan.prompts[seq.prompt_index])

    def _model(self, plan: Plan, identity: str) -> str:
        return f"{self.replica.config.model_name}@{plan.adapter or identity}"

    def _usage(self, plan: Plan, sequences: list[_Sequence]) -> Usage:
        prompt_tokens = sum(len(p) for p in plan.prompts)
        completion_tokens = sum(len(s.result.token_ids) for s in sequences if s.result)
        return Usage(
            prompt_tokens=prompt_tokens,
            completion_tokens=completion_tokens,
            total_tokens=prompt_tokens + completion_tokens,
            prompt_tokens_details=PromptTokensDetails(
                cached_tokens=sum(s.result.num_cached_prompt_tokens for s in sequences if s.result)
            ),
        )

    # --- whole responses -------------------------------------------------------------

    def response(
        self, plan: Plan, sequences: list[_Sequence], started_on: str
    ) -> CompletionResponse | ChatCompletionResponse:
        identities: list[str] = []
        for s in sequences:
            for ident in s.result.token_snapshots if s.result else []:
                if not identities or identities[-1] != ident:
                    identities.append(ident)
        if not identities:
            identities = [started_on]
        common: dict[str, Any] = dict(
            created=plan.created,
            model=self._model(plan, identities[-1]),
            snapshot_identity=plan.adapter or identities[-1],
            snapshot_identities=identities,
            usage=self._usage(plan, sequences),
            adapter=plan.adapter,
            base_snapshot_identity=identities[-1] if plan.adapter else None,
        )
        if plan.kind == "chat":
            return ChatCompletionResponse(
                id=f"chatcmpl-{plan.id}",
                choices=[self._chat_choice(plan, s) for s in sequences],
                **common,
            )
        return CompletionResponse(
            id=f"cmpl-{plan.id}",
            choices=[self._completion_choice(plan, s) for s in sequences],
            **common,
        )

    def _extras(self, plan: Plan, seq: _Sequence) -> dict[str, Any]:
        r = seq.result
        assert r is not None
        want_ids = plan.req.return_token_ids
        return dict(
            finish_reason=r.finish_reason,
            token_ids=list(r.token_ids) if want_ids else None,
            prompt_token_ids=plan.prompts[seq.prompt_index] if want_ids else None,
            raw_output=self._raw_output(plan, seq),
            snapshot_changes=_changes(r),
        )

    def _completion_choice(self, plan: Plan, seq: _Sequence) -> CompletionChoice:
        r = seq.result
        assert r is not None
        return CompletionChoice(
            index=seq.index,
            text=self._prompt_text(plan, seq) + seq.text.text,
            logprobs=self._logprobs(plan, seq, 0, len(r.token_ids), with_prompt=True),
            **self._extras(plan, seq),
        )

    def _chat_choice(self, plan: Plan, seq: _Sequence) -> ChatChoice:
        r = seq.result
        assert r is not None
        lp = self._logprobs(plan, seq, 0, len(r.token_ids), with_prompt=False)
        return ChatChoice(
            index=seq.index,
            message=ChatMessageOut(content=seq.text.text),
            logprobs=lp if isinstance(lp, ContentLogprobs) else None,
            **self._extras(plan, seq),
        )

    # --- stream chunks ------------------------------------------------------------------

    def _step_chunk(self, plan: Plan, seq: _Sequence, started_on: str) -> bytes:
        """The chunk of the tokens generated since the last one (one engine step's)."""
        r = seq.result
        assert r is not None
        start, end = seq.sent_tokens, len(r.token_ids)
        seq.sent_tokens = end
        identity = r.token_snapshots[-1] if r.token_snapshots else started_on
        return self._chunk(
            plan, seq, identity, start, end, text=seq.text.take(final=False), finish=False
        )

    def _final_chunk(
        self,
        plan: Plan,
        seq: _Sequence,
        started_on: str,
        all_sequences: list[_Sequence] | None,
    ) -> bytes:
        """The choice's last chunk: remaining tokens and text, finish reason, raw output."""
        r = seq.result
        assert r is not None
        start, end = seq.sent_tokens, len(r.token_ids)
        seq.sent_tokens = end
        identity = r.token_snapshots[-1] if r.token_snapshots else started_on
        perf = None
        if all_sequences is not None and plan.req.perf_metrics_in_response and plan.timing:
            perf = plan.timing.perf_metrics(all_sequences)
        out = self._chunk(
            plan,
            seq,
            identity,
            start,
            end,
            text=seq.text.take(final=True),
            finish=True,
            usage=None if all_sequences is None else self._usage(plan, all_sequences),
            perf_metrics=perf,
        )
        options = plan.req.stream_options
        if all_sequences is not None and options is not None and options.include_usage:
            cls = ChatCompletionChunk if plan.kind == "chat" else CompletionChunk
            out += sse_data(
                cls(
                    id=self._chunk_id(plan),
                    created=plan.created,
                    model=self._model(plan, identity),
                    snapshot_identity=plan.adapter or identity,
                    choices=[],
                    usage=self._usage(plan, all_sequences),
                )
            )
        return out

    def _chunk_id(self, plan: Plan) -> str:
        return f"{'chatcmpl' if plan.kind == 'chat' else 'cmpl'}-{plan.id}"

    def _chunk(
        self,
        plan: Plan,
        seq: _Sequence,
        identity: str,
        start: int,
        end: int,
        *,
        text: str,
        finish: bool,
        usage: Usage | None = None,
        perf_metrics: PerfMetrics | None = None,
    ) -> bytes:
        r = seq.result
        assert r is not None
        first = not seq.started
        seq.started = True
        want_ids = plan.req.return_token_ids
        extras: dict[str, Any] = dict(
            finish_reason=r.finish_reason if finish else None,
            token_ids=list(r.token_ids[start:end]) if want_ids else None,
            prompt_token_ids=plan.prompts[seq.prompt_index] if want_ids and first else None,
            raw_output=self._raw_output(plan, seq) if finish else None,
        )
        logprobs = self._logprobs(plan, seq, start, end, with_prompt=first)
        envelope: dict[str, Any] = dict(
            id=self._chunk_id(plan),
            created=plan.created,
            model=self._model(plan, identity),
            snapshot_identity=plan.adapter or identity,
            adapter=plan.adapter,
            base_snapshot_identity=identity if plan.adapter else None,
            usage=usage,
            perf_metrics=perf_metrics,
        )
        if plan.kind == "chat":
            delta = ChatDelta(role="assistant" if first else None, content=text)
            return sse_data(
                ChatCompletionChunk(
                    choices=[
                        ChatChunkChoice(
                            index=seq.index,
                            delta=delta,
                            logprobs=logprobs if isinstance(logprobs, ContentLogprobs) else None,
                            **extras,
                        )
                    ],
                    **envelope,
                )
            )
        if first:
            text = self._prompt_text(plan, seq) + text
        return sse_data(
            CompletionChunk(
                choices=[
                    CompletionChunkChoice(index=seq.index, text=text, logprobs=logprobs, **extras)
                ],
                **envelope,
            )
        )

    def models(self) -> ModelList:
        created = int(time.time())
        name = self.replica.config.model_name
        ids = [name]
        if self.replica.current_identity:
            ids.append(f"{name}@{self.replica.current_identity}")
        ids += self.replica.engine.loaded_adapters()
        return ModelList(data=[ModelCard(id=i, created=created) for i in ids])


def _changes(r: GenerateResult) -> list[SnapshotChange] | None:
    changes = [
        SnapshotChange(token_index=i, snapshot_identity=ident)
        for i, ident in enumerate(r.token_snapshots)
        if i == 0 or r.token_snapshots[i - 1] != ident
    ]
    return changes if len(changes) > 1 else None


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
