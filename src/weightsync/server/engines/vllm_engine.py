"""The vLLM engine: a vLLM `LLMEngine` inside the replica's process, hot-loaded in place.

vLLM runs in-process (no engine-core subprocess), so `collective_rpc` reaches
the worker directly and weights cross as tensor references, not bytes. The
engine keeps a host copy of the weights (snapshot names, snapshot dtype): the
replica decodes and verifies deltas against it, `apply_patches` patches it in
place and then pushes the touched tensors into vLLM through the worker's own
reload path (`vllm_worker.WeightsyncWorkerExtension`), which re-runs vLLM's
per-layer processing (on CPU, re-packing the GEMM weights).

Stepping. There is no background thread: every `generate` call adds its request
and, while it is unfinished, takes the engine lock and runs one engine step for
every request in the batch, inside its own `step_guard()`. So the swap lock
pauses vLLM at an engine-step boundary: under the `async` transition a swap
lands between two decode steps of the running requests (each token records the
identity that produced it), under `sync` no request is running during a swap.
A prompt-cache reset preempts running requests, so they recompute their KV with
the new weights rather than mixing old and new KV.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import sys
import tempfile
import threading
import uuid
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from safetensors.torch import save as save_safetensors
from safetensors.torch import save_file

from weightsync.codec import Patch, checksum_tensor
from weightsync.codec.bits import same_bits
from weightsync.errors import DeploymentError, InvalidInputError, SnapshotCorruptError
from weightsync.server.engines.base import (
    CacheScope,
    Engine,
    GenerateRequest,
    GenerateResult,
    StepGuard,
    TokenCallback,
    check_generate_request,
    eos_token_ids,
    model_dtype,
    same_model,
)
from weightsync.server.engines.vllm_layout import (
    checkpoint_layout_names,
    host_copy,
    layer_closure,
    layer_groups,
)

logger = logging.getLogger(__name__)

PushMode = Literal["changed", "full"]
_WORKER_EXTENSION = "weightsync.server.engines.vllm_worker.WeightsyncWorkerExtension"


@dataclass(eq=False)
class _Pending:
    """One request in flight: what the stepping threads fill in for its owner."""

    result: GenerateResult
    want_top: int
    seen: int = 0
    finished: bool = False


@dataclass(eq=False)
class _Loaded:
    engine: Any  # vllm.v1.engine.llm_engine.LLMEngine
    config: dict[str, Any]
    host: dict[str, torch.Tensor]
    #: snapshot tensor name -> every tensor name of the vLLM layer it is loaded into
    groups: dict[str, tuple[str, ...]]
    #: snapshot tensor names vLLM keeps in checkpoint layout (readable bit for bit)
    readable: frozenset[str]
    vocab_size: int
    max_model_len: int
    eos_token_ids: frozenset[int]
    work_dir: Path
    in_process: bool
    pending: dict[str, _Pending] = field(default_factory=dict)


class VllmEngine(Engine):
    """vLLM (in-process `LLMEngine`) behind the engine interface; CPU or GPU."""

    name = "vllm-inprocess"

    def __init__(
        self,
        *,
        max_model_len: int = 2048,
        max_num_seqs: int = 16,
        kv_cache_memory_bytes: int = 256 * 1024 * 1024,
        enable_prefix_caching: bool = True,
        block_size: int | None = None,
        push: PushMode = "changed",
        verify_read_back: bool = True,
        work_dir: str | Path | None = None,
        engine_args: Mapping[str, Any] | None = None,
    ) -> None:
        """`push`: after a patch, push only the vLLM layers that changed, or every tensor.

        `kv_cache_memory_bytes` sizes vLLM's KV cache (small by default: the replica
        shares the machine). `verify_read_back`: after each push, compare every
        tensor vLLM keeps in checkpoint layout with the host copy, bit for bit.
        `block_size`: KV block (and prefix-cache) granularity in tokens; None keeps
        vLLM's default for the device (on CPU a multiple of 32).
        `engine_args`: extra `vllm.EngineArgs` fields (e.g. `{"tensor_parallel_size": 2}`).
        """
        if push not in ("changed", "full"):
            raise InvalidInputError(f"push must be 'changed' or 'full', got {push!r}")
        if max_model_len < 2 or max_num_seqs < 1 or kv_cache_memory_bytes < 1:
            raise InvalidInputError(
                "max_model_len must be >= 2, max_num_seqs >= 1 and kv_cache_memory_bytes >= 1"
            )
        self.max_model_len = max_model_len
        self.max_num_seqs = max_num_seqs
        self.kv_cache_memory_bytes = kv_cache_memory_bytes
        self.enable_prefix_caching = enable_prefix_caching
        self.block_size = block_size
        self.push = push
        self.verify_read_back = verify_read_back
        self.work_root = Path(work_dir) if work_dir is not None else None
        self.engine_args = dict(engine_args or {})
        self._loaded: _Loaded | None = None
        # Held around every call into vLLM (a step, adding/aborting a request, a push,
        # a cache reset): vLLM's engine is not thread-safe.
        self._engine_lock = threading.Lock()

    # --- loading ----------------------------------------------------------------

    def load_base(
        self,
        config: Mapping[str, Any],
        tensors: Mapping[str, torch.Tensor],
        *,
        tokenizer_dir: Path | None = None,
    ) -> None:
        """Load a base: in place (a full push) when the model is the same, else a new vLLM engine.

        vLLM gets token ids only (its tokenizer is not loaded), so `tokenizer_dir`
        is not needed here; the replica tokenizes.
        """
        config = dict(config)
        current = self._loaded
        if current is not None and same_model(current.config, current.host, config, tensors):
            with self._engine_lock:
                for name, target in current.host.items():
                    target.copy_(tensors[name])
                self._push(current, sorted(current.host))
            logger.info("loaded base in place (%d tensors pushed into vLLM)", len(current.host))
            return
        loaded = self._start(config, tensors)
        with self._engine_lock:
            old, self._loaded = self._loaded, loaded
        if old is not None:
            _shutdown(old)

    def _start(self, config: dict[str, Any], tensors: Mapping[str, torch.Tensor]) -> _Loaded:
        from vllm.engine.arg_utils import EngineArgs
        from vllm.v1.engine.llm_engine import LLMEngine

        host = host_copy(config, tensors)
        dtype = model_dtype(host)
        if self.work_root is not None:
            self.work_root.mkdir(parents=True, exist_ok=True)
        work_dir = Path(tempfile.mkdtemp(prefix="weightsync-vllm-", dir=self.work_root))
        (work_dir / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        weights_file = work_dir / "model.safetensors"
        save_file(host, str(weights_file), metadata={"format": "pt"})
        positions = int(config.get("max_position_embeddings") or self.max_model_len)
        max_model_len = min(self.max_model_len, positions)
        args = dict(
            model=str(work_dir),
            dtype=str(dtype).removeprefix("torch."),
            skip_tokenizer_init=True,
            enforce_eager=True,
            max_model_len=max_model_len,
            max_num_seqs=self.max_num_seqs,
            kv_cache_memory_bytes=self.kv_cache_memory_bytes,
            enable_prefix_caching=self.enable_prefix_caching,
            worker_extension_cls=_WORKER_EXTENSION,
            disable_log_stats=True,
            seed=0,
        )
        if self.block_size is not None:
            args["block_size"] = self.block_size
        args.update(self.engine_args)
        try:
            with _in_process_vllm():
                engine = LLMEngine.from_engine_args(EngineArgs(**args))
        except Exception as e:
            shutil.rmtree(work_dir, ignore_errors=True)
            raise DeploymentError(
                f"vLLM could not start the {config.get('model_type')!r} model "
                f"({config.get('architectures')}): {e}; check that vLLM supports this "
                "architecture and head size on this device (on CPU the head size must be a "
                "multiple of 32)"
            ) from e
        # vLLM has read the file; the host copy is the source of every later push.
        weights_file.unlink()
        info = engine.collective_rpc("weightsync_model_info")[0]
        groups = layer_groups(list(host), info["packed_modules_mapping"])
        readable = checkpoint_layout_names(host, info["parameters"])
        logger.info(
            "vLLM serves %s (%d tensors, %s; %d readable in checkpoint layout)",
            info["model_class"],
            len(host),
            dtype,
            len(readable),
        )
        return _Loaded(
            engine=engine,
            config=config,
            host=host,
            groups=groups,
            readable=readable,
            vocab_size=int(config.get("vocab_size") or 0),
            max_model_len=max_model_len,
            eos_token_ids=eos_token_ids(config.get("eos_token_id")),
            work_dir=work_dir,
            in_process=type(engine.engine_core).__name__ == "InprocClient",
        )

    def named_weights(self) -> Mapping[str, torch.Tensor]:
        """The host copy (snapshot names and dtypes) that vLLM was last pushed."""
        return dict(self._require_loaded().host)

    def apply_patches(
        self, patches: Mapping[str, Patch], *, keep_undo: bool = True
    ) -> dict[str, Patch]:
        """Patch the host copy, push what changed into vLLM, read back what can be; all or none.

        The undo is held until the push is done (a failed push is rolled back); it is
        returned only with `keep_undo`.
        """
        loaded = self._require_loaded()
        unknown = sorted(set(patches) - set(loaded.host))
        if unknown:
            raise InvalidInputError(
                f"patches name tensors the served model lacks: {', '.join(unknown[:5])}"
            )
        undo: dict[str, Patch] = {}
        with self._engine_lock:
            try:
                for name, patch in patches.items():
                    undo[name] = patch.apply_(loaded.host[name])
            except Exception:
                for name, back in undo.items():
                    back.apply_(loaded.host[name])
                raise
            changed = [n for n, p in patches.items() if p.num_changed > 0]
            names = (
                sorted(loaded.host)
                if self.push == "full"
                else layer_closure(loaded.groups, changed)
            )
            try:
                self._push(loaded, names)
            except Exception as e:
                for name, back in undo.items():
                    back.apply_(loaded.host[name])
                self._restore(loaded, names, e)
                raise
        return undo if keep_undo else {}

    def _push(self, loaded: _Loaded, names: list[str]) -> None:
        """Push these host tensors into vLLM (engine lock held), then read back what can be."""
        import time

        if not names:
            return
        started = time.perf_counter()
        pairs = [(name, loaded.host[name]) for name in names]
        # In-process the worker gets the host tensors by reference (vLLM copies them
        # into its own storage); across processes they travel as safetensors bytes.
        payload: bytes | list[tuple[str, torch.Tensor]] = (
            pairs if loaded.in_process else save_safetensors(dict(pairs))
        )
        loaded.engine.collective_rpc("weightsync_reload", args=(payload,))
        push_s = time.perf_counter() - started
        if self.verify_read_back:
            readable = [n for n in names if n in loaded.readable]
            held = loaded.engine.collective_rpc("weightsync_read_back", args=(readable,))[0]
            wrong = [n for n in readable if n not in held or not same_bits(held[n], loaded.host[n])]
            if wrong:
                raise SnapshotCorruptError(
                    f"vLLM holds different bits than were pushed for {', '.join(wrong[:5])}; "
                    "the push was undone — report this with the vLLM version"
                )
        logger.info("pushed %d tensors into vLLM in %.3fs", len(names), push_s)

    def _restore(self, loaded: _Loaded, names: list[str], cause: BaseException) -> None:
        """After a failed push, push the (restored) host tensors again, or report vLLM broken."""
        try:
            self._push(loaded, names)
        except Exception as e:
            raise DeploymentError(
                f"pushing weights into vLLM failed ({cause!r}) and restoring the previous "
                f"weights failed too ({e!r}); restart the replica"
            ) from e

    # --- serving --------------------------------------------------------------------

    def generate(
        self,
        request: GenerateRequest,
        *,
        step_guard: StepGuard,
        on_token: TokenCallback | None = None,
    ) -> GenerateResult:
        """Generate one sequence; each engine step runs inside `step_guard()`.

        Stops at a stop token (included in the output) or the model's EOS, like
        the torch engine. Logprobs are vLLM's raw-logit logprobs (independent of
        temperature).
        """
        from vllm import SamplingParams

        loaded = self._require_loaded()
        _validate_request(request, loaded)
        top_k = request.logprobs or 0
        result = GenerateResult(
            token_ids=[],
            logprobs=[] if request.logprobs is not None else None,
            top_logprobs=[] if top_k > 0 else None,
        )
        max_tokens = min(request.max_tokens, loaded.max_model_len - len(request.prompt_token_ids))
        if max_tokens <= 0:
            return result
        params = SamplingParams(
            n=1,
            max_tokens=max_tokens,
            temperature=request.temperature,
            top_p=request.top_p,
            top_k=request.top_k if request.top_k > 0 else -1,  # -1: no limit (every vLLM)
            seed=request.seed,
            logprobs=request.logprobs,
            stop_token_ids=sorted(set(request.stop_token_ids) | loaded.eos_token_ids),
            ignore_eos=True,  # no tokenizer in vLLM: EOS ids are in stop_token_ids
            detokenize=False,
        )
        request_id = uuid.uuid4().hex
        pending = _Pending(result=result, want_top=top_k)
        reported = 0  # tokens `on_token` has seen (a vLLM step may add several)
        with self._engine_lock:
            loaded.engine.add_request(
                request_id, {"prompt_token_ids": list(request.prompt_token_ids)}, params
            )
            loaded.pending[request_id] = pending
        try:
            while not pending.finished:
                with step_guard() as identity, self._engine_lock:
                    if pending.finished:
                        break
                    if self._loaded is not loaded:
                        raise DeploymentError(
                            "a new base model was loaded while this request was generating; "
                            "send the request again"
                        )
                    self._step(loaded, identity)
                    if on_token is not None and len(result.token_ids) > reported:
                        reported = len(result.token_ids)
                        if not on_token(result):
                            result.finish_reason = "stop"
                            break
        finally:
            if not pending.finished:
                with self._engine_lock:
                    loaded.pending.pop(request_id, None)
                    if self._loaded is loaded:
                        loaded.engine.abort_request([request_id])
        return result

    def _step(self, loaded: _Loaded, identity: str) -> None:
        """One engine step for the whole batch (engine lock held); route outputs to owners."""
        for out in loaded.engine.step():
            pending = loaded.pending.get(out.request_id)
            if pending is None:
                continue
            completion = out.outputs[0]
            result = pending.result
            new_ids = list(completion.token_ids[pending.seen :])
            result.token_ids.extend(new_ids)
            result.token_snapshots.extend([identity] * len(new_ids))
            if result.logprobs is not None and completion.logprobs is not None:
                for offset, token in enumerate(new_ids):
                    entry = completion.logprobs[pending.seen + offset]
                    result.logprobs.append(float(entry[token].logprob))
                    if result.top_logprobs is not None:
                        top = {
                            int(t): float(lp.logprob)
                            for t, lp in entry.items()
                            if lp.rank is not None and lp.rank <= pending.want_top
                        }
                        result.top_logprobs.append(top)
            pending.seen = len(completion.token_ids)
            if out.num_cached_tokens is not None:
                result.num_cached_prompt_tokens = int(out.num_cached_tokens)
            if out.finished:
                result.finish_reason = "stop" if completion.finish_reason == "stop" else "length"
                pending.finished = True
                loaded.pending.pop(out.request_id, None)

    def reset_prompt_cache(self, scope: CacheScope = "all") -> int:
        """Drop vLLM's whole prefix cache (vLLM cannot scope it, so "shared" drops all too).

        Running requests are preempted and recompute their KV on the current
        weights. Returns the number of cached KV blocks dropped.
        """
        loaded = self._loaded
        if loaded is None:
            return 0
        with self._engine_lock:
            dropped = _cached_block_count(loaded.engine)
            if not loaded.engine.reset_prefix_cache(reset_running_requests=True):
                raise DeploymentError(
                    "vLLM refused to reset its prefix cache; restart the replica so no stale "
                    "KV is served"
                )
        return dropped

    def weights_checksums(self, checksum_format: str) -> dict[str, str]:
        """Checksums of what vLLM holds where it keeps checkpoint layout, else of the host copy."""
        loaded = self._require_loaded()
        with self._engine_lock:
            held = loaded.engine.collective_rpc(
                "weightsync_read_back", args=(sorted(loaded.readable),)
            )[0]
        return {
            name: checksum_tensor(checksum_format, held.get(name, tensor))
            for name, tensor in loaded.host.items()
        }

    def close(self) -> None:
        with self._engine_lock:
            loaded, self._loaded = self._loaded, None
        if loaded is not None:
            _shutdown(loaded)

    def _require_loaded(self) -> _Loaded:
        loaded = self._loaded
        if loaded is None:
            raise DeploymentError("the vLLM engine has no model loaded yet; load a base first")
        return loaded


# --- helpers ------------------------------------------------------------------------


def _cached_block_count(engine: Any) -> int:
    """How many KV blocks vLLM's prefix cache holds (0 where the internals differ)."""
    core = getattr(getattr(engine, "engine_core", None), "engine_core", None)
    scheduler = getattr(core, "scheduler", None)
    manager = getattr(scheduler, "kv_cache_manager", None)
    pool = getattr(manager, "block_pool", None)
    cached = getattr(pool, "cached_block_hash_to_block", None)
    return len(cached) if cached is not None else 0


