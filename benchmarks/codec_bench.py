"""Codec benchmark: every codec on RL-like AdamW updates, and a synthetic density sweep.

    .venv/bin/python benchmarks/codec_bench.py                       # ~116M-element model
    .venv/bin/python benchmarks/codec_bench.py --size small --json out.json

For each learning rate, trains `--steps` GRPO-style AdamW steps from the same
initial weights (`weightsync.bench.rl_updates`) and measures each codec on the
last step's bf16 snapshot pair: payload bytes, x smaller than full bf16, ratio
to the entropy bound n·H(p)+m·H(Δ), encode/decode GB/s (of the bf16 bytes, on
`--threads` threads) next to this machine's memcpy GB/s measured in the same run.
The sweep then checks size against the bound at densities 0.1%..50%.
"""

from __future__ import annotations

import argparse
import gc
import json
import time
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from rich.table import Table

from weightsync.bench.codecs import (
    SWEEP_DENSITIES,
    density_sweep,
    measure_codec,
    measure_memcpy_gbps,
)
from weightsync.bench.rl_updates import build_bench_model, rl_snapshots
from weightsync.codec import list_codecs
from weightsync.codec.stats import change_stats
from weightsync.toymodel import MODEL_SIZES, build_model


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", default="116m", choices=["116m", *MODEL_SIZES])
    parser.add_argument("--lrs", default="1e-6,3e-6,1e-5", help="comma-separated AdamW lrs")
    parser.add_argument("--steps", type=int, default=2, help="optimizer steps per lr")
    parser.add_argument("--codecs", default=",".join(list_codecs()))
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3, help="timings are best of this many")
    parser.add_argument("--sweep-elements", type=int, default=1 << 23)
    parser.add_argument("--no-sweep", action="store_true")
    parser.add_argument("--json", type=Path, default=None, help="write the results here")
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)
    codecs = [c.strip() for c in args.codecs.split(",") if c.strip()]
    lrs = [float(x) for x in args.lrs.split(",")]
    console = Console(stderr=True)
    started = time.perf_counter()
    memcpy = measure_memcpy_gbps()
    console.log(f"memcpy {memcpy:.2f} GB/s")
    results: dict[str, Any] = {"memcpy_gbps": memcpy, "size": args.size, "rl": [], "sweep": []}
    for lr in lrs:
        model = build_bench_model() if args.size == "116m" else build_model(args.size)
        previous = None
        for step, snapshot in enumerate(rl_snapshots(model, lr=lr, num_steps=args.steps)):
            console.log(f"lr {lr:g}: step {step}/{args.steps}")
            if step == args.steps and previous is not None:
                stats = change_stats(previous, snapshot)
                for codec in codecs:
                    m = measure_codec(
                        codec, previous, snapshot, threads=args.threads, repeats=args.repeats
                    )
                    row = {
                        "lr": lr,
                        **stats.to_json(),
                        **m.to_json(),
                        "over_bound": m.payload_bytes / max(stats.bound_bytes, 1),
                        "memcpy_gbps": memcpy,
                    }
                    results["rl"].append(row)
                    console.log(
                        f"  {codec}: {m.payload_bytes} B, x{m.x_smaller:.1f}, "
                        f"enc {m.encode_gbps:.2f} dec {m.decode_gbps:.2f} GB/s, "
                        f"lossless={m.lossless}"
                    )
            previous = snapshot
        del model, previous, snapshot
        gc.collect()
    # Memcpy again at the end: on a shared machine bandwidth drifts during the run.
    results["memcpy_gbps_end"] = measure_memcpy_gbps()
    if not args.no_sweep:
        console.log("synthetic density sweep")
        results["sweep"] = [
            r.to_json()
            for r in density_sweep(
                codecs, num_elements=args.sweep_elements, densities=SWEEP_DENSITIES
            )
        ]
    results["seconds"] = time.perf_counter() - started
    out = Console(width=170)
    out.print(rl_table(results))
    if results["sweep"]:
        out.print(sweep_table(results))
    if args.json is not None:
        args.json.write_text(json.dumps(results, indent=2) + "\n")


def rl_table(results: dict[str, Any]) -> Table:
    table = Table(
        title=(
            f"codecs on RL-like AdamW steps ({results['size']}); memcpy "
            f"{results['memcpy_gbps']:.2f} GB/s (end {results['memcpy_gbps_end']:.2f})"
        )
    )
    for column in (
        "lr",
        "changed",
        "±1",
        "codec",
        "bytes",
        "x smaller",
        "÷ bound",
        "enc GB/s",
        "dec GB/s",
        "enc/memcpy",
        "dec/memcpy",
        "lossless",
    ):
        table.add_column(column, justify="right")
    for r in results["rl"]:
        table.add_row(
            f"{r['lr']:g}",
            f"{r['changed_fraction']:.2%}",
            f"{r['one_step_fraction']:.1%}",
            r["codec"],
            f"{r['payload_bytes']:,}",
            f"{r['x_smaller']:.1f}",
            f"{r['over_bound']:.3f}",
            f"{r['encode_gbps']:.2f}",
            f"{r['decode_gbps']:.2f}",
            f"{r['encode_gbps'] / r['memcpy_gbps']:.2f}",
            f"{r['decode_gbps'] / r['memcpy_gbps']:.2f}",
            "yes" if r["lossless"] else "NO",
        )
    return table


def sweep_table(results: dict[str, Any]) -> Table:
    table = Table(title="synthetic density sweep: payload ÷ bound (x smaller than full bf16)")
    codecs = sorted({r["codec"] for r in results["sweep"]})
    table.add_column("changed", justify="right")
    for codec in codecs:
        table.add_column(codec, justify="right")
    by_density: dict[float, dict[str, dict[str, Any]]] = {}
    for r in results["sweep"]:
        by_density.setdefault(r["target_fraction"], {})[r["codec"]] = r
    for rows in by_density.values():
        first = next(iter(rows.values()))
        table.add_row(
            f"{first['changed_fraction']:.2%}",
            *(f"{rows[c]['over_bound']:.3f} (x{rows[c]['x_smaller']:.0f})" for c in codecs),
        )
    return table


if __name__ == "__main__":
    main()
