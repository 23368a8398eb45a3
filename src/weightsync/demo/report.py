"""The demo's artifacts: a JSON report and a PNG plot of reward, bytes and seconds per step."""

from __future__ import annotations

import json
from pathlib import Path

from weightsync.demo.runner import DemoResult


def write_json(result: DemoResult, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(result.as_dict(), indent=2) + "\n")
    tmp.replace(path)
    return path


def write_plot(result: DemoResult, path: Path) -> Path:
    """Three panels: reward, bytes per sync (vs full), seconds per sync phase."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [s.step for s in result.steps]
    synced = [s for s in result.steps if s.snapshot]
    fig, (ax_reward, ax_bytes, ax_time) = plt.subplots(3, 1, figsize=(8, 9), sharex=True)
    ax_reward.plot(steps, [s.reward for s in result.steps], marker="o", color="tab:green")
    ax_reward.set_ylabel("mean reward")
    ax_reward.set_ylim(0, 1.05)
    ax_reward.set_title("weightsync demo: GRPO with a weight sync after every step")
    ax_reward.grid(alpha=0.3)

    sync_steps = [s.step for s in synced]
    ax_bytes.bar(
        sync_steps, [s.payload_bytes for s in synced], color="tab:blue", label="bytes written"
    )
    if synced:
        ax_bytes.axhline(
            synced[0].full_bytes, color="tab:red", linestyle="--", label="full bf16 snapshot"
        )
    ax_bytes.set_yscale("log")
    ax_bytes.set_ylabel("bytes per sync")
    ax_bytes.legend(loc="upper right")
    ax_bytes.grid(alpha=0.3)

    ax_time.plot(sync_steps, [s.save_s for s in synced], marker=".", label="save")
    ax_time.plot(sync_steps, [s.hotload_s for s in synced], marker=".", label="hot-load")
    ax_time.plot(sync_steps, [s.warmup_s for s in synced], marker=".", label="warmup")
    ax_time.plot(sync_steps, [s.pause_s or 0.0 for s in synced], marker=".", label="serving pause")
    ax_time.set_ylabel("seconds")
    ax_time.set_xlabel("training step")
    ax_time.legend(loc="upper right")
    ax_time.grid(alpha=0.3)

    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