def _validate_request(request: GenerateRequest, loaded: _Loaded) -> None:
    check_generate_request(
        request, vocab_size=loaded.vocab_size, max_positions=loaded.max_model_len
    )
    if request.adapter is not None:
        raise InvalidInputError(
            f"unknown LoRA adapter {request.adapter!r}: the vllm engine serves no adapters "
            "(use the torch engine for LoRA)"
        )


@contextmanager
def _in_process_vllm() -> Iterator[None]:
    """Build vLLM's engine core and worker in this process (no subprocesses).

    vLLM reads this switch only from its environment, and only while building
    the engine, so it is set for that moment and put back after.
    """
    key = "VLLM_ENABLE_V1_MULTIPROCESSING"
    before = os.environ.get(key)
    os.environ[key] = "0"
    # vLLM's worker start scans every imported module's objects with
    # `vars(obj).get(...)`; llvmlite's library wrapper (imported here by numba,
    # which our codecs use) answers `__dict__` with a C-function wrapper and
    # breaks that scan. Give it a plain dict while vLLM starts.
    ffi = sys.modules.get("llvmlite.binding.ffi")
    fntab = getattr(getattr(ffi, "lib", None), "_fntab", None)
    shim = isinstance(fntab, dict) and "__dict__" not in fntab
    if shim:
        fntab["__dict__"] = {}  # type: ignore[index]
    try:
        yield
    finally:
        if shim:
            fntab.pop("__dict__", None)  # type: ignore[union-attr]
        if before is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = before


def _shutdown(loaded: _Loaded) -> None:
    try:
        loaded.engine.engine_core.shutdown()
    finally:
        shutil.rmtree(loaded.work_dir, ignore_errors=True)
