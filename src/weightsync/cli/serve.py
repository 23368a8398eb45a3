"""`weightsync serve`: start a deployment (one replica, or a gateway over N replica processes).

The flags become one `ReplicaConfig` (`_replica_config`), served in this process,
or the template of a gateway's replica processes (`server.replica_process`) or
of Ray actors (`deployment.ray_replicas`).
"""

from __future__ import annotations

import hashlib
import logging
import os
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from weightsync.cli import app
from weightsync.errors import WeightSyncError
from weightsync.server.config import (
    DEFAULT_ACCOUNT_ID,
    DEFAULT_MAX_ADAPTERS,
    DEFAULT_MAX_BODY_BYTES,
    DEFAULT_MODEL_NAME,
    default_state_root,
)
from weightsync.server.fetch_policy import (
    DEFAULT_FETCH_ATTEMPTS,
    DEFAULT_FETCH_BACKOFF_S,
    DEFAULT_FETCH_TIMEOUT_S,
    FetchPolicy,
)
from weightsync.server.inference_admission import (
    DEFAULT_INFERENCE_WORKERS,
    DEFAULT_MAX_QUEUED_REQUESTS,
    DEFAULT_MAX_REQUEST_TOKENS,
    InferenceLimits,
)
from weightsync.server.stage_hooks import stall_hook_from_env

if TYPE_CHECKING:
    from weightsync.deployment.ray_replicas import RayPlacement
    from weightsync.server.config import ReplicaConfig
    from weightsync.server.logs import LogFormat

logger = logging.getLogger("weightsync.serve")


def _default_state_dir(
    storage: str | None, snapshot: str | None, model_dir: Path | None, model_name: str
) -> Path:
    """Same start command → same state dir, so a restarted deployment recovers its ledger."""
    source = f"{storage}|{snapshot}|{model_dir.resolve() if model_dir else None}"
    digest = hashlib.sha256(source.encode()).hexdigest()[:10]
    return default_state_root() / f"{model_name}-{digest}"


