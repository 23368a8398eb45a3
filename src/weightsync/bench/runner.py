"""One benchmark run, start to finish: updates, codecs, intervals, end to end, targets.

Phases (each bounded in memory: at most a few bf16 snapshots alive at once):

1. per learning rate: train `steps_per_lr` AdamW steps from the same initial
   weights, record each step's change statistics, and measure every method's
   codec on the last step's snapshot pair;
2. at the end-to-end learning rate (nearest to 1% changed unless given):
   train `max(e2e_syncs, intervals)` steps once, measure the interval-sync
   deltas (initial -> step N) and record the first `e2e_syncs` steps;
3. replay those steps through every method end to end (`end_to_end.py`);
4. judge the targets.
"""

from __future__ import annotations

import gc
import logging
import os
import platform
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import psutil
import torch

from weightsync.bench.codecs import measure_codec, measure_memcpy_gbps
from weightsync.bench.config import E2E_TARGET_CHANGED_FRACTION, BenchConfig
from weightsync.bench.methods import Method, bench_methods
from weightsync.bench.report import BenchReport, CodecRow, UpdateRow
from weightsync.bench.rl_updates import build_bench_model, rl_snapshots
from weightsync.bench.targets import evaluate_targets
from weightsync.bench.trajectory import Trajectory, step_changes
from weightsync.codec import DEFAULT_CODEC
from weightsync.codec.stats import change_stats

logger = logging.getLogger(__name__)

Progress = Callable[[str], None]
Snapshot = dict[str, torch.Tensor]


def run_bench(config: BenchConfig, *, progress: Progress | None = None) -> BenchReport:
    """Run every phase of the benchmark described by `config`; return the report."""
    started = time.perf_counter()

    def say(message: str) -> None:
        logger.info("bench: %s", message)
        if progress is not None:
            progress(message)

    methods = bench_methods(config.codecs)
    say("measuring memcpy bandwidth")
    report = BenchReport(
        config=config.to_json(),
        machine=machine_info(),
        model={"label": config.model_label},
        memcpy_gbps=measure_memcpy_gbps(),
    )
    own_work_dir = config.work_dir is None
    work_dir = Path(tempfile.mkdtemp(prefix="weightsync-bench-")) if own_work_dir else None
    work_dir = work_dir or Path(config.work_dir)  # type: ignore[arg-type]
    work_dir.mkdir(parents=True, exist_ok=True)
    try:
        for lr in config.lrs:
            _measure_lr(config, lr, methods, report, say)
        e2e_lr = config.e2e_lr or _nearest_to_target(report)
        trajectory = _record_trajectory(config, e2e_lr, methods, report, say)
        if config.end_to_end:
            _run_end_to_end(
                config,
                trajectory=trajectory,
                methods=methods,
                report=report,
                work_dir=work_dir,
                say=say,
            )
    finally:
        if own_work_dir:
            shutil.rmtree(work_dir, ignore_errors=True)
    report.targets = evaluate_targets(report, default_codec=DEFAULT_CODEC)
    report.wall_s = time.perf_counter() - started
    return report


def machine_info() -> dict[str, Any]:
    """What this run ran on (absolute numbers only compare within one machine)."""
    return {
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "memory_bytes": int(psutil.virtual_memory().total),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
    }


def build_trainer_model(config: BenchConfig) -> torch.nn.Module:
    """The fp32 master model of the run (fresh, seeded: every call gives the same weights)."""
    if config.model_dir is not None:
        from transformers import AutoModelForCausalLM

        model: torch.nn.Module = AutoModelForCausalLM.from_pretrained(
            config.model_dir, dtype=torch.float32
        )
        torch.manual_seed(config.seed)
        return model
    if config.size == "116m":
        return build_bench_model(seed=config.seed)  # type: ignore[no-any-return]
    from weightsync.toymodel import build_model

    return build_model(config.size, seed=config.seed)  # type: ignore[no-any-return]


def _snapshots(config: BenchConfig, lr: float, num_steps: int) -> Iterator[Snapshot]:
    model = build_trainer_model(config)
    try:
        yield from rl_snapshots(
            model,
            lr=lr,
            num_steps=num_steps,
            seed=config.seed,
            batch=config.batch,
            seq_len=config.seq_len,
        )
    finally:
        del model
        gc.collect()


def _update_row(lr: float, step: int, old: Snapshot, new: Snapshot) -> UpdateRow:
    stats = change_stats(old, new)
    return UpdateRow(
        lr=lr,
        step=step,
        num_elements=stats.num_elements,
        num_changed=stats.num_changed,
        changed_fraction=stats.changed_fraction,
        one_step_fraction=stats.one_step_fraction,
        bound_bytes=stats.bound_bits / 8,
    )


