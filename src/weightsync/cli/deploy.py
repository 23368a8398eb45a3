"""`weightsync deploy`: drive a running deployment (status, ledger, hot-load); local ones."""

from __future__ import annotations

import json
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

from weightsync.cli import app
from weightsync.errors import DeploymentError, WeightSyncError

deploy_app = typer.Typer(
    name="deploy",
    help="Inspect and drive a running deployment over its hot-load API.",
    no_args_is_help=True,
)
app.add_typer(deploy_app, name="deploy")

UrlArg = Annotated[str, typer.Argument(help="The deployment's URL, e.g. http://127.0.0.1:8000")]
ApiKeyOpt = Annotated[
    str | None,
    typer.Option("--api-key", envvar="WEIGHTSYNC_API_KEY", help="Bearer token of the deployment."),
]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")]


def _manager(url: str, api_key: str | None) -> Any:
    from weightsync.deployment import DeploymentManager

    return DeploymentManager(api_key=api_key, base_url=url, stop_on_exit=False)


def _fail(error: WeightSyncError) -> typer.Exit:
    Console(stderr=True).print(f"[bold red]error:[/] {error}", highlight=False)
    return typer.Exit(code=1)


def _print_json(value: Any) -> None:
    typer.echo(json.dumps(value, indent=2, sort_keys=True, default=str))


def _status_table(status: dict[str, Any]) -> Table:
    table = Table(title="hot-load status")
    for column in ("replica", "serving", "ready", "stage", "target", "adapters", "error"):
        table.add_column(column, overflow="fold")
    for replica in status.get("replicas") or []:
        state = replica.get("loading_state") or {}
        table.add_row(
            str(replica.get("replica_id")),
            str(replica.get("current_snapshot_identity")),
            "yes" if replica.get("readiness") else "no",
            str(state.get("stage")),
            str(state.get("target_snapshot_identity") or ""),
            ", ".join(str(a.get("identity")) for a in replica.get("loaded_adapters") or []),
            str(state.get("error") or ""),
        )
    return table


@deploy_app.command("status")
def status(url: UrlArg, api_key: ApiKeyOpt = None, as_json: JsonOpt = False) -> None:
    """Show what every replica serves, whether it is ready, and what it is loading."""
    mgr = _manager(url, api_key)
    try:
        result = mgr.hotload_check_status(None)
    except WeightSyncError as e:
        raise _fail(e) from e
    finally:
        mgr.close()
    if as_json:
        _print_json(result)
    else:
        Console().print(_status_table(result))


