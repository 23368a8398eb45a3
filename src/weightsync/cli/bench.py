"""`weightsync bench`: weight sync measured side by side with the field's methods."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from weightsync.cli import app
from weightsync.errors import InvalidInputError, WeightSyncError


def _floats(text: str, what: str) -> tuple[float, ...]:
    try:
        return tuple(float(x) for x in text.split(",") if x.strip())
    except ValueError as e:
        raise typer.BadParameter(f"{what} must be comma-separated numbers, got {text!r}") from e


def _ints(text: str, what: str) -> tuple[int, ...]:
    try:
        return tuple(int(x) for x in text.split(",") if x.strip())
    except ValueError as e:
        raise typer.BadParameter(f"{what} must be comma-separated integers, got {text!r}") from e


def _names(text: str | None) -> tuple[str, ...] | None:
    return None if text is None else tuple(c.strip() for c in text.split(",") if c.strip())


@app.command("bench")
def bench(  # noqa: PLR0917  (Typer maps parameters to options)
    size: Annotated[
        str, typer.Option(help="model shape: tiny, small, medium, 116m or 0.6b (Qwen3-0.6B)")
    ] = "0.6b",
    model_dir: Annotated[
        Path | None,
        typer.Option(help="a local Hugging Face checkpoint directory instead of a random model"),
    ] = None,
    lrs: Annotated[str, typer.Option(help="AdamW learning rates, comma-separated")] = (
        "1e-6,3e-6,1e-5"
    ),
    steps_per_lr: Annotated[
        int, typer.Option(help="optimizer steps per learning rate (codecs use the last)")
    ] = 2,
    intervals: Annotated[
        str, typer.Option(help="optimizer steps spanned by one interval-sync delta")
    ] = "1,5,20",
    e2e_syncs: Annotated[
        int, typer.Option(help="delta syncs timed per method end to end (after a first base)")
    ] = 3,
    e2e_lr: Annotated[
        float | None,
        typer.Option(
            help="lr of the end-to-end and interval updates (default: the smallest of --lrs)"
        ),
    ] = None,
    codecs: Annotated[
        str | None,
        typer.Option(help="only the methods of these codecs, comma-separated (full = reload)"),
    ] = None,
    e2e_codecs: Annotated[
        str | None,
        typer.Option(help="only these codecs' methods end to end, comma-separated"),
    ] = None,
    end_to_end: Annotated[
        bool, typer.Option("--e2e/--no-e2e", help="sync into a local deployment per method")
    ] = True,
    engine: Annotated[
        str,
        typer.Option(
            help="deployment engine: torch, or vllm (from the vLLM venv; adds vLLM's own "
            "reload_weights of a full directory as a baseline row)"
        ),
    ] = "torch",
    seed: Annotated[int, typer.Option(help="seed of the model and the updates")] = 0,
    batch: Annotated[int, typer.Option(help="sequences per optimizer step")] = 4,
    seq_len: Annotated[int, typer.Option(help="tokens per sequence")] = 16,
    work_dir: Annotated[
        Path | None, typer.Option(help="scratch directory for snapshots (default: a temp dir)")
    ] = None,
    json_path: Annotated[Path | None, typer.Option("--json", help="write the report as JSON")] = (
        None
    ),
    plot_path: Annotated[
        Path | None, typer.Option("--plot", help="write a PNG chart of the report")
    ] = None,
) -> None:
    """Measure bytes, speed, end-to-end sync time and serving pause per sync method."""
    from weightsync.bench.config import BenchConfig
    from weightsync.bench.plot import write_chart
    from weightsync.bench.render import print_report
    from weightsync.bench.runner import run_bench

    console = Console()
    err = Console(stderr=True)
    try:
        config = BenchConfig(
            size=size,
            model_dir=model_dir,
            lrs=_floats(lrs, "--lrs"),
            steps_per_lr=steps_per_lr,
            intervals=_ints(intervals, "--intervals"),
            e2e_syncs=e2e_syncs,
            e2e_lr=e2e_lr,
            codecs=_names(codecs),
            e2e_codecs=_names(e2e_codecs),
            end_to_end=end_to_end,
            engine=engine,
            seed=seed,
            batch=batch,
            seq_len=seq_len,
            work_dir=work_dir,
        )
    except InvalidInputError as e:
        raise typer.BadParameter(str(e)) from e

    try:
        if err.is_terminal:
            with err.status("benchmark starting") as status:
                report = run_bench(config, progress=status.update)
        else:
            report = run_bench(config)
    except WeightSyncError as e:
        err.print(f"benchmark failed: {e}", markup=False)
        raise typer.Exit(1) from e
    print_report(report, console)
    if json_path is not None:
        report.write_json(json_path)
        err.print(f"wrote {json_path}", markup=False)
    if plot_path is not None:
        write_chart(report, plot_path)
        err.print(f"wrote {plot_path}", markup=False)
    missed = [t.name for t in report.targets if t.status == "missed"]
    if missed:
        err.print(f"targets missed: {', '.join(missed)} (see the targets table)", markup=False)
