"""One benchmark run, start to finish: updates, codecs, intervals, end to end, targets.

Phases (each bounded in memory: at most a few bf16 snapshots alive at once):

1. at the end-to-end learning rate (the smallest unless given: the sparsest
   updates, nearest to the ~1% changed the end-to-end target names): train
   `max(steps_per_lr, e2e_syncs, intervals)` AdamW steps once — change
   statistics and codecs on the first steps, interval-sync deltas (initial ->
   step N), and a record of the first `e2e_syncs` steps;
2. every other learning rate: `steps_per_lr` steps from the same initial
   weights, change statistics per step, every method's codec on the last pair;
3. replay the recorded steps through every method end to end (`end_to_end.py`);
4. judge the targets.

Optimizer steps dominate the run's time at the 0.6B shape (tens of seconds
each on 2 cores), so no step is taken twice.
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
from weightsync.bench.config import BenchConfig
from weightsync.bench.methods import Method, bench_methods
from weightsync.bench.report import BenchReport, CodecRow, UpdateRow
from weightsync.bench.rl_updates import build_bench_model, rl_snapshots
from weightsync.bench.targets import evaluate_targets
from weightsync.bench.trajectory import Trajectory, step_changes
from weightsync.codec import DEFAULT_CODEC, get_codec
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
    e2e_lr = config.e2e_lr if config.e2e_lr is not None else min(config.lrs)
    try:
        trajectory = _train(
            config, e2e_lr, methods=methods, report=report, say=say, trajectory=True
        )
        for lr in config.lrs:
            if lr != e2e_lr:
                _train(config, lr, methods=methods, report=report, say=say, trajectory=False)
        report.updates.sort(key=lambda u: (u.lr, u.step))
        report.codecs.sort(key=lambda c: c.lr)  # stable: methods keep their order per lr
        if config.end_to_end and trajectory is not None:
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
    unchanged = None
    if method.codec == DEFAULT_CODEC:
        codec = get_codec(method.codec)
        unchanged = sum(len(codec.encode(t, t)) for t in old.values())
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
        unchanged_bytes=unchanged,
    )


def _describe_model(report: BenchReport, snapshot: Snapshot) -> None:
    report.model.update(
        num_tensors=len(snapshot),
        num_elements=sum(t.numel() for t in snapshot.values()),
        full_bytes=sum(t.numel() * t.element_size() for t in snapshot.values()),
    )


def _train(
    config: BenchConfig,
    lr: float,
    *,
    methods: list[Method],
    report: BenchReport,
    say: Progress,
    trajectory: bool,
) -> Trajectory | None:
    """Train at `lr` from the initial weights and measure as the steps come.

    Steps 1..`steps_per_lr` each give an update row; the last of them gives a
    codec row per method. With `trajectory`, training continues to
    `config.trajectory_steps`: every delta method is measured on the interval
    deltas (initial -> step N), and the first `e2e_syncs` steps are recorded
    for the end-to-end replay. At most three snapshots are alive at once.
    """
    num_steps = config.trajectory_steps if trajectory else config.steps_per_lr
    keep_previous_until = max(config.steps_per_lr, config.e2e_syncs if trajectory else 0)
    methods = [m for m in methods if m.measures_codec]
    delta_methods = [m for m in methods if not m.is_full_reload]
    recorded: Trajectory | None = None
    initial: Snapshot | None = None
    previous: Snapshot | None = None
    for step, snapshot in enumerate(_snapshots(config, lr, num_steps)):
        say(f"lr {lr:g}: optimizer step {step}/{num_steps}")
        if initial is None:
            initial = snapshot
            _describe_model(report, snapshot)
            if trajectory:
                recorded = Trajectory(lr=lr, initial=snapshot)
        if previous is not None and step <= config.steps_per_lr:
            update = _update_row(lr, step, previous, snapshot)
            report.updates.append(update)
            if step == config.steps_per_lr:
                for method in methods:
                    say(f"lr {lr:g}: codec {method.codec}")
                    report.codecs.append(
                        _codec_row(method, previous, snapshot, lr=lr, span=1, update=update)
                    )
        if recorded is not None and previous is not None and step <= config.e2e_syncs:
            recorded.steps.append(step_changes(previous, snapshot))
        if recorded is not None and step in config.intervals:
            span_update = _update_row(lr, step, initial, snapshot)
            for method in delta_methods:
                say(f"interval of {step} steps: codec {method.codec}")
                report.intervals.append(
                    _codec_row(method, initial, snapshot, lr=lr, span=step, update=span_update)
                )
        # The previous snapshot is only needed while per-step changes are measured.
        previous = snapshot if step < keep_previous_until else None
    return recorded


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
    # Extra serve arguments (the buffered swap) are the torch engine's.
    methods = [
        m for m in methods if m.syncs_end_to_end and (config.engine == "torch" or not m.serve_args)
    ]
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
        if config.engine == "vllm":
            # The column's baseline: vLLM's own reload of a full directory, same steps.
            from weightsync.bench.vllm_reload import run_vllm_reload

            report.end_to_end.append(
                run_vllm_reload(
                    trajectory=trajectory,
                    model=model,
                    seed_model_dir=seed_dir,
                    work_dir=work_dir,
                    num_syncs=config.e2e_syncs,
                    hotload_timeout_s=config.hotload_timeout_s,
                    progress=say,
                )
            )
    finally:
        del model
        shutil.rmtree(seed_dir, ignore_errors=True)
        gc.collect()