@deploy_app.command("ledger")
def ledger(
    url: UrlArg,
    reset: Annotated[
        bool, typer.Option("--reset", help="Clear the ledger (then only a base is accepted).")
    ] = False,
    api_key: ApiKeyOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """List every snapshot the deployment loaded (or reset that record)."""
    mgr = _manager(url, api_key)
    try:
        result: Any = mgr.reset_ledger(None) if reset else mgr.ledger(None)
    except WeightSyncError as e:
        raise _fail(e) from e
    finally:
        mgr.close()
    if as_json or reset:
        _print_json(result)
        return
    table = Table(title="ledger")
    present = {key for entry in result for key in entry}
    columns = [c for c in _LEDGER_COLUMNS if c in present]
    for column in columns:
        table.add_column(column, overflow="fold")
    for entry in result:
        table.add_row(*(_cell(entry.get(c)) for c in columns))
    Console().print(table)


# The ledger columns worth a glance; --json shows every field.
_LEDGER_COLUMNS = (
    "replica_id", "identity", "kind", "parent", "result", "pause_s", "total_s",
    "bytes_fetched", "finished_at", "error",
)  # fmt: skip


def _cell(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


@deploy_app.command("hotload")
def hotload(  # noqa: PLR0917  (Typer maps parameters to options)
    url: UrlArg,
    identity: Annotated[str, typer.Argument(help="Snapshot identity to load.")],
    previous: Annotated[
        str | None, typer.Option("--previous", help="For a delta: the identity it applies onto.")
    ] = None,
    compression_format: Annotated[
        str | None, typer.Option("--compression-format", help="For a delta: its codec.")
    ] = None,
    checksum_format: Annotated[
        str | None, typer.Option("--checksum-format", help="For a delta: its checksum format.")
    ] = None,
    reset_prompt_cache: Annotated[
        str, typer.Option(help="true, false, all, none or new_session.")
    ] = "true",
    wait: Annotated[
        bool, typer.Option("--wait", help="Wait until every replica serves it.")
    ] = False,
    timeout_s: Annotated[float, typer.Option("--timeout", help="Seconds to wait.")] = 600.0,
    api_key: ApiKeyOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Ask the deployment to load a snapshot (a base, or a delta with --previous)."""
    cache: Any = {"true": True, "false": False}.get(reset_prompt_cache.lower(), reset_prompt_cache)
    if cache not in (True, False, "all", "none", "new_session"):
        raise typer.BadParameter(
            "use true, false, all, none or new_session", param_hint="--reset-prompt-cache"
        )
    metadata = None
    if previous is not None:
        metadata = {"previous_snapshot_identity": previous}
        if compression_format:
            metadata["compression_format"] = compression_format
        if checksum_format:
            metadata["checksum_format"] = checksum_format
    elif compression_format or checksum_format:
        raise typer.BadParameter("only a delta has formats: give --previous too")
    mgr = _manager(url, api_key)
    try:
        if wait:
            if not mgr.hotload_and_wait(
                None, "", identity, metadata, cache, timeout_seconds=timeout_s
            ):
                raise mgr.last_hotload_error or DeploymentError(f"{identity!r} did not load")
            done = mgr.last_hotload_result
            result: Any = {
                "identity": identity,
                "seconds": done.seconds if done else 0.0,
                "pause_s": done.pause_s if done else None,
            }
        else:
            result = mgr.hotload(None, "", identity, metadata, cache)
    except WeightSyncError as e:
        raise _fail(e) from e
    finally:
        mgr.close()
    if as_json:
        _print_json(result)
    elif wait:
        typer.echo(f"serving {identity} on every replica after {result['seconds']:.2f}s")
    else:
        typer.echo(f"accepted {identity}: {json.dumps(result, default=str)}")


@deploy_app.command("list")
def list_local(
    registry_dir: Annotated[
        str | None, typer.Option(help="Registry of local deployments (default ~/.cache/...).")
    ] = None,
    as_json: JsonOpt = False,
) -> None:
    """List local deployments started by DeploymentManager.create_or_get."""
    from weightsync.deployment import DeploymentManager

    mgr = DeploymentManager(registry_dir=registry_dir, stop_on_exit=False)
    infos = mgr.list_deployments()
    mgr.close()
    if as_json:
        _print_json(
            [{"deployment_id": i.deployment_id, "state": i.state, "url": i.url} for i in infos]
        )
        return
    table = Table(title="local deployments")
    for column in ("deployment", "state", "url", "pid"):
        table.add_column(column, overflow="fold")
    for info in infos:
        table.add_row(info.deployment_id, info.state, str(info.url or ""), str(info.pid or ""))
    Console().print(table)


@deploy_app.command("stop")
def stop_local(
    deployment_id: Annotated[str, typer.Argument(help="A local deployment's id.")],
    registry_dir: Annotated[str | None, typer.Option(help="Registry of local deployments.")] = None,
    delete: Annotated[
        bool, typer.Option("--delete", help="Also forget it (record and state).")
    ] = False,
) -> None:
    """Stop a local deployment (scale to zero), or delete it."""
    from weightsync.deployment import DeploymentManager

    mgr = DeploymentManager(registry_dir=registry_dir, stop_on_exit=False)
    try:
        done = mgr.delete(deployment_id) if delete else mgr.scale_to_zero(deployment_id)
    except WeightSyncError as e:
        raise _fail(e) from e
    finally:
        mgr.close()
    typer.echo(f"{deployment_id}: {'deleted' if delete else 'stopped'}" if done else "not running")