@app.command("serve")
def serve(  # noqa: PLR0917  (typer maps parameters to options)
    storage: Annotated[str | None, typer.Option(help="Snapshot storage URL or path.")] = None,
    snapshot: Annotated[
        str | None, typer.Option(help="Identity of the snapshot to start from.")
    ] = None,
    model_dir: Annotated[
        Path | None, typer.Option(help="Start from a Hugging Face model directory instead.")
    ] = None,
    snapshot_name: Annotated[
        str | None, typer.Option(help="Identity reported for --model-dir (default: its name).")
    ] = None,
    replicas: Annotated[int, typer.Option(min=1, help="Replica processes.")] = 1,
    host: Annotated[str, typer.Option(help="Address to bind (loopback unless told).")] = (
        "127.0.0.1"
    ),
    port: Annotated[int, typer.Option(min=0, max=65535, help="Port; 0 = any free.")] = 0,
    api_key: Annotated[
        str | None,
        typer.Option(
            envvar="WEIGHTSYNC_API_KEY",
            show_envvar=True,
            help="Require 'Authorization: Bearer KEY' on every route but /health.",
        ),
    ] = None,
    transition: Annotated[str, typer.Option(help="async | sync")] = "async",
    engine: Annotated[str, typer.Option(help="Engine: torch | vllm.")] = "torch",
    engine_threads: Annotated[
        int | None, typer.Option(min=1, help="torch engine: intra-op threads per replica.")
    ] = None,
    buffered_swap: Annotated[
        bool,
        typer.Option(
            help="torch engine: keep a second copy of the weights so that a load is written "
            "while serving goes on and the serving pause only swaps copies (docs/server.md; "
            "costs one more copy of the model in memory)."
        ),
    ] = False,
    device: Annotated[
        str,
        typer.Option(help="torch engine: serve on cpu | cuda | auto (CUDA when present)."),
    ] = "cpu",
    vllm_arg: Annotated[
        list[str] | None,
        typer.Option(
            help="vllm engine: one more `vllm serve` argument for vLLM's server (repeatable, "
            "e.g. --vllm-arg=--max-model-len=4096)."
        ),
    ] = None,
    state_dir: Annotated[
        Path | None, typer.Option(help="Where ledgers live (default: per deployment, in tmp).")
    ] = None,
    model_name: Annotated[str, typer.Option(help="Model name in responses.")] = (
        DEFAULT_MODEL_NAME
    ),
    deployment_id: Annotated[
        str | None,
        typer.Option(help="Deployment id the control plane reports (default: the model name)."),
    ] = None,
    account_id: Annotated[
        str, typer.Option(help="Account id GET /v1/accounts reports (the Fireworks SDK's).")
    ] = DEFAULT_ACCOUNT_ID,
    ready_file: Annotated[
        Path | None, typer.Option(help='Write {"url", "pid"} here once serving.')
    ] = None,
    max_body_bytes: Annotated[int, typer.Option(help="Request body limit.")] = (
        DEFAULT_MAX_BODY_BYTES
    ),
    fetch_attempts: Annotated[
        int, typer.Option(min=1, help="Tries per storage read during a hot-load (1 = no retry).")
    ] = DEFAULT_FETCH_ATTEMPTS,
    fetch_backoff_s: Annotated[
        float, typer.Option(min=0.0, help="Wait before the first retry (doubles each retry).")
    ] = DEFAULT_FETCH_BACKOFF_S,
    fetch_timeout_s: Annotated[
        float, typer.Option(min=0.001, help="A hot-load's fetch stage fails after this long.")
    ] = DEFAULT_FETCH_TIMEOUT_S,
    max_adapters: Annotated[
        int, typer.Option(min=1, help="LoRA adapters kept loaded; the least recently used go.")
    ] = DEFAULT_MAX_ADAPTERS,
    inference_workers: Annotated[
        int, typer.Option(min=1, help="Inference requests generating at once per replica.")
    ] = DEFAULT_INFERENCE_WORKERS,
    max_queued_requests: Annotated[
        int, typer.Option(min=0, help="Inference requests waiting beyond those; then 429.")
    ] = DEFAULT_MAX_QUEUED_REQUESTS,
    max_request_tokens: Annotated[
        int, typer.Option(min=1, help="Tokens one request may generate (prompts x n x max).")
    ] = DEFAULT_MAX_REQUEST_TOKENS,
    ray: Annotated[
        str | None,
        typer.Option(
            "--ray",
            help="Run the replicas as actors on this Ray cluster (auto | HOST:PORT | ray://...); "
            "the gateway stays here (docs/scale.md).",
        ),
    ] = None,
    ray_num_cpus: Annotated[float, typer.Option(min=0.0, help="--ray: CPUs per replica.")] = 1.0,
    ray_num_gpus: Annotated[float, typer.Option(min=0.0, help="--ray: GPUs per replica.")] = 0.0,
    ray_placement: Annotated[
        str, typer.Option(help="--ray: SPREAD (across nodes) | PACK | DEFAULT.")
    ] = "SPREAD",
    ray_max_restarts: Annotated[
        int, typer.Option(min=-1, help="--ray: restarts of a crashed replica (-1: always).")
    ] = -1,
    ray_env: Annotated[
        list[str] | None,
        typer.Option(help="--ray: pass this environment variable on to the replicas (repeat)."),
    ] = None,
    drain_timeout_s: Annotated[
        float | None,
        typer.Option(
            min=0.0,
            help="--ray: seconds a replica being scaled down lets its in-flight requests finish "
            "(whole seconds) before it cancels them and stops (default 30).",
        ),
    ] = None,
    log_level: Annotated[str, typer.Option(help="debug | info | warning | error")] = "info",
    log_format: Annotated[str, typer.Option(help="text | json")] = "text",
    replica_id: Annotated[str, typer.Option(hidden=True)] = "replica-0",
) -> None:
    """Serve a model and accept hot-loads of snapshots (see docs/server.md)."""
    from weightsync.server.logs import configure_logging
    from weightsync.server.runner import LOOPBACK_HOSTS

    if log_format not in ("text", "json"):
        raise typer.BadParameter("choose text or json", param_hint="--log-format")
    configure_logging(level=log_level, fmt=log_format)  # type: ignore[arg-type]
    if host not in LOOPBACK_HOSTS and not api_key:
        logger.warning("binding %s without an API key: anyone who can reach it can hot-load", host)
    if state_dir is None:
        state_dir = _default_state_dir(storage, snapshot, model_dir, model_name)
    try:
        # One replica's config: served here, the template of a pool's or a Ray deployment's
        # replicas (each gets its own id and state dir there).
        template = _replica_config(
            storage=storage, snapshot=snapshot, model_dir=model_dir, snapshot_name=snapshot_name,
            api_key=api_key, transition=transition, engine=engine, engine_threads=engine_threads,
            buffered_swap=buffered_swap, device=device,
            vllm_args=list(vllm_arg or []), state_dir=state_dir / replica_id,
            model_name=model_name, deployment_id=deployment_id, account_id=account_id,
            max_body_bytes=max_body_bytes, replica_id=replica_id,
            fetch=FetchPolicy(
                attempts=fetch_attempts, backoff_s=fetch_backoff_s, timeout_s=fetch_timeout_s
            ),
            max_adapters=max_adapters,
            inference=InferenceLimits(
                workers=inference_workers, max_queued=max_queued_requests,
                max_request_tokens=max_request_tokens,
            ),
        )  # fmt: skip
        if ray is None and drain_timeout_s is not None:
            raise typer.BadParameter(
                "only a deployment on Ray (--ray) is scaled, and drains what it removes",
                param_hint="--drain-timeout-s",
            )
        if ray is not None:
            from weightsync.deployment.ray_replicas import DEFAULT_DRAIN_TIMEOUT_S, RayPlacement

            if ray_placement not in ("SPREAD", "PACK", "DEFAULT"):
                raise typer.BadParameter(
                    "choose SPREAD, PACK or DEFAULT", param_hint="--ray-placement"
                )
            missing = [name for name in ray_env or () if name not in os.environ]
            if missing:
                raise typer.BadParameter(
                    f"not set here: {', '.join(missing)}", param_hint="--ray-env"
                )
            _serve_on_ray(
                placement=RayPlacement(
                    address=ray,
                    num_cpus=ray_num_cpus,
                    num_gpus=ray_num_gpus,
                    strategy=ray_placement,  # type: ignore[arg-type]
                    max_restarts=ray_max_restarts,
                    env_vars={name: os.environ[name] for name in ray_env or ()},
                    drain_timeout_s=(
                        DEFAULT_DRAIN_TIMEOUT_S if drain_timeout_s is None else drain_timeout_s
                    ),
                ),
                num_replicas=replicas,
                template=template,
                host=host,
                port=port,
                api_key=api_key,
                state_dir=state_dir,
                ready_file=ready_file,
                log_level=log_level,
            )  # fmt: skip
            return
        if replicas == 1:
            from weightsync.server.replica_process import ReplicaLaunch, serve_replica

            launch = ReplicaLaunch(
                replica=template,
                host=host,
                port=port,
                ready_file=ready_file,
                log_level=log_level,
                log_format=log_format,  # type: ignore[arg-type]
            )
            # The fault-matrix tests' stall hook; the environment is read here, at the CLI edge.
            serve_replica(launch, on_stage=stall_hook_from_env(os.environ))
            return
        _serve_gateway(
            template=template,
            num_replicas=replicas,
            host=host,
            port=port,
            state_dir=state_dir,
            ready_file=ready_file,
            log_level=log_level,
            log_format=log_format,  # type: ignore[arg-type]
        )
    except WeightSyncError as e:
        logger.error("%s", e)
        raise typer.Exit(code=1) from e


