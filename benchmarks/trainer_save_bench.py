"""How long `TrainingClient` takes to save base and delta snapshots, against `torch.save`.

A Qwen3-0.6B-shaped model (random init, fp32 master weights, tied embeddings) takes
a few AdamW steps at lr 1e-6, as an RL trainer's policy would; the client then
saves a base and, after each further step, a delta with the default codec. The
baseline is `torch.save` of the same bf16 state dict to the same disk, in the
same run. Needs ~10 GB of RAM for the 0.6b size; on a shared machine run it as

    flock /tmp/weightsync-bigrun.lock .venv/bin/python benchmarks/trainer_save_bench.py

`--size tiny` runs the same path in seconds (a smoke test).
"""

from __future__ import annotations

import argparse
import cProfile
import logging
import os
import pstats
import resource
import shutil
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from weightsync.codec import list_codecs
from weightsync.sdk_defaults import DEFAULT_COMPRESSION_FORMAT
from weightsync.toymodel import MODEL_SIZES, build_model
from weightsync.trainer import SaveSamplerResult, TrainingClient


def _adamw_step(model: Any, optimizer: torch.optim.Optimizer, *, seed: int, seq_len: int) -> None:
    generator = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(0, model.config.vocab_size, (1, seq_len), generator=generator)
    loss = model(input_ids=input_ids, labels=input_ids).loss
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def _timed(fn: Any) -> tuple[Any, float]:
    started = time.perf_counter()
    value = fn()
    return value, time.perf_counter() - started


def _torch_save(tensors: dict[str, torch.Tensor], path: Path, *, fsync: bool) -> tuple[float, int]:
    """Best of two `torch.save` runs (seconds) and the file size.

    With `fsync` the file is also flushed to disk, as every snapshot file is.
    """
    best = float("inf")
    for _ in range(2):
        started = time.perf_counter()
        with path.open("wb") as f:
            torch.save(tensors, f)
            if fsync:
                f.flush()
                os.fsync(f.fileno())
        best = min(best, time.perf_counter() - started)
        size = path.stat().st_size
        path.unlink()
    return best, size


def _dir_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", default="0.6b", choices=MODEL_SIZES)
    parser.add_argument("--warmup-steps", type=int, default=2, help="AdamW steps before the base")
    parser.add_argument("--deltas", type=int, default=3, help="deltas saved, one per step")
    parser.add_argument("--lr", type=float, default=1e-6)
    parser.add_argument(
        "--codec",
        default=DEFAULT_COMPRESSION_FORMAT,
        choices=list_codecs(),
        help="the client's compression_format (default: the SDK's)",
    )
    parser.add_argument("--seq-len", type=int, default=16)
    parser.add_argument(
        "--dir", type=Path, default=None, help="where to write (default: a temp dir)"
    )
    parser.add_argument(
        "--threads", type=int, default=0, help="torch intra-op threads (0: torch's default)"
    )
    parser.add_argument(
        "--profile", action="store_true", help="profile the base and the last delta save"
    )
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    if args.threads:
        torch.set_num_threads(args.threads)

    root = args.dir or Path(tempfile.mkdtemp(prefix="weightsync-trainer-bench-"))
    try:
        model = build_model(args.size, seed=0)
        model.train()
        num_params = sum(p.numel() for p in model.parameters())
        # foreach=False: no temporary copies of every parameter (RAM is the limit here).
        optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, foreach=False)
        for step in range(args.warmup_steps):
            _adamw_step(model, optimizer, seed=step, seq_len=args.seq_len)

        client = TrainingClient(
            model,
            storage=root / "snapshots",
            optimizer=optimizer,
            compression_format=args.codec,
        )
        exported, export_s = _timed(client.exported_weights)
        torch_save_s, torch_save_bytes = _torch_save(exported, root / "sd.pt", fsync=False)
        torch_save_fsync_s, _ = _torch_save(exported, root / "sd.pt", fsync=True)
        del exported

        base_profiler = cProfile.Profile()
        if args.profile:
            base_profiler.enable()
        base: SaveSamplerResult = client.save_weights_for_sampler_ext("base")
        base_profiler.disable()
        deltas: list[SaveSamplerResult] = []
        profiler = cProfile.Profile()
        for i in range(args.deltas):
            _adamw_step(model, optimizer, seed=100 + i, seq_len=args.seq_len)
            last = args.profile and i == args.deltas - 1
            if last:
                profiler.enable()
            deltas.append(client.save_weights_for_sampler_ext(f"delta-{i}"))
            if last:
                profiler.disable()

        # The first delta also pays one-time codec set-up (e.g. JIT compilation).
        delta_s = statistics.median(d.seconds for d in (deltas[1:] or deltas))
        rows = [
            ("torch.save (bf16 state dict)", torch_save_s, torch_save_bytes, "-"),
            ("torch.save + fsync", torch_save_fsync_s, torch_save_bytes, "-"),
            ("export only (fp32 -> bf16 copy)", export_s, 0, "-"),
            ("TrainingClient base", base.seconds, base.payload_bytes, f"{base.num_changed:,}"),
            *(
                (f"TrainingClient delta {i}", d.seconds, d.payload_bytes, f"{d.num_changed:,}")
                for i, d in enumerate(deltas)
            ),
        ]
        print(
            f"\nmodel {args.size}: {num_params / 1e6:.0f}M parameters, "
            f"{base.full_bytes / 2**20:.0f} MiB in bf16; AdamW lr {args.lr:g}; "
            f"codec {client.compression_format!r}; {torch.get_num_threads()} torch threads; "
            f"writing to {root}"
        )
        print(
            f"{'what':<34} {'seconds':>8} {'x torch.save':>13} {'MiB written':>12} {'changed':>14}"
        )
        for label, seconds, written, changed in rows:
            ratio = seconds / torch_save_s if torch_save_s else float("nan")
            print(
                f"{label:<34} {seconds:>8.3f} {ratio:>13.2f} {written / 2**20:>12.1f} {changed:>14}"
            )
        print(
            f"median delta (after the first): {delta_s:.3f}s = "
            f"{delta_s / torch_save_s:.2f}x torch.save; "
            f"snapshots on disk: {_dir_bytes(root / 'snapshots') / 2**20:.0f} MiB; "
            f"peak RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.1f} GiB"
        )
        if args.profile:
            print("\nbase save, top functions by own time:")
            pstats.Stats(base_profiler).sort_stats("tottime").print_stats(12)
            print("\nlast delta save, top functions by own time:")
            pstats.Stats(profiler).sort_stats("tottime").print_stats(12)
    finally:
        if args.dir is None:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
