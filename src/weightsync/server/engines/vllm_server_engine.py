"""The `vllm` engine: vLLM's own OpenAI server (`vllm serve`), hot-loaded in place by a sidecar.

The replica process this engine runs in is the **sidecar**: it keeps the
hot-load API, the ledger, fetch, decode and verify (all before any pause), and
drives a stock vLLM OpenAI server that it starts beside itself:

    python -m vllm.entrypoints.openai.api_server --model <dir>
        --worker-extension-cls weightsync.server.engines.vllm_worker.WeightsyncWorkerExtension
        --middleware weightsync.server.engines.vllm_middleware.SnapshotIdentityMiddleware
        (VLLM_SERVER_DEV_MODE=1, for /pause, /resume, /collective_rpc, /reset_prefix_cache)

Inference goes to that server directly (`vllm_url`; streaming, stop strings,
chat templates, logprobs, `n`, as vLLM does them); the middleware names the
snapshot on every answer and every streamed chunk. The sidecar's own
`/v1/completions` also works (`generate` streams from vLLM's server).

Before a swap (`stage_patches`, called by the load pipeline before its swap lock;
vLLM serves on): the touched layers' new tensors (the host copy with the verified
patches written in) go to one safetensors file, on `/dev/shm` when it has room,
and the checksums the read-back must find are computed. The swap
(`swap(identity)` around `apply_patches` and the cache reset): `POST
/pause?mode=keep` (async
transition: running requests freeze and resume on the new weights; their KV is
recomputed when the prefix cache is reset with `reset_running_requests`) or
`mode=wait` (sync: running requests finish on the old weights first) →
`POST /collective_rpc weightsync_reload_file` (vLLM's own `reload_weights`,
which re-runs each layer's processing: fused qkv/gate_up, CPU GEMM re-packing,
tied heads) → read-back checksums of what the worker holds in checkpoint
layout, compared with what was pushed (on a mismatch the host copy, still the
old weights, is pushed back) → `POST /reset_prefix_cache` → the middleware's label
→ `POST /resume`; then the host copy is patched (no undo copy is held: until this
point it *is* the old weights).
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import shutil
import socket
import sys
import tempfile
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import httpx
import torch
from safetensors.torch import save_file

from weightsync.codec import Patch, checksum_tensor, write_patches
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
from weightsync.server.engines.vllm_middleware import CONTROL_PATH, PARENT_ENV, TOKEN_ENV
from weightsync.server.engines.vllm_push_file import (
    READ_BACK_CHECKSUM,
    push_dir,
    write_push_file,
)
from weightsync.server.processes import ManagedProcess, log_tail

logger = logging.getLogger(__name__)

PushMode = Literal["changed", "full"]
Transition = Literal["async", "sync"]
WORKER_EXTENSION = "weightsync.server.engines.vllm_worker.WeightsyncWorkerExtension"
MIDDLEWARE = "weightsync.server.engines.vllm_middleware.SnapshotIdentityMiddleware"
#: Seconds vLLM's server gets to shut down gracefully before SIGKILL.
STOP_TIMEOUT_S = 30.0
#: Characters of vLLM's log quoted in an error.
LOG_TAIL_CHARS = 1500


@dataclass(eq=False)
class _Server:
    process: ManagedProcess
    url: str
    token: str
    work_dir: Path
    log_path: Path
    config: dict[str, Any]
    host: dict[str, torch.Tensor]
    groups: dict[str, tuple[str, ...]]
    readable: frozenset[str]
    vocab_size: int
    max_model_len: int
    served_model: str


@dataclass(eq=False)
class _Push:
    """A push file written and checksummed, not yet reloaded by vLLM."""

    path: Path
    names: list[str]
    #: Read-back checksums of the pushed tensors vLLM keeps in checkpoint layout.
    want: dict[str, str]
    #: The patches it holds (compared by identity with those `apply_patches` gets);
    #: None for a push of the host copy as it is.
    patches: Mapping[str, Patch] | None


class VllmServerEngine(Engine):
    """vLLM's OpenAI server beside the replica (the sidecar), patched in place through it."""

    name = "vllm"

    def __init__(
        self,
        *,
        max_model_len: int = 2048,
        max_num_seqs: int = 16,
        kv_cache_memory_bytes: int = 256 * 1024 * 1024,
        enable_prefix_caching: bool = True,
        block_size: int | None = None,
        push: PushMode = "changed",
        transition: Transition = "async",
        host: str = "127.0.0.1",
        port: int = 0,
        served_model_name: str | None = None,
        startup_timeout_s: float = 300.0,
        request_timeout_s: float = 300.0,
        work_dir: str | Path | None = None,
        serve_args: Sequence[str] = (),
        python: str | None = None,
    ) -> None:
        """Options of the vLLM server this engine starts and how it patches it.

        `transition`: "async" pauses vLLM with `mode=keep` (running requests freeze
        and continue on the new weights), "sync" with `mode=wait` (they finish on
        the old ones first). `push`: after a patch, push only the vLLM layers that
        changed, or every tensor. `port` 0 picks a free one. `serve_args`: more
        `vllm serve` flags (e.g. `["--tensor-parallel-size", "2"]`). `python`: the
        interpreter that runs vLLM (default: this one).
        """
        if push not in ("changed", "full"):
            raise InvalidInputError(f"push must be 'changed' or 'full', got {push!r}")
        if transition not in ("async", "sync"):
            raise InvalidInputError(f"transition must be 'async' or 'sync', got {transition!r}")
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
        self.transition: Transition = transition
        self.bind_host = host
        self.port = port
        self.served_model_name = served_model_name
        self.startup_timeout_s = startup_timeout_s
        self.request_timeout_s = request_timeout_s
        self.work_root = Path(work_dir) if work_dir is not None else None
        self.serve_args = list(serve_args)
        if (count := api_server_count(self.serve_args)) != 1:
            raise InvalidInputError(
                f"vLLM serve flag --api-server-count {count}: weightsync labels each answer "
                "with its snapshot in vLLM's API process, and the label can only be set in one "
                "(several would answer under stale labels across a swap); keep one API server "
                "(docs/vllm.md, 'Which snapshot answered')"
            )
        self.python = python or sys.executable
        self._server: _Server | None = None
        # One swap or push at a time (the replica's swap lock already orders them).
        self._lock = threading.RLock()
        self._http = httpx.Client(timeout=request_timeout_s, trust_env=False)
        self._applied_in_swap = False
        self._swapping = False
        self._paused_server: _Server | None = None
        self._paused_at = 0.0
        #: The push `stage_patches` wrote for the next `apply_patches`.
        self._staged: _Push | None = None
        #: Patches pushed inside the current swap, written into the host copy after /resume.
        self._host_pending: Mapping[str, Patch] | None = None
        #: Seconds of the phases of the last swap (pause, push, read-back, reset, resume).
        self.last_swap: dict[str, float] = {}

    # --- the vLLM server --------------------------------------------------------

    @property
    def inference_url(self) -> str | None:
        """Base URL of vLLM's own OpenAI server (inference goes here), once started."""
        return self._server.url if self._server is not None else None

    def _start(
        self,
        config: dict[str, Any],
        tensors: Mapping[str, torch.Tensor],
        tokenizer_dir: Path | None,
    ) -> _Server:
        host = host_copy(config, tensors)
        if self.work_root is not None:
            self.work_root.mkdir(parents=True, exist_ok=True)
        work_dir = Path(tempfile.mkdtemp(prefix="weightsync-vllm-", dir=self.work_root))
        model_dir = work_dir / "model"
        model_dir.mkdir()
        if tokenizer_dir is not None:
            for f in Path(tokenizer_dir).iterdir():
                if f.is_file() and f.suffix != ".safetensors" and f.name != "config.json":
                    shutil.copy2(f, model_dir / f.name)
        (model_dir / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        save_file(host, str(model_dir / "model.safetensors"), metadata={"format": "pt"})
        positions = int(config.get("max_position_embeddings") or self.max_model_len)
        max_model_len = min(self.max_model_len, positions)
        port = self.port or _free_port(self.bind_host)
        served = self.served_model_name or str(config.get("model_type") or "model")
        argv = [
            self.python, "-m", "vllm.entrypoints.openai.api_server",
            "--model", str(model_dir),
            "--served-model-name", served,
            "--host", self.bind_host, "--port", str(port),
            "--dtype", str(model_dtype(host)).removeprefix("torch."),
            "--max-model-len", str(max_model_len),
            "--max-num-seqs", str(self.max_num_seqs),
            "--kv-cache-memory-bytes", str(self.kv_cache_memory_bytes),
            "--enforce-eager",
            "--enable-prefix-caching" if self.enable_prefix_caching
            else "--no-enable-prefix-caching",
            "--enable-prompt-tokens-details",
            "--worker-extension-cls", WORKER_EXTENSION,
            "--middleware", MIDDLEWARE,
            "--seed", "0",
        ]  # fmt: skip
        if tokenizer_dir is None:
            argv.append("--skip-tokenizer-init")
        if self.block_size is not None:
            argv += ["--block-size", str(self.block_size)]
        argv += self.serve_args
        token = secrets.token_hex(16)
        env = {
            **os.environ,
            "VLLM_SERVER_DEV_MODE": "1",
            TOKEN_ENV: token,
            PARENT_ENV: str(os.getpid()),
        }
        log_path = work_dir / "vllm.log"
        # Its own process group: stopping it stops vLLM's engine core and workers too.
        process = ManagedProcess.start(
            "vLLM's server", argv, env=env, log_file=log_path, own_group=True
        )
        url = f"http://{_url_host(self.bind_host)}:{port}"
        server = _Server(
            process=process, url=url, token=token, work_dir=work_dir, log_path=log_path,
            config=config, host=host, groups={}, readable=frozenset(),
            vocab_size=int(config.get("vocab_size") or 0), max_model_len=max_model_len,
            served_model=served,
        )  # fmt: skip
        try:
            self._wait_ready(server)
            # vLLM has read the file; the host copy is the source of every later push.
            (model_dir / "model.safetensors").unlink()
            infos = self._rpc(server, "weightsync_model_info")  # one per worker
        except BaseException:
            _stop(server)
            raise
        info = infos[0]
        server.groups = layer_groups(list(host), info["packed_modules_mapping"])
        # Under tensor parallelism a rank holds a slice of the sharded tensors: only the
        # ones every rank holds whole (replicated) can be read back and compared.
        server.readable = frozenset.intersection(
            *(checkpoint_layout_names(host, i["parameters"]) for i in infos)
        )
        logger.info(
            "vLLM's server serves %s at %s on %d worker(s) (%d tensors, %d readable in "
            "checkpoint layout)", info["model_class"], url, len(infos), len(host),
            len(server.readable),
        )  # fmt: skip
        return server

    def _wait_ready(self, server: _Server) -> None:
        def healthy() -> bool | None:
            try:
                if self._http.get(f"{server.url}/health", timeout=2.0).status_code == 200:
                    return True
            except httpx.HTTPError:
                pass  # not answering yet: polled until the deadline
            return None

        server.process.wait_ready(
            healthy, timeout_s=self.startup_timeout_s, advice="raise startup_timeout_s", poll_s=0.5
        )

    def _post(self, server: _Server, path: str, **kwargs: Any) -> httpx.Response:
        try:
            response = self._http.post(f"{server.url}{path}", **kwargs)
        except httpx.HTTPError as e:
            raise DeploymentError(
                f"vLLM's server at {server.url} did not answer POST {path}: {e}; "
                f"its log ends: {log_tail(server.log_path, LOG_TAIL_CHARS)}"
            ) from e
        if response.status_code != 200:
            raise DeploymentError(
                f"vLLM's server answered POST {path} with {response.status_code}: "
                f"{response.text[:300]}"
            )
        return response

    def _rpc(self, server: _Server, method: str, *args: str) -> list[Any]:
        """`method` run on every vLLM worker: their answers, one per worker (at least one)."""
        answer = self._post(server, "/collective_rpc", json={"method": method, "args": list(args)})
        results: list[Any] = answer.json()["results"]
        if not results:
            raise DeploymentError(
                f"vLLM's /collective_rpc {method} at {server.url} answered for no worker; "
                f"see its log {server.log_path}"
            )
        return results

    def _held_checksums(
        self, server: _Server, names: Sequence[str], checksum_format: str
    ) -> dict[str, str]:
        """The checksums of what vLLM's workers hold for `names`, where they all agree
        (`RANKS_DISAGREE` where they do not)."""
        return _agreed(
            self._rpc(server, "weightsync_checksums", json.dumps(list(names)), checksum_format)
        )

    # --- loading ------------------------------------------------------------------

    def load_base(
        self,
        config: Mapping[str, Any],
        tensors: Mapping[str, torch.Tensor],
        *,
        tokenizer_dir: Path | None = None,
    ) -> None:
        """A base: pushed in place when the model is the same, else a new vLLM server."""
        config = dict(config)
        with self._lock:
            current = self._server
            if current is not None and same_model(current.config, current.host, config, tensors):
                for name, target in current.host.items():
                    target.copy_(tensors[name])
                self._drop_staged()
                self._push_host(current, sorted(current.host))
                self._applied_in_swap = True
                logger.info("loaded base in place (%d tensors pushed)", len(current.host))
                return
            server = self._start(config, tensors, tokenizer_dir)
            old, self._server = self._server, server
            self._applied_in_swap = True
        if old is not None:
            _stop(old)

    def named_weights(self) -> Mapping[str, torch.Tensor]:
        """The host copy (snapshot names and dtypes) that vLLM was last pushed."""
        return dict(self._require_server().host)

    def stage_patches(self, patches: Mapping[str, Patch]) -> None:
        """Write the push of these verified patches before the swap lock (vLLM serves on).

        The file holds the new bits of every tensor of each touched vLLM layer (the
        host copy with the patches written in: the host copy itself is untouched), and
        the read-back checksums are computed from it. `apply_patches` with the same
        patches then only pauses vLLM and reloads it. Loads are serialized, so the host
        copy cannot change in between.
        """
        server = self._require_server()
        _check_known(server, patches)
        with self._lock:
            self._drop_staged()
            self._staged = self._write_push(server, self._push_names(server, patches), patches)

    def apply_patches(
        self, patches: Mapping[str, Patch], *, keep_undo: bool = True
    ) -> dict[str, Patch]:
        """Push the touched layers' new tensors into vLLM, check what it holds, patch the host copy.

        All or none: until vLLM holds the pushed bits (read back and compared) the host
        copy is unchanged, and a failed push is undone by pushing those tensors from it.
        Inside a `swap` with `keep_undo=False` the host copy is patched after vLLM
        resumed (outside vLLM's pause); otherwise before this returns.
        """
        server = self._require_server()
        _check_known(server, patches)
        with self._lock:
            staged, self._staged = self._staged, None
            if staged is None or staged.patches is not patches:
                if staged is not None:
                    staged.path.unlink(missing_ok=True)
                staged = self._write_push(server, self._push_names(server, patches), patches)
            try:
                self._push(server, staged)
            except Exception as e:
                self._restore(server, staged.names, e)
                raise
            self._applied_in_swap = True
            if keep_undo or not self._swapping:
                return _patch_host(server, patches, keep_undo=keep_undo)
            self._host_pending = patches
        return {}

    def _push_names(self, server: _Server, patches: Mapping[str, Patch]) -> list[str]:
        """What a push of `patches` carries: every tensor of each changed layer, or all."""
        if self.push == "full":
            return sorted(server.host)
        return layer_closure(server.groups, [n for n, p in patches.items() if p.num_changed > 0])

    def _drop_staged(self) -> None:
        staged, self._staged = self._staged, None
        if staged is not None:
            staged.path.unlink(missing_ok=True)

    def _write_push(
        self, server: _Server, names: list[str], patches: Mapping[str, Patch] | None
    ) -> _Push:
        """The push file of `names` (their host tensors with `patches` written in)."""
        started = time.perf_counter()
        readable = server.readable
        directory = push_dir(server.host, names, server.work_dir)
        path = directory / f"weightsync-push-{server.token[:8]}-{secrets.token_hex(4)}.safetensors"
        try:
            want = write_push_file(path, server.host, names, patches or {}, readable)
        except BaseException:
            path.unlink(missing_ok=True)
            raise
        self.last_swap["write_s"] = time.perf_counter() - started
        return _Push(path=path, names=names, want=want, patches=patches)

    def _push(self, server: _Server, push: _Push) -> None:
        """vLLM reloads the push file's tensors in place; then compare what it holds.

        Inside a `swap` vLLM is paused here (lazily), so its pause is the reload, the
        read-back and the cache reset only. The file is removed whatever happens.
        """
        if not push.names:
            push.path.unlink(missing_ok=True)
            self.last_swap["push_s"] = 0.0
            return
        try:
            self._pause_if_swapping(server)
            pushing = time.perf_counter()
            reloads = self._rpc(server, "weightsync_reload_file", str(push.path))
        finally:
            push.path.unlink(missing_ok=True)
        pushed = time.perf_counter()
        readable = sorted(push.want)
        if readable:
            held = self._held_checksums(server, readable, READ_BACK_CHECKSUM)
            wrong = [n for n in readable if held.get(n) != push.want[n]]
            if wrong:
                raise SnapshotCorruptError(
                    f"vLLM's worker holds different bits than were pushed for "
                    f"{', '.join(wrong[:5])}; the push was undone — report this with the "
                    "vLLM version"
                )
        self.last_swap["push_s"] = pushed - pushing
        for part in ("reload_weights_s", "tied_modules_s"):  # the slowest worker's own timing
            self.last_swap[part] = max(float(r.get(part, 0.0)) for r in reloads)
        self.last_swap["read_back_s"] = time.perf_counter() - pushed
        logger.info("pushed %d tensors into vLLM in %.3fs", len(push.names), pushed - pushing)

    def _push_host(self, server: _Server, names: list[str]) -> None:
        """Push these tensors of the host copy as they are."""
        self._push(server, self._write_push(server, names, None))

    def _restore(self, server: _Server, names: list[str], cause: BaseException) -> None:
        """Push the host copy's `names` back (vLLM may hold part of a failed push)."""
        try:
            self._push_host(server, names)
        except Exception as e:
            raise DeploymentError(
                f"pushing weights into vLLM failed ({cause!r}) and restoring the previous "
                f"weights failed too ({e!r}); restart the replica"
            ) from e

    @contextmanager
    def swap(self, identity: str) -> Iterator[None]:
        """Pause vLLM for a swap's push and cache reset; label and resume after it.

        vLLM is paused lazily, once the push is ready (`_pause_if_swapping`), so it
        keeps serving while the host copy is patched and the push written. The
        label becomes `identity` only when an apply or base load succeeded inside;
        otherwise the weights (and the label) stay the previous ones.
        """
        with self._lock:
            self._applied_in_swap = False
            self._swapping = True
            self._paused_server = None
            self._host_pending = None
            write_s = self.last_swap.get("write_s") if self._staged is not None else None
            self.last_swap = {} if write_s is None else {"write_s": write_s}
            try:
                yield
            finally:
                self._swapping = False
                server = self._server  # a new server when the base changed the model
                paused, self._paused_server = self._paused_server, None
                pending, self._host_pending = self._host_pending, None
                started = time.perf_counter()
                try:
                    if server is not None and self._applied_in_swap:
                        self._label(server, identity)
                finally:
                    try:
                        if paused is not None and paused is server:
                            self._post(server, "/resume")
                            self.last_swap["vllm_paused_s"] = time.perf_counter() - self._paused_at
                    finally:
                        # vLLM holds these patches' bits: the host copy follows, whatever
                        # failed after the push.
                        if pending is not None and server is not None:
                            patched = time.perf_counter()
                            _patch_host(server, pending, keep_undo=False)
                            self.last_swap["host_patch_s"] = time.perf_counter() - patched
                self.last_swap["resume_s"] = time.perf_counter() - started
                logger.info(
                    "swap to %s: %s", identity,
                    ", ".join(f"{k} {v:.3f}s" for k, v in self.last_swap.items()),
                )  # fmt: skip

    def _pause_if_swapping(self, server: _Server) -> None:
        """Inside `swap`: pause vLLM now (once), in the transition's mode."""
        if not self._swapping or self._paused_server is not None:
            return
        started = time.perf_counter()
        mode = "keep" if self.transition == "async" else "wait"
        self._post(server, "/pause", params={"mode": mode, "clear_cache": "false"})
        self._paused_server, self._paused_at = server, started
        self.last_swap["pause_s"] = time.perf_counter() - started

    def _label(self, server: _Server, identity: str) -> None:
        self._post(
            server,
            CONTROL_PATH,
            json={"snapshot_identity": identity},
            headers={"authorization": f"Bearer {server.token}"},
        )

    def reset_prompt_cache(self, scope: CacheScope = "all") -> int:
        """Drop vLLM's whole prefix cache (it cannot be scoped, so "shared" drops all too).

        Running (or paused) requests are preempted and recompute their KV on the
        current weights. vLLM does not say how many blocks it dropped: returns 1
        when it reset the cache.
        """
        server = self._server
        if server is None:
            return 0
        self._pause_if_swapping(server)
        started = time.perf_counter()
        answer = self._post(
            server, "/reset_prefix_cache", params={"reset_running_requests": "true"}
        )
        self.last_swap["reset_s"] = time.perf_counter() - started
        if not answer.json().get("success"):
            raise DeploymentError(
                "vLLM refused to reset its prefix cache; restart the replica so no stale KV "
                "is served"
            )
        return 1

    def weights_checksums(self, checksum_format: str) -> dict[str, str]:
        """Checksums of what vLLM's workers hold in checkpoint layout, else of the host copy."""
        server = self._require_server()
        with self._lock:
            held = self._held_checksums(server, sorted(server.readable), checksum_format)
        return {
            name: held.get(name) or checksum_tensor(checksum_format, tensor)
            for name, tensor in server.host.items()
        }

    # --- serving through the sidecar's own API ------------------------------------------

    def generate(
        self,
        request: GenerateRequest,
        *,
        step_guard: StepGuard,
        on_token: TokenCallback | None = None,
    ) -> GenerateResult:
        """Generate one sequence by streaming from vLLM's `/v1/completions` (token ids in/out).

        Each token's snapshot is the label vLLM's middleware put on its chunk. The
        `step_guard` is entered once before the request (it waits out a swap in
        progress); vLLM's own pause orders later swaps against its steps.
        """
        server = self._require_server()
        check_generate_request(
            request, vocab_size=server.vocab_size, max_positions=server.max_model_len
        )
        if request.adapter is not None:
            raise InvalidInputError(
                f"unknown LoRA adapter {request.adapter!r}: the vllm engine serves no adapters "
                "(use the torch engine for LoRA)"
            )
        top_k = request.logprobs or 0
        result = GenerateResult(
            token_ids=[],
            logprobs=[] if request.logprobs is not None else None,
            top_logprobs=[] if top_k > 0 else None,
        )
        max_tokens = min(request.max_tokens, server.max_model_len - len(request.prompt_token_ids))
        if max_tokens <= 0:
            return result
        eos_ids = eos_token_ids(server.config.get("eos_token_id"))
        body: dict[str, Any] = {
            "model": server.served_model,
            "prompt": list(request.prompt_token_ids),
            "max_tokens": max_tokens,
            "temperature": request.temperature,
            "top_p": request.top_p,
            "top_k": request.top_k if request.top_k > 0 else -1,
            "seed": request.seed,
            "logprobs": request.logprobs,
            "stop_token_ids": sorted({*request.stop_token_ids, *eos_ids}),
            "ignore_eos": True,
            "skip_special_tokens": False,
            "return_token_ids": True,
            "return_tokens_as_token_ids": True,
            "stream": True,
            "stream_options": {"include_usage": True},
        }
        with step_guard():  # waits out a swap in progress
            pass
        with self._http.stream("POST", f"{server.url}/v1/completions", json=body) as answer:
            if answer.status_code != 200:
                answer.read()
                raise DeploymentError(
                    f"vLLM's server answered /v1/completions with {answer.status_code}: "
                    f"{answer.text[:300]}"
                )
            for line in answer.iter_lines():
                if not line.startswith("data: {"):
                    continue
                chunk = json.loads(line[len("data: ") :])
                if not _take_chunk(chunk, result, top_k):
                    continue
                if on_token is not None and not on_token(result):
                    result.finish_reason = "stop"
                    break
        return result

    def close(self) -> None:
        with self._lock:
            self._drop_staged()
            server, self._server = self._server, None
        if server is not None:
            _stop(server)
        self._http.close()

    def _require_server(self) -> _Server:
        server = self._server
        if server is None:
            raise DeploymentError("the vLLM engine has no model loaded yet; load a base first")
        return server


# --- helpers ------------------------------------------------------------------------


#: What `_agreed` answers for a tensor whose workers hold different bits (matches no
#: checksum, so the comparison that asked fails).
RANKS_DISAGREE = "workers disagree"


def _agreed(per_worker: Sequence[Mapping[str, str]]) -> dict[str, str]:
    """One checksum per tensor from every worker's answer: the workers' common value, or
    `RANKS_DISAGREE` where they differ (a replicated tensor must be the same everywhere)."""
    names: set[str] = set().union(*per_worker) if per_worker else set()
    out: dict[str, str] = {}
    for name in names:
        values = {held.get(name) for held in per_worker}
        agreed = values.pop() if len(values) == 1 else None
        out[name] = agreed if agreed is not None else RANKS_DISAGREE
    return out


#: How `vllm serve` spells the API-server count (`--api-server-count=N` works too).
_API_SERVER_COUNT_FLAGS = ("--api-server-count", "-asc")


def api_server_count(serve_args: Sequence[str]) -> int:
    """The API-server count these `vllm serve` flags ask for (1 when they do not say)."""
    count = 1
    for i, arg in enumerate(serve_args):
        flag, eq, value = arg.partition("=")
        if flag not in _API_SERVER_COUNT_FLAGS:
            continue
        if not eq:
            value = serve_args[i + 1] if i + 1 < len(serve_args) else ""
        try:
            count = int(value)
        except ValueError:
            raise InvalidInputError(
                f"vLLM serve flag {flag} needs a whole number, got {value!r}"
            ) from None
    return count


def _check_known(server: _Server, patches: Mapping[str, Patch]) -> None:
    unknown = sorted(set(patches) - set(server.host))
    if unknown:
        raise InvalidInputError(
            f"patches name tensors the served model lacks: {', '.join(unknown[:5])}"
        )


def _patch_host(
    server: _Server, patches: Mapping[str, Patch], *, keep_undo: bool
) -> dict[str, Patch]:
    """Write the patches into the host copy (verified: they fit); the undo patches if asked."""
    if keep_undo:
        return {name: patch.apply_(server.host[name]) for name, patch in patches.items()}
    write_patches((server.host[name], patch) for name, patch in patches.items())
    return {}


def _take_chunk(chunk: Mapping[str, Any], result: GenerateResult, top_k: int) -> bool:
    """Add a streamed completion chunk's tokens to `result`; True when it added any."""
    usage = chunk.get("usage")
    if isinstance(usage, Mapping):
        details = usage.get("prompt_tokens_details") or {}
        result.num_cached_prompt_tokens = int(details.get("cached_tokens") or 0)
    choices = chunk.get("choices") or []
    if not choices:
        return False
    choice = choices[0]
    new_ids = [int(t) for t in choice.get("token_ids") or []]
    result.token_ids.extend(new_ids)
    result.token_snapshots.extend([str(chunk.get("snapshot_identity") or "")] * len(new_ids))
    logprobs = choice.get("logprobs")
    if result.logprobs is not None and logprobs:
        result.logprobs.extend(float(lp) for lp in logprobs.get("token_logprobs") or [])
        if result.top_logprobs is not None:
            for top in logprobs.get("top_logprobs") or []:
                ranked = sorted(top.items(), key=lambda kv: -kv[1])[:top_k]
                result.top_logprobs.append({_token_id(t): float(lp) for t, lp in ranked})
    if choice.get("finish_reason"):
        result.finish_reason = "stop" if choice["finish_reason"] == "stop" else "length"
    return bool(new_ids)


def _token_id(token: str) -> int:
    """A token vLLM names `token_id:<id>` (`return_tokens_as_token_ids`)."""
    return int(token.rpartition(":")[2])


def _free_port(host: str) -> int:
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
        s.bind((host, 0))
        port: int = s.getsockname()[1]
        return port


def _url_host(host: str) -> str:
    if host in ("0.0.0.0", "::", ""):  # a wildcard bind: reach it on loopback
        return "127.0.0.1"
    return f"[{host}]" if ":" in host else host


def _stop(server: _Server) -> None:
    """Stop vLLM's server (its whole process group: API server, engine core, workers)."""
    try:
        server.process.stop(timeout_s=STOP_TIMEOUT_S)
    finally:
        shutil.rmtree(server.work_dir, ignore_errors=True)
