"""End to end: each method's `save_and_hotload` into a real local deployment.

Per method: a fresh local deployment (`weightsync serve`, one replica, the
embedded engine, storage a local directory) started on the recorded run's
initial weights, a `TrainingClient` with the method's codec and a
`WeightSyncer`. The first sync (a base: the deployment holds a snapshot this
session did not write) is timed but reported apart; then every recorded step
is replayed into the trainer's model and synced — a delta, or a base for the
full-reload method — and `WeightSyncer.last_timing` read. Peak memory of the
trainer (this process) and the replica (the server's process tree) is sampled
over the method's syncs. At the end the last snapshot is materialized from
storage and compared bit for bit with what the trainer held.
"""

from __future__ import annotations

import gc
import logging
import os
import shutil
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch

from weightsync.bench.memory import PeakRssSampler
from weightsync.bench.methods import Method
from weightsync.bench.report import EndToEndRow, SyncRow
from weightsync.bench.trajectory import Trajectory
from weightsync.codec.bits import same_bits
from weightsync.errors import DeploymentError, SnapshotCorruptError
from weightsync.syncer.timing import SyncTiming

logger = logging.getLogger(__name__)

Progress = Callable[[str], None]
#: torch.save runs of each method's weights after its syncs (the save targets' baseline).
BASELINE_REPEATS = 3


def timing_row(name: str, checkpoint_type: str, timing: SyncTiming | None) -> SyncRow:
    """A report row from `WeightSyncer.last_timing`."""
    if timing is None:
        raise DeploymentError(f"WeightSyncer reported no timing for {name}; was it synced?")
    return SyncRow(
        name=name,
        checkpoint_type=checkpoint_type,
        save_s=float(timing.save_time_s),
        hotload_s=float(timing.hotload_time_s),
        warmup_s=float(timing.warmup_time_s),
        total_s=float(timing.total_time_s),
        pause_s=float(timing.pause_s or 0.0),
        payload_bytes=int(timing.payload_bytes),
    )


def bits_equal(expected: dict[str, torch.Tensor], actual: dict[str, torch.Tensor]) -> bool:
    """True when both hold the same names with identical bits (not just equal values)."""
    if expected.keys() != actual.keys():
        return False
    return all(same_bits(tensor, actual[name]) for name, tensor in expected.items())


def write_seed_model(
    model: torch.nn.Module, trajectory: Trajectory, out_dir: Path, tokenizer_dir: Path
) -> Path:
    """Write the trajectory's initial bf16 weights as a Hugging Face directory.

    The deployment starts from it. `model` supplies the config and the layout;
    its own parameters are not changed.
    """
    shutil.rmtree(out_dir, ignore_errors=True)
    # save_pretrained drops tied names from the dict it is given: hand it a copy.
    model.save_pretrained(out_dir, state_dict=dict(trajectory.initial))  # type: ignore[operator]
    for f in tokenizer_dir.iterdir():
        if f.is_file() and f.name.startswith(("tokenizer", "special_tokens")):
            shutil.copyfile(f, out_dir / f.name)
    return out_dir


def run_method(
    method: Method,
    *,
    trajectory: Trajectory,
    model: torch.nn.Module,
    seed_model_dir: Path,
    tokenizer_dir: Path,
    work_dir: Path,
    num_syncs: int,
    engine: str = "torch",
    hotload_timeout_s: int = 900,
    progress: Progress | None = None,
) -> EndToEndRow:
    """Sync `num_syncs` recorded steps with `method`; return its measured row.

    `model` is the trainer's model (fp32); it is reset to the trajectory's
    initial weights first. `seed_model_dir` is a Hugging Face directory of those
    initial weights that the deployment starts from.
    """
    from weightsync.deployment import DeploymentConfig, DeploymentManager
    from weightsync.syncer import WeightSyncer
    from weightsync.trainer import TrainingClient

    say = progress or (lambda _msg: None)
    root = work_dir / method.name
    shutil.rmtree(root, ignore_errors=True)
    storage = root / "storage"
    storage.mkdir(parents=True)
    trajectory.load_initial(model)
    deployment_id = f"bench-{method.name}"
    manager = DeploymentManager(registry_dir=root / "registry")
    config = DeploymentConfig(
        deployment_id=deployment_id,
        storage=str(storage),
        model_dir=str(seed_model_dir),
        engine=engine,  # type: ignore[arg-type]
        state_dir=str(root / "state"),
        extra_args=method.serve_args,
    )
    say(f"{method.name}: starting a local deployment")
    deployment = manager.create_or_get(config)
    try:
        client = TrainingClient(
            model,
            storage=str(storage),
            tokenizer_dir=tokenizer_dir,
            compression_format=method.codec,
        )
        syncer = WeightSyncer(
            policy_client=client,
            deploy_mgr=manager,
            deployment_id=deployment_id,
            compression_format=method.codec,
            hotload_timeout=hotload_timeout_s,
        )
        say(f"{method.name}: first sync (base)")
        first_name = syncer.save_and_hotload("step-00000")
        first = timing_row("step-00000", "base", syncer.last_timing)
        timings: list[SyncRow] = []
        last_name = first_name
        with PeakRssSampler(server_pid=deployment.pid) as rss:
            for step in range(1, num_syncs + 1):
                trajectory.apply_step(model, step)
                name = f"step-{step:05d}"
                say(f"{method.name}: sync {step}/{num_syncs}")
                last_name = syncer.save_and_hotload(name, checkpoint_type=method.checkpoint_type)
                timings.append(timing_row(name, method.checkpoint_type, syncer.last_timing))
        say(f"{method.name}: torch.save of the same bf16 weights (the save targets' baseline)")
        baseline = [
            torch_save_s(client.exported_weights(), root / "torch-save.pt")
            for _ in range(min(num_syncs, BASELINE_REPEATS))
        ]
        if last_name is None:
            raise SnapshotCorruptError(f"{method.name}: save_and_hotload returned no snapshot")
        say(f"{method.name}: verifying {last_name} bit for bit")
        lossless = bits_equal(client.exported_weights(), client.store.materialize(last_name))
        served = syncer.check_deployment_state()
        if served != last_name:
            logger.warning(
                "%s: the deployment serves %s, expected %s", method.name, served, last_name
            )
            lossless = False
    finally:
        manager.delete(deployment_id)
        manager.close()
        shutil.rmtree(root, ignore_errors=True)
        gc.collect()
    return EndToEndRow(
        method=method.name,
        codec=method.codec,
        checkpoint_type=method.checkpoint_type,
        lr=trajectory.lr,
        changed_fraction=sum(trajectory.changed_fraction(s) for s in range(1, num_syncs + 1))
        / num_syncs,
        syncs=timings,
        first_sync=first,
        trainer_peak_rss_bytes=rss.trainer_peak_bytes,
        trainer_added_rss_bytes=rss.trainer_added_bytes,
        replica_peak_rss_bytes=rss.replica_peak_bytes,
        lossless=lossless,
        torch_save_s=statistics.median(b[0] for b in baseline) if baseline else 0.0,
        torch_fsync_s=statistics.median(b[1] for b in baseline) if baseline else 0.0,
    )


def torch_save_s(weights: dict[str, torch.Tensor], path: Path) -> tuple[float, float]:
    """Seconds `torch.save` takes to write `weights` to `path`, then to fsync the file
    (it is removed after)."""
    try:
        started = time.perf_counter()
        with path.open("wb") as f:
            torch.save(weights, f)
            f.flush()
            saved = time.perf_counter()
            os.fsync(f.fileno())
        return saved - started, time.perf_counter() - saved
    finally:
        path.unlink(missing_ok=True)