def _codec_row(
    method: Method, old: Snapshot, new: Snapshot, *, lr: float, span: int, update: UpdateRow
) -> CodecRow:
    measured = measure_codec(method.codec, old, new)
    return CodecRow(
        method=method.name,
        codec=method.codec,
        lr=lr,
        span_steps=span,
        changed_fraction=update.changed_fraction,
        payload_bytes=measured.payload_bytes,
        full_bytes=measured.full_bytes,
        bound_bytes=update.bound_bytes,
        encode_gbps=measured.encode_gbps,
        decode_gbps=measured.decode_gbps,
        lossless=measured.lossless,
    )


def _measure_lr(
    config: BenchConfig, lr: float, methods: list[Method], report: BenchReport, say: Progress
) -> None:
    previous: Snapshot | None = None
    for step, snapshot in enumerate(_snapshots(config, lr, config.steps_per_lr)):
        say(f"lr {lr:g}: optimizer step {step}/{config.steps_per_lr}")
        if previous is None:
            _describe_model(report, snapshot)
        else:
            update = _update_row(lr, step, previous, snapshot)
            report.updates.append(update)
            if step == config.steps_per_lr:
                for method in methods:
                    say(f"lr {lr:g}: codec {method.codec}")
                    report.codecs.append(
                        _codec_row(method, previous, snapshot, lr=lr, span=1, update=update)
                    )
        previous = snapshot


def _describe_model(report: BenchReport, snapshot: Snapshot) -> None:
    report.model.update(
        num_tensors=len(snapshot),
        num_elements=sum(t.numel() for t in snapshot.values()),
        full_bytes=sum(t.numel() * t.element_size() for t in snapshot.values()),
    )


def _nearest_to_target(report: BenchReport) -> float:
    by_lr: dict[float, list[float]] = {}
    for u in report.updates:
        by_lr.setdefault(u.lr, []).append(u.changed_fraction)
    return min(
        by_lr,
        key=lambda lr: abs(sum(by_lr[lr]) / len(by_lr[lr]) - E2E_TARGET_CHANGED_FRACTION),
    )


def _record_trajectory(
    config: BenchConfig, lr: float, methods: list[Method], report: BenchReport, say: Progress
) -> Trajectory:
    """Train at `lr` once: interval-sync deltas, and the steps the e2e section replays."""
    num_steps = max(config.e2e_syncs, *config.intervals)
    delta_methods = [m for m in methods if not m.is_full_reload]
    trajectory: Trajectory | None = None
    previous: Snapshot | None = None
    for step, snapshot in enumerate(_snapshots(config, lr, num_steps)):
        say(f"trajectory lr {lr:g}: optimizer step {step}/{num_steps}")
        if trajectory is None:
            trajectory = Trajectory(lr=lr, initial=snapshot)
        elif previous is not None and step <= config.e2e_syncs:
            trajectory.steps.append(step_changes(previous, snapshot))
        if step in config.intervals and trajectory is not None:
            update = _update_row(lr, step, trajectory.initial, snapshot)
            for method in delta_methods:
                say(f"interval {step} steps: codec {method.codec}")
                report.intervals.append(
                    _codec_row(
                        method, trajectory.initial, snapshot, lr=lr, span=step, update=update
                    )
                )
        # Only the last snapshot is needed for the next step's changes.
        previous = snapshot if step < config.e2e_syncs else None
    if trajectory is None:
        raise RuntimeError("rl_snapshots yielded nothing")  # unreachable: it yields >= 1 item
    return trajectory


def _run_end_to_end(
    config: BenchConfig,
    *,
    trajectory: Trajectory,
    methods: list[Method],
    report: BenchReport,
    work_dir: Path,
    say: Progress,
) -> None:
    from weightsync.bench.end_to_end import run_method, write_seed_model
    from weightsync.toymodel import build_tokenizer

    tokenizer_dir = build_tokenizer(work_dir / "tokenizer")
    if config.model_dir is not None and (Path(config.model_dir) / "tokenizer.json").is_file():
        tokenizer_dir = Path(config.model_dir)
    model = build_trainer_model(config)
    seed_dir = write_seed_model(model, trajectory, work_dir / "seed-model", tokenizer_dir)
    if config.e2e_codecs is not None:
        wanted = {m.name for m in bench_methods(config.e2e_codecs)}
        methods = [m for m in methods if m.name in wanted]
    try:
        for method in methods:
            report.end_to_end.append(
                run_method(
                    method,
                    trajectory=trajectory,
                    model=model,
                    seed_model_dir=seed_dir,
                    tokenizer_dir=tokenizer_dir,
                    work_dir=work_dir,
                    num_syncs=config.e2e_syncs,
                    engine=config.engine,
                    hotload_timeout_s=config.hotload_timeout_s,
                    progress=say,
                )
            )
    finally:
        del model
        gc.collect()