def _engine_options(
    engine: str,
    transition: str,
    model_name: str,
    *,
    engine_threads: int | None,
    buffered_swap: bool = False,
    vllm_args: list[str],
) -> dict[str, object]:
    """The engine's constructor options from the serve flags."""
    if buffered_swap and engine != "torch":
        raise typer.BadParameter(
            "only the torch engine keeps a spare copy of the weights", param_hint="--buffered-swap"
        )
    if engine == "vllm":
        # vLLM's server pauses in the transition's mode and names the model like the replica.
        return {"transition": transition, "served_model_name": model_name, "serve_args": vllm_args}
    if vllm_args:
        raise typer.BadParameter("only the vllm engine takes --vllm-arg", param_hint="--vllm-arg")
    options: dict[str, object] = {} if engine_threads is None else {"num_threads": engine_threads}
    if buffered_swap:
        options["buffered_swap"] = True
    return options


def _serve_gateway(
    *,
    template: ReplicaConfig,
    num_replicas: int,
    host: str,
    port: int,
    state_dir: Path,
    ready_file: Path | None,
    log_level: str,
    log_format: LogFormat,
) -> None:
    """The gateway here, over `num_replicas` replica processes made from `template`."""
    from weightsync.server.gateway import create_gateway_app
    from weightsync.server.replica_process import ReplicaPool
    from weightsync.server.runner import bind_socket, serve

    sock = bind_socket(host, port)  # first: a taken port fails before any replica starts
    pool = ReplicaPool(
        num_replicas=num_replicas,
        template=template,
        state_dir=state_dir,
        log_level=log_level,
        log_format=log_format,
    )
    urls = pool.start()
    gateway = create_gateway_app(
        urls,
        api_key=template.api_key,
        max_body_bytes=template.max_body_bytes,
        pool=pool,
        served=template.served,
    )
    serve(gateway, sock, ready_file=ready_file, log_level=log_level)


