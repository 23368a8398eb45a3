"""Sharded saves: save time, peak RSS and bytes written per rank, 1 rank against 2 ranks.

    python benchmarks/sharded_save_bench.py [--size medium] [--deltas 3] [--codec arc_v2]

Runs the same toy model (`weightsync.toymodel`, fp32 master weights, bf16 export)
as one process (the single-process `TrainingClient`) and as 2 ranks under torchrun
(gloo on CPU, FSDP2 `fully_shard`: every rank saves its own shard). Each run saves a
base and `--deltas` deltas, each after changing ~10% of every local shard's
elements. Prints a Markdown table: per rank, the mean base and delta save time,
the bytes it wrote, its peak RSS, and its RSS before the first save (the model
itself, after sharding) and its peak RSS during the saves (VmHWM reset before the
first save), so the saves' own memory is the difference.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from weightsync.storage import LocalStorage


class CountingStorage(LocalStorage):
    """Local storage that counts the bytes this process wrote."""

    written_bytes = 0

    def write_bytes(self, path: str, data: bytes) -> None:
        super().write_bytes(path, data)
        CountingStorage.written_bytes += len(data)


def status_mib(field: str) -> float:
    """A memory field of /proc/self/status (VmRSS: now; VmHWM: peak since the last reset)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"/proc/self/status has no {field}")


def reset_peak_rss() -> None:
    """Make VmHWM restart from the current RSS (Linux: `5` into clear_refs)."""
    Path("/proc/self/clear_refs").write_text("5")


def worker(args: argparse.Namespace) -> None:
    import torch.distributed as dist
    from torch.distributed.tensor import DTensor

    from weightsync.toymodel import build_model
    from weightsync.trainer import TrainingClient

    torch.set_num_threads(1)
    sharded = "RANK" in os.environ
    rank = 0
    model = build_model(args.size, seed=0, dtype=torch.float32)
    if sharded:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        dist.init_process_group("gloo")
        rank = dist.get_rank()
        mesh = init_device_mesh("cpu", (dist.get_world_size(),))
        for layer in model.model.layers:
            fully_shard(layer, mesh=mesh)
        fully_shard(model, mesh=mesh)
    client = TrainingClient(
        model, storage=CountingStorage(Path(args.storage)), compression_format=args.codec
    )
    reset_peak_rss()  # the peak below is the saves', not the model build's
    rss_before = status_mib("VmRSS")
    g = torch.Generator().manual_seed(rank)
    times: dict[str, list[float]] = {"base": [], "delta": []}
    for k in range(args.deltas + 1):
        if k:
            with torch.no_grad():
                for p in model.parameters():
                    local = p.to_local() if isinstance(p, DTensor) else p.data
                    mask = torch.rand(local.shape, generator=g) < 0.1
                    local.add_(mask * 1e-2 * torch.randn(local.shape, generator=g))
        if sharded:
            dist.barrier()  # time the save, not the other rank's update
        started = time.perf_counter()
        saved = client.save_weights_for_sampler_ext(f"s{k}")
        times[saved.kind].append(time.perf_counter() - started)
    row = {
        "rank": rank,
        "base_s": statistics.mean(times["base"]),
        "delta_s": statistics.mean(times["delta"]),
        "written_bytes": CountingStorage.written_bytes,
        "rss_before_mib": rss_before,
        "peak_rss_mib": status_mib("VmHWM"),
    }
    Path(args.out, f"rank{rank}.json").write_text(json.dumps(row))
    if sharded:
        dist.destroy_process_group()


def launch(args: argparse.Namespace, ranks: int, work: Path) -> list[dict[str, Any]]:
    out = work / f"out{ranks}"
    out.mkdir()
    common = ["--worker", "--size", args.size, "--deltas", str(args.deltas), "--codec", args.codec]
    common += ["--storage", str(work / f"store{ranks}"), "--out", str(out)]
    if ranks == 1:
        cmd = [sys.executable, __file__, *common]
    else:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        cmd = [str(Path(sys.executable).parent / "torchrun"), "--nproc-per-node", str(ranks)]
        cmd += ["--master-addr", "127.0.0.1", "--master-port", str(port), __file__, *common]
    subprocess.run(cmd, check=True, capture_output=True)
    return [json.loads((out / f"rank{r}.json").read_text()) for r in range(ranks)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", default="medium")
    ap.add_argument("--deltas", type=int, default=3)
    ap.add_argument("--codec", default="arc_v2")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--storage", help=argparse.SUPPRESS)
    ap.add_argument("--out", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        worker(args)
        return
    print(f"model {args.size}, codec {args.codec}, base + {args.deltas} deltas, gloo on CPU\n")
    print(
        "| ranks | rank | base save s | delta save s (mean) | bytes written | "
        "RSS before saves MiB | peak RSS MiB |"
    )
    print("| --- | --- | --- | --- | --- | --- | --- |")
    with tempfile.TemporaryDirectory() as tmp:
        for ranks in (1, 2):
            for row in launch(args, ranks, Path(tmp)):
                print(
                    f"| {ranks} | {row['rank']} | {row['base_s']:.3f} | {row['delta_s']:.3f} | "
                    f"{row['written_bytes']:,} | {row['rss_before_mib']:.0f} | "
                    f"{row['peak_rss_mib']:.0f} |"
                )


if __name__ == "__main__":
    main()
