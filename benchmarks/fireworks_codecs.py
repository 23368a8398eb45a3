"""Fireworks' codecs next to wsdelta1, decoded by weightsync and by fireworks-delta-compression.

    .venv/bin/python benchmarks/fireworks_codecs.py                  # toymodel "medium"
    .venv/bin/python benchmarks/fireworks_codecs.py --size 0.6b --lr 1e-6 --json out.json

Trains `--steps` GRPO-style AdamW steps (`weightsync.bench.rl_updates`) and measures
the last step's bf16 snapshot pair with `weightsync.bench.codecs.measure_codec`:
payload bytes, × smaller than bf16, ÷ the information bound n·H(p)+m·H(Δ), and
GB/s (of the bf16 bytes) for encoding (weightsync's encoder, or for arc_v3, which
weightsync only reads, fireworks-delta-compression's) and for decoding by
weightsync and by fireworks-delta-compression. Prints a Markdown table
(docs/codecs.md, "Fireworks codecs").
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from weightsync.bench.codecs import measure_codec, measure_memcpy_gbps
from weightsync.bench.rl_updates import rl_snapshots
from weightsync.codec.stats import change_stats
from weightsync.toymodel import MODEL_SIZES, build_model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", default="medium", choices=MODEL_SIZES)
    parser.add_argument("--lr", type=float, default=1e-6)
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--codecs", default="arc_v1,arc_v2,arc_v3,wsdelta1")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    snapshots = list(rl_snapshots(build_model(args.size), lr=args.lr, num_steps=args.steps))
    old, new = snapshots[-2], snapshots[-1]
    stats = change_stats(old, new)
    memcpy = measure_memcpy_gbps()
    rows = []
    for codec in (c.strip() for c in args.codecs.split(",") if c.strip()):
        m = measure_codec(codec, old, new, threads=args.threads, repeats=args.repeats)
        rows.append({**m.to_json(), "over_bound": m.payload_bytes / max(stats.bound_bytes, 1)})
    print(
        f"toymodel {args.size}: {stats.num_elements:,} bf16 elements, lr {args.lr:g}, step "
        f"{args.steps}: {stats.changed_fraction:.2%} changed; bound "
        f"{stats.bound_bytes / 1e3:,.1f} kB; memcpy {memcpy:.2f} GB/s; "
        f"{time.perf_counter() - started:.0f} s\n"
    )
    print(
        "| codec | payload | × smaller | ÷ bound | encode GB/s (by) | decode GB/s weightsync "
        "| decode GB/s fireworks-delta-compression | lossless |"
    )
    print("|---|---:|---:|---:|---|---:|---:|---|")
    for r in rows:
        ref = r["reference_decode_gbps"]
        print(
            f"| {r['codec']} | {r['payload_bytes'] / 1e3:,.1f} kB | {r['x_smaller']:.1f} | "
            f"{r['over_bound']:.3f} | {r['encode_gbps']:.2f} ({r['encoder']}) | "
            f"{r['decode_gbps']:.2f} | {'-' if ref is None else f'{ref:.2f}'} | "
            f"{'yes' if r['lossless'] else 'NO'} |"
        )
    if args.json is not None:
        doc = {"stats": stats.to_json(), "memcpy_gbps": memcpy, "rows": rows}
        args.json.write_text(json.dumps(doc, indent=2) + "\n")


if __name__ == "__main__":
    main()
