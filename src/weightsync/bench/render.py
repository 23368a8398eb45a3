"""The benchmark report as tables: rich on a terminal, Markdown when piped.

The Markdown form is what `docs/benchmarks.md` records, so a run's output can
be pasted there unchanged.
"""

from __future__ import annotations

from rich import box
from rich.console import Console
from rich.table import Table

from weightsync.bench.report import BenchReport

_STATUS_STYLE = {"met": "green", "missed": "red", "not-measured": "yellow"}


def human_bytes(n: float) -> str:
    """`1234567` -> `1.23 MB` (decimal units, like the GB/s columns)."""
    for unit in ("B", "kB", "MB", "GB"):
        if abs(n) < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1000
    return f"{n:.2f} GB"


def _table(title: str, markdown: bool) -> Table:
    return Table(
        title=f"**{title}**" if markdown else title,
        box=box.MARKDOWN if markdown else box.SIMPLE_HEAVY,
        title_justify="left",
        show_edge=markdown,
    )


def report_tables(report: BenchReport, *, markdown: bool) -> list[Table]:
    """One table per section of the report, in reading order."""
    tables: list[Table] = []
    memcpy = report.memcpy_gbps

    updates = _table("Updates (AdamW, GRPO-style loss; bf16 snapshot pairs)", markdown)
    for col in ("lr", "step", "elements", "changed", "±1 ulp of changes", "bound"):
        updates.add_column(col, justify="right")
    for u in report.updates:
        updates.add_row(
            f"{u.lr:g}",
            str(u.step),
            f"{u.num_elements:,}",
            f"{u.changed_fraction:.2%}",
            f"{u.one_step_fraction:.1%}",
            human_bytes(u.bound_bytes),
        )
    tables.append(updates)

    codecs = _table(f"Codecs on one optimizer step (memcpy {memcpy:.2f} GB/s)", markdown)
    for col in (
        "method",
        "lr",
        "changed",
        "payload",
        "× smaller",
        "÷ bound",
        "encode GB/s",
        "decode GB/s",
        "lossless",
    ):
        codecs.add_column(col, justify="left" if col == "method" else "right")
    for c in report.codecs:
        codecs.add_row(
            c.method,
            f"{c.lr:g}",
            f"{c.changed_fraction:.2%}",
            human_bytes(c.payload_bytes),
            f"{c.x_smaller:.1f}",
            f"{c.over_bound:.3f}",
            f"{c.encode_gbps:.2f} ({c.encode_gbps / memcpy:.2f}×)",
            f"{c.decode_gbps:.2f} ({c.decode_gbps / memcpy:.2f}×)",
            "yes" if c.lossless else "NO",
        )
    tables.append(codecs)

    if report.intervals:
        intervals = _table("Interval sync: one delta spanning N optimizer steps", markdown)
        for col in ("codec", "lr", "steps", "changed", "payload", "× smaller", "÷ bound"):
            intervals.add_column(col, justify="left" if col == "codec" else "right")
        for c in report.intervals:
            intervals.add_row(
                c.codec,
                f"{c.lr:g}",
                str(c.span_steps),
                f"{c.changed_fraction:.2%}",
                human_bytes(c.payload_bytes),
                f"{c.x_smaller:.1f}",
                f"{c.over_bound:.3f}",
            )
        tables.append(intervals)

    if report.end_to_end:
        full = next((e for e in report.end_to_end if e.checkpoint_type == "base"), None)
        # With --engine vllm: vLLM's own reload of a full directory (bench/vllm_reload.py).
        vllm = next((e for e in report.end_to_end if e.checkpoint_type == "full-dir"), None)
        e2e = _table(
            "End to end: save_and_hotload into a local deployment (median per sync, first "
            "base excluded)",
            markdown,
        )
        for col in (
            "method",
            "payload",
            "save s",
            "hot-load s",
            "warmup s",
            "total s",
            "vs full reload",
            *(["vs vLLM reload_weights"] if vllm else []),
            "pause ms",
            "pause/total",
            "trainer peak",
            "replica peak",
            "lossless",
        ):
            e2e.add_column(col, justify="left" if col == "method" else "right")
        for e in report.end_to_end:
            speedup = f"{full.total_s / e.total_s:.1f}× faster" if full and e.total_s else "-"
            against_vllm = (
                [f"{vllm.total_s / e.total_s:.1f}× faster" if e.total_s else "-"] if vllm else []
            )
            e2e.add_row(
                e.method,
                human_bytes(e.payload_bytes),
                f"{e.save_s:.2f}",
                f"{e.hotload_s:.2f}",
                f"{e.warmup_s:.2f}",
                f"{e.total_s:.2f}",
                speedup,
                *against_vllm,
                f"{e.pause_s * 1000:.1f}",
                f"{e.pause_fraction:.1%}",
                human_bytes(e.trainer_peak_rss_bytes),
                human_bytes(e.replica_peak_rss_bytes),
                "yes" if e.lossless else "NO",
            )
        tables.append(e2e)

    targets = _table("Targets", markdown)
    for col in ("target", "status", "measured", "what limits it"):
        targets.add_column(col)
    for t in report.targets:
        status = t.status if markdown else f"[{_STATUS_STYLE[t.status]}]{t.status}[/]"
        targets.add_row(t.target, status, t.measured, t.limited_by)
    tables.append(targets)
    return tables


def print_report(report: BenchReport, console: Console | None = None) -> None:
    """Print the report: rich tables on a terminal, Markdown tables when piped."""
    console = console or Console()
    markdown = not console.is_terminal
    if markdown:
        console = Console(file=console.file, width=400, no_color=True, highlight=False)
    model = report.model
    console.print(
        f"model {model.get('label')}: {model.get('num_elements', 0):,} bf16 elements in "
        f"{model.get('num_tensors', 0)} tensors ({human_bytes(model.get('full_bytes', 0))}); "
        f"memcpy {report.memcpy_gbps:.2f} GB/s; run took {report.wall_s:.0f} s"
    )
    for table in report_tables(report, markdown=markdown):
        console.print()
        console.print(table)