def _replica_config(
    *,
    storage: str | None,
    snapshot: str | None,
    model_dir: Path | None,
    snapshot_name: str | None,
    api_key: str | None,
    transition: str,
    engine: str,
    engine_threads: int | None,
    buffered_swap: bool = False,
    device: str = "cpu",
    vllm_args: list[str],
    state_dir: Path,
    model_name: str,
    deployment_id: str | None,
    account_id: str,
    max_body_bytes: int,
    replica_id: str,
    fetch: FetchPolicy,
    max_adapters: int,
    inference: InferenceLimits,
) -> ReplicaConfig:
    """One replica's configuration from the command's options (a Ray deployment's template)."""
    from weightsync.server.config import ReplicaConfig

    return ReplicaConfig(
        storage=storage,
        snapshot=snapshot,
        model_dir=model_dir,
        snapshot_name=snapshot_name,
        state_dir=state_dir,
        replica_id=replica_id,
        model_name=model_name,
        deployment_id=deployment_id,
        account_id=account_id,
        transition=transition,  # type: ignore[arg-type]
        engine=engine,
        engine_options=_engine_options(
            engine,
            transition,
            model_name,
            engine_threads=engine_threads,
            buffered_swap=buffered_swap,
            vllm_args=vllm_args,
        ),
        device=device,  # type: ignore[arg-type]
        api_key=api_key,
        max_body_bytes=max_body_bytes,
        fetch=fetch,
        max_adapters=max_adapters,
        inference=inference,
    )


def _serve_on_ray(
    *,
    placement: RayPlacement,
    num_replicas: int,
    template: ReplicaConfig,
    host: str,
    port: int,
    api_key: str | None,
    state_dir: Path,
    ready_file: Path | None,
    log_level: str,
) -> None:
    """The gateway here, `num_replicas` replica actors on the Ray cluster at `placement`."""
    from weightsync.deployment.ray_replicas import RayDeployment
    from weightsync.server.runner import bind_socket, serve

    sock = bind_socket(host, port)
    deployment = RayDeployment(
        template=template,
        placement=placement,
        state_dir=state_dir,
        served=template.served,
        api_key=api_key,
        max_body_bytes=template.max_body_bytes,
    )
    try:
        deployment.start(num_replicas)
        serve(deployment.app, sock, ready_file=ready_file, log_level=log_level)
    finally:
        deployment.stop()
