"""`weightsync snapshot`: list, inspect, verify and materialize stored snapshots."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

from weightsync.cli import app
from weightsync.errors import WeightSyncError

snapshot_app = typer.Typer(
    name="snapshot",
    help="List, inspect, verify and materialize snapshots in a storage root.",
    no_args_is_help=True,
)
app.add_typer(snapshot_app, name="snapshot")

StorageArg = Annotated[
    str, typer.Argument(help="Storage root: a local path or URL (file://, s3://, memory://).")
]
IdentityArg = Annotated[
    str, typer.Argument(help="The snapshot identity, e.g. step-00042-1a2b3c4d.")
]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print JSON instead of tables.")]
EndpointOpt = Annotated[
    str | None,
    typer.Option(
        "--endpoint-url",
        envvar="AWS_ENDPOINT_URL",
        help="Endpoint of an S3-compatible object store (for s3:// roots).",
    ),
]


def _store(storage: str, endpoint_url: str | None) -> Any:
    from weightsync.snapshot import SnapshotStore
    from weightsync.storage import open_storage

    options: dict[str, Any] = {}
    if endpoint_url and storage.startswith(("s3://", "s3a://")):
        options["client_kwargs"] = {"endpoint_url": endpoint_url}
    return SnapshotStore(open_storage(storage, **options))


def _fail(error: WeightSyncError) -> typer.Exit:
    Console(stderr=True).print(f"[bold red]error:[/] {error}", highlight=False)
    return typer.Exit(code=1)


def _print_json(value: Any) -> None:
    typer.echo(json.dumps(value, indent=2, sort_keys=True, default=str))


def _size(num_bytes: int | None) -> str:
    if num_bytes is None:
        return ""
    value = float(num_bytes)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024 or unit == "GiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{value:.1f} GiB"


@snapshot_app.command("list")
def list_snapshots(
    storage: StorageArg, as_json: JsonOpt = False, endpoint_url: EndpointOpt = None
) -> None:
    """List the complete snapshots (directories with a manifest) under STORAGE."""
    try:
        store = _store(storage, endpoint_url)
        rows: list[dict[str, Any]] = []
        for identity in store.list_snapshots():
            try:
                m = store.read_manifest(identity)
            except WeightSyncError as e:
                rows.append({"identity": identity, "error": str(e)})
                continue
            rows.append(
                {
                    "identity": identity,
                    "kind": m.kind,
                    "parent": m.parent,
                    "compression_format": m.compression_format,
                    "payload_bytes": m.stats.get("payload_bytes"),
                    "created_at": m.created_at,
                }
            )
    except WeightSyncError as e:
        raise _fail(e) from e
    if as_json:
        _print_json(rows)
        return
    table = Table(title=f"snapshots in {store.storage.url}")
    for column in ("identity", "kind", "parent", "codec", "payload", "created", "error"):
        table.add_column(column)
    for r in rows:
        table.add_row(
            r["identity"],
            r.get("kind", ""),
            r.get("parent") or "",
            r.get("compression_format") or "",
            _size(r.get("payload_bytes")),
            r.get("created_at", ""),
            r.get("error", ""),
        )
    Console().print(table)


@snapshot_app.command("inspect")
def inspect(  # noqa: PLR0917  (Typer maps parameters to options)
    storage: StorageArg,
    identity: IdentityArg,
    as_json: JsonOpt = False,
    detailed: Annotated[
        bool,
        typer.Option("--detailed", help="Materialize parent and delta for key-step stats."),
    ] = False,
    parent: Annotated[
        str | None,
        typer.Option(
            "--parent",
            help="The parent of a Fireworks delta (its directory does not name it).",
        ),
    ] = None,
    endpoint_url: EndpointOpt = None,
) -> None:
    """Show a snapshot's kind, chain, codec, sizes, per-tensor changes, and what is unproven."""
    from weightsync.snapshot.describe import describe_snapshot

    try:
        info = describe_snapshot(
            _store(storage, endpoint_url), identity, detailed=detailed, parent=parent
        )
    except WeightSyncError as e:
        raise _fail(e) from e
    if as_json:
        _print_json(info)
        return
    console = Console()
    stats = info["stats"]
    ratio = info["compression_ratio"]
    console.print(
        f"[bold]{info['identity']}[/] ({info['kind']}, {info['layout']} layout) at {info['url']}",
        highlight=False,
    )
    console.print(f"chain: {' -> '.join(info['chain'])}", highlight=False)
    console.print(
        f"codec: {info['compression_format'] or '-'}  checksum: {info['checksum_format']}  "
        f"session: {info['session_id'] or '-'}  created: {info['created_at']}",
        highlight=False,
    )
    console.print(
        f"payload: {_size(stats.get('payload_bytes'))}  full: {_size(stats.get('full_bytes'))}"
        + (f"  ratio: {ratio:.2f}x" if ratio else "")
        + f"  changed: {stats.get('num_changed')}/{stats.get('num_elements')} elements",
        highlight=False,
    )
    for line in info["cannot_prove"]:
        console.print(f"[yellow]cannot prove:[/] {line}", highlight=False)
    table = Table()
    for column in ("tensor", "shape", "dtype", "changed", "changed %", "payload"):
        table.add_column(column)
    for t in info["tensors"]:
        fraction = t["changed_fraction"]
        table.add_row(
            t["name"],
            "x".join(map(str, t["shape"])),
            t["dtype"],
            "" if t["num_changed"] is None else str(t["num_changed"]),
            "" if fraction is None else f"{100 * fraction:.2f}",
            _size(t["payload_bytes"]),
        )
    console.print(table)


@snapshot_app.command("verify")
def verify(
    storage: StorageArg,
    identity: IdentityArg,
    as_json: JsonOpt = False,
    endpoint_url: EndpointOpt = None,
) -> None:
    """Check every file of the chain and the materialized weights against their checksums."""
    try:
        store = _store(storage, endpoint_url)
        with Console(stderr=True).status(f"verifying {identity}"):
            report = store.verify(identity)
    except WeightSyncError as e:
        raise _fail(e) from e
    if as_json:
        _print_json(report.to_dict())
    elif report.ok:
        Console().print(
            f"[green]ok[/] {identity}: {report.files_checked} files "
            f"({_size(report.bytes_checked)}) and {report.tensors_checked} tensors verified "
            f"along {' -> '.join(report.chain)}",
            highlight=False,
        )
    else:
        err = Console(stderr=True)
        for problem in report.problems:
            err.print(f"[bold red]error:[/] {problem}", highlight=False)
    if not report.ok:
        raise typer.Exit(code=1)


@snapshot_app.command("materialize")
def materialize(
    storage: StorageArg,
    identity: IdentityArg,
    output_dir: Annotated[Path, typer.Argument(help="New (or empty) directory to write.")],
    as_json: JsonOpt = False,
    endpoint_url: EndpointOpt = None,
) -> None:
    """Write the weights IDENTITY stands for as a standalone Hugging Face model directory."""
    from weightsync.snapshot import materialize_to

    try:
        store = _store(storage, endpoint_url)
        with Console(stderr=True).status(f"materializing {identity}"):
            out = materialize_to(store, identity, output_dir)
    except WeightSyncError as e:
        raise _fail(e) from e
    if as_json:
        _print_json({"identity": identity, "output_dir": str(out)})
    else:
        Console().print(f"wrote {identity} to {out}", highlight=False)
