"""The export step of a delta save: a full copy of every weight against only the changes.

`TrainingClient` builds the host image a delta is encoded from. The full-copy way
casts every live parameter into a host buffer (`ExportBuffers.fill`); the change
way (`ChangeExporter.export_delta`: the client's path off the CPU, and on it with
`previous_bits_device="device"`) finds the changed bits next to the parameters and
scatters only those into a host buffer that already holds the parent's bits. With
CPU parameters and the default ("auto" -> "host") the client takes the full copy,
because this measures the change way slower there. Everything after this step
(encoding, checksums, writing) is the same code on the same bits, so this is the
whole difference between the two.

Both run alternately on the same model after each AdamW step (fp32 master weights,
bf16 export, Qwen3-0.6B shape by default); the table shows the best and median of
`--repeats` rounds, so a busy machine slows both alike. On the CPU "device" and
"host" are one memory; on CUDA run `scripts/gpu-check.sh` instead (docs/gpu.md).
"""

from __future__ import annotations

import argparse
import statistics
import time
from typing import Any

import torch

from weightsync.toymodel import MODEL_SIZES, build_model
from weightsync.trainer.device_diff import ChangeExporter
from weightsync.trainer.export import ExportBuffers, plan_export


def _step(model: Any, optimizer: torch.optim.Optimizer, *, seed: int) -> None:
    generator = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(0, model.config.vocab_size, (1, 16), generator=generator)
    model(input_ids=input_ids, labels=input_ids).loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", default="0.6b", choices=MODEL_SIZES)
    parser.add_argument("--repeats", type=int, default=3, help="rounds (one AdamW step each)")
    parser.add_argument("--lr", type=float, default=1e-6)
    parser.add_argument("--where", default="device", choices=["host", "device"])
    args = parser.parse_args()

    model = build_model(args.size, seed=0)
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, foreach=False)
    _step(model, optimizer, seed=0)
    sources = plan_export(model.state_dict().items(), what=args.size).sources
    full = ExportBuffers(torch.bfloat16)
    exporter = ChangeExporter(torch.bfloat16, previous_bits_device=args.where)
    spare = ExportBuffers(torch.bfloat16)
    previous = exporter.export_base(sources, spare)
    exporter.committed()
    spare.release()
    full.fill(sources)  # allocated once, as the client's buffers are after two saves

    full_s: list[float] = []
    change_s: list[float] = []
    changed: list[int] = []
    for i in range(args.repeats):
        _step(model, optimizer, seed=100 + i)
        started = time.perf_counter()
        full.fill(sources)
        full_s.append(time.perf_counter() - started)
        started = time.perf_counter()
        export = exporter.export_delta(sources, previous, spare)
        change_s.append(time.perf_counter() - started)
        changed.append(export.num_changed)
        exporter.committed()
        spare.adopt(previous)
        previous = export.tensors

    numel = sum(t.numel() for t in sources.values())
    print(
        f"\nmodel {args.size}: {numel / 1e6:.0f}M elements, fp32 -> bf16; "
        f"{torch.get_num_threads()} torch threads; previous bits: {args.where}; "
        f"changed per step: {', '.join(f'{100 * c / numel:.2f} %' for c in changed)}"
    )
    print(f"{'export step':<40} {'best s':>8} {'median s':>9}")
    for label, times in (
        ("full copy (ExportBuffers.fill)", full_s),
        ("changes only (ChangeExporter)", change_s),
    ):
        print(f"{label:<40} {min(times):>8.3f} {statistics.median(times):>9.3f}")
    print("(the first round's changes-only export also copies the parent into the spare once)")


if __name__ == "__main__":
    main()
