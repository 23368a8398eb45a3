"""A PNG chart of the report: bytes against the bound, and end-to-end sync time.

matplotlib runs on the Agg backend (no display needed); the figure is written
to a temporary name and renamed, like every other file weightsync writes.
"""

from __future__ import annotations

from pathlib import Path

from weightsync.bench.report import BenchReport


def write_chart(report: BenchReport, path: str | Path) -> Path:
    """Write the report's chart as a PNG to `path`; return the path."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    panels = 3 if report.end_to_end else 2
    fig, axes = plt.subplots(1, panels, figsize=(6 * panels, 4.8), squeeze=False)

    ax = axes[0][0]
    methods = list(dict.fromkeys(c.method for c in report.codecs))
    lrs = sorted({c.lr for c in report.codecs})
    width = 0.8 / max(len(lrs), 1)
    for i, lr in enumerate(lrs):
        ratios = [
            next((c.over_bound for c in report.codecs if c.method == m and c.lr == lr), 0.0)
            for m in methods
        ]
        ax.bar([x + i * width for x in range(len(methods))], ratios, width, label=f"lr {lr:g}")
    ax.axhline(1.0, color="black", linewidth=0.8, linestyle="--", label="bound")
    ax.set_yscale("log")
    ax.set_xticks([x + width * (len(lrs) - 1) / 2 for x in range(len(methods))])
    ax.set_xticklabels(methods, rotation=30, ha="right")
    ax.set_ylabel("payload ÷ information bound (log)")
    ax.set_title("Bytes per optimizer step")
    ax.legend(fontsize=8)

    ax = axes[0][1]
    for codec in dict.fromkeys(c.codec for c in report.intervals):
        rows = sorted((c for c in report.intervals if c.codec == codec), key=lambda c: c.span_steps)
        ax.plot(
            [c.span_steps for c in rows],
            [c.payload_bytes / 1e6 for c in rows],
            marker="o",
            label=codec,
        )
    if report.codecs:
        ax.axhline(
            report.codecs[0].full_bytes / 1e6, color="gray", linestyle=":", label="full bf16"
        )
    ax.set_xlabel("optimizer steps spanned by one delta")
    ax.set_ylabel("payload MB")
    ax.set_title("Interval sync")
    ax.legend(fontsize=8)

    if report.end_to_end:
        ax = axes[0][2]
        names = [e.method for e in report.end_to_end]
        bottom = [0.0] * len(names)
        for part in ("save_s", "hotload_s", "warmup_s"):
            values = [float(getattr(e, part)) for e in report.end_to_end]
            ax.bar(names, values, bottom=bottom, label=part.removesuffix("_s"))
            bottom = [b + v for b, v in zip(bottom, values, strict=True)]
        ax.set_ylabel("seconds per sync (median)")
        ax.set_title("save_and_hotload, end to end")
        ax.tick_params(axis="x", rotation=30)
        ax.legend(fontsize=8)

    fig.suptitle(f"weightsync bench — {report.model.get('label')}")
    fig.tight_layout()
    tmp = out.with_name(out.name + ".tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    tmp.replace(out)
    return out
