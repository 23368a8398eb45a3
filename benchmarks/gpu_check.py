"""The GPU path, checked and timed: trainer-side diff + copy-out, replica-side copy-in + apply.

For bf16 models shaped like Qwen3-0.6B, Qwen3-1.7B and Qwen2.5-7B (random weights,
shapes only) and ~1 %, 3 % and 18 % of elements changed, it measures:

- the device's copy bandwidth (pinned host <-> device) and the dense baseline:
  copying every weight device -> host (the trainer's old path) and host -> device;
- trainer: `ChangeExporter.export_delta` (previous bits on the device: diff there,
  changed positions and bits to the host, scattered into the host image), checked
  bit for bit against a full copy;
- replica: each patch written into the live device tensors in place
  (`write_on_device`, after the host image's `Patch.apply_` as the torch engine
  does), checked bit for bit against the trainer's new weights and the CPU path;
  the pause is both, timed after `torch.cuda.synchronize()`.

Writes a markdown table to `--out` (default `$OUT/gpu-check.md`, else ./gpu-check.md).
`--shapes tiny --device cpu` runs the same code on the CPU in seconds.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

# What weightsync needs beyond the device machine's packages (torch, triton,
# transformers, safetensors, numba, xxhash, fsspec, httpx); carried as wheels (docs/gpu.md).
_NEEDED = (
    "zstandard", "blake3", "crc32c", "pydantic", "pydantic_core", "annotated_types",
    "typing_inspection", "prometheus_client", "starlette",
)  # fmt: skip


@dataclass(frozen=True)
class Shape:
    hidden: int
    intermediate: int
    layers: int
    vocab: int
    heads: int
    kv_heads: int
    head_dim: int
    tied: bool

    def tensors(self) -> dict[str, tuple[int, ...]]:
        out: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (self.vocab, self.hidden)}
        q, kv = self.heads * self.head_dim, self.kv_heads * self.head_dim
        for i in range(self.layers):
            p = f"model.layers.{i}."
            out |= {
                p + "self_attn.q_proj.weight": (q, self.hidden),
                p + "self_attn.k_proj.weight": (kv, self.hidden),
                p + "self_attn.v_proj.weight": (kv, self.hidden),
                p + "self_attn.o_proj.weight": (self.hidden, q),
                p + "mlp.gate_proj.weight": (self.intermediate, self.hidden),
                p + "mlp.up_proj.weight": (self.intermediate, self.hidden),
                p + "mlp.down_proj.weight": (self.hidden, self.intermediate),
                p + "input_layernorm.weight": (self.hidden,),
                p + "post_attention_layernorm.weight": (self.hidden,),
            }
        out["model.norm.weight"] = (self.hidden,)
        if not self.tied:
            out["lm_head.weight"] = (self.vocab, self.hidden)
        return out


SHAPES: dict[str, Shape] = {
    "tiny": Shape(
        hidden=64, intermediate=128, layers=2, vocab=512, heads=4, kv_heads=2, head_dim=16,
        tied=True,
    ),
    "0.6b": Shape(
        hidden=1024, intermediate=3072, layers=28, vocab=151936, heads=16, kv_heads=8,
        head_dim=128, tied=True,
    ),
    "1.7b": Shape(
        hidden=2048, intermediate=6144, layers=28, vocab=151936, heads=16, kv_heads=8,
        head_dim=128, tied=True,
    ),
    "7b": Shape(
        hidden=3584, intermediate=18944, layers=28, vocab=152064, heads=28, kv_heads=4,
        head_dim=128, tied=False,
    ),
}  # fmt: skip


def preflight() -> None:
    """Fail with one clear message when a package weightsync imports is missing here."""
    missing = []
    for name in _NEEDED:
        try:
            importlib.import_module(name)
        except ImportError:
            missing.append(name)
    if missing:
        sys.exit(
            f"gpu-check: missing Python packages {', '.join(missing)} (weightsync imports them); "
            "carry their wheels in .whl/ as docs/gpu.md says, or install them"
        )


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(device: torch.device, fn: Callable[[], Any]) -> tuple[Any, float]:
    _sync(device)
    started = time.perf_counter()
    value = fn()
    _sync(device)
    return value, time.perf_counter() - started


def copy_bandwidth(device: torch.device, size_bytes: int) -> tuple[float, float]:
    """Best-of-3 GB/s device -> pinned host and pinned host -> device."""
    pin = device.type == "cuda"
    src = torch.empty(size_bytes, dtype=torch.uint8, device=device)
    host = torch.empty(size_bytes, dtype=torch.uint8, pin_memory=pin)
    d2h = min(_timed(device, lambda: host.copy_(src))[1] for _ in range(3))
    h2d = min(_timed(device, lambda: src.copy_(host))[1] for _ in range(3))
    return size_bytes / d2h / 1e9, size_bytes / h2d / 1e9


def perturb(weights: dict[str, torch.Tensor], fraction: float, seed: int) -> None:
    """Move ~`fraction` of the elements of every tensor by one ulp, on their device."""
    generator = torch.Generator(device=next(iter(weights.values())).device).manual_seed(seed)
    for tensor in weights.values():
        bits = tensor.view(-1).view(torch.int16)
        mask = torch.rand(bits.shape, device=bits.device, generator=generator) < fraction
        bits.add_(mask.to(torch.int16))
        del mask


def run_shape(
    name: str,
    shape: Shape,
    device: torch.device,
    fractions: list[float],
    bandwidth: tuple[float, float],
) -> list[dict[str, Any]]:
    from weightsync.codec import Patch
    from weightsync.server.engines.torch_device import write_on_device
    from weightsync.trainer.device_diff import ChangeExporter
    from weightsync.trainer.export import ExportBuffers, export_copy

    generator = torch.Generator(device=device).manual_seed(0)
    weights = {
        n: torch.randn(s, device=device, generator=generator).to(torch.bfloat16)
        for n, s in shape.tensors().items()
    }
    total_bytes = sum(t.numel() * 2 for t in weights.values())
    num_elements = total_bytes // 2
    pin = device.type == "cuda"
    host_full = {n: torch.empty(t.shape, dtype=t.dtype, pin_memory=pin) for n, t in weights.items()}
    # Best of two: the first pays the page faults of fresh (unpinned) host memory.
    dense_d2h_s = min(
        _timed(device, lambda: [host_full[n].copy_(t) for n, t in weights.items()])[1]
        for _ in range(2)
    )
    # The replica: its own device weights and host image, starting equal to the trainer's.
    replica = {n: t.clone() for n, t in weights.items()}
    dense_h2d_s = min(
        _timed(device, lambda: [replica[n].copy_(host_full[n]) for n in weights])[1]
        for _ in range(2)
    )
    replica_host = host_full

    exporter = ChangeExporter(torch.bfloat16, previous_bits_device="device")
    spare = ExportBuffers(torch.bfloat16)
    previous = exporter.export_base(weights, spare)
    exporter.committed()
    spare.release()
    rows = []
    for step, fraction in enumerate(fractions):
        perturb(weights, fraction, seed=step + 1)
        export, diff_s = _timed(
            device, lambda prev=previous: exporter.export_delta(weights, prev, spare)
        )
        exact_diff = all(
            torch.equal(export.tensors[n].view(torch.int16), t.view(torch.int16))
            for n, t in export_copy(weights, torch.bfloat16).items()
        )
        assert export.changes is not None
        changes = export.changes
        moved = sum(c.positions.numel() * 6 for c in changes.values())  # int32 + bf16 each
        patches = {
            n: Patch(c.positions.numpy(), c.values.numpy().view("uint16"))
            for n, c in changes.items()
        }

        def host_apply(patches: dict[str, Patch] = patches) -> None:
            for n, p in patches.items():
                p.apply_(replica_host[n])

        def device_apply(patches: dict[str, Patch] = patches) -> None:
            for n, p in patches.items():
                write_on_device(p, replica[n])

        addresses = {n: t.data_ptr() for n, t in replica.items()}
        _, host_apply_s = _timed(device, host_apply)
        _, device_apply_s = _timed(device, device_apply)
        exact_apply = all(
            torch.equal(replica[n].view(torch.int16), weights[n].view(torch.int16))
            and torch.equal(replica[n].cpu().view(torch.int16), replica_host[n].view(torch.int16))
            for n in weights
        )
        in_place = addresses == {n: t.data_ptr() for n, t in replica.items()}
        exporter.committed()
        spare.adopt(previous)
        previous = export.tensors
        changed = export.num_changed
        rows.append(
            {
                "model": name,
                "GB": total_bytes / 1e9,
                "changed %": 100 * changed / num_elements,
                "diff+copy-out ms": 1e3 * diff_s,
                "copy-in+apply ms": 1e3 * device_apply_s,
                "host-image apply ms": 1e3 * host_apply_s,
                "pause ms": 1e3 * (device_apply_s + host_apply_s),
                "dense D2H ms": 1e3 * dense_d2h_s,
                "dense H2D ms": 1e3 * dense_h2d_s,
                "change GB/s (out)": moved / diff_s / 1e9,
                "D2H GB/s": bandwidth[0],
                "x vs dense D2H": dense_d2h_s / diff_s,
                "x vs dense H2D": dense_h2d_s / device_apply_s,
                "bit-exact": exact_diff and exact_apply and in_place,
            }
        )
        print(_row(rows[-1]), flush=True)
    return rows


_COLUMNS = [
    "model", "GB", "changed %", "diff+copy-out ms", "copy-in+apply ms", "host-image apply ms",
    "pause ms", "dense D2H ms", "dense H2D ms", "change GB/s (out)", "D2H GB/s",
    "x vs dense D2H", "x vs dense H2D", "bit-exact",
]  # fmt: skip


def _cell(value: Any) -> str:
    if isinstance(value, bool):
        return "yes" if value else "**NO**"
    if isinstance(value, float):
        if value < 1:
            return f"{value:.3g}"
        return f"{value:.2f}" if value < 100 else f"{value:.0f}"
    return str(value)


def _row(row: dict[str, Any]) -> str:
    return "| " + " | ".join(_cell(row[c]) for c in _COLUMNS) + " |"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="auto", choices=["auto", "cuda", "cpu"])
    parser.add_argument("--shapes", default="0.6b,1.7b,7b", help=f"comma list of {list(SHAPES)}")
    parser.add_argument("--fractions", default="0.01,0.03,0.18")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    preflight()
    if args.device == "auto":
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    else:
        device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        sys.exit("gpu-check: --device cuda but torch sees no CUDA device")
    shapes = [s.strip() for s in args.shapes.split(",") if s.strip()]
    unknown = [s for s in shapes if s not in SHAPES]
    if unknown:
        sys.exit(f"gpu-check: unknown shapes {unknown}; choose from {list(SHAPES)}")
    fractions = [float(f) for f in args.fractions.split(",")]
    out = args.out or Path(os.environ.get("OUT", ".")) / "gpu-check.md"
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    probe = 1 << 30 if device.type == "cuda" else 1 << 26
    bandwidth = copy_bandwidth(device, probe)
    header = [
        f"# gpu-check on {where} (torch {torch.__version__})",
        "",
        f"copy bandwidth, {probe >> 20} MiB pinned: device->host {bandwidth[0]:.1f} GB/s, "
        f"host->device {bandwidth[1]:.1f} GB/s",
        "",
        "| " + " | ".join(_COLUMNS) + " |",
        "|" + "---|" * len(_COLUMNS),
    ]
    print("\n".join(header), flush=True)
    rows: list[dict[str, Any]] = []
    for name in shapes:
        rows += run_shape(name, SHAPES[name], device, fractions, bandwidth)
        if device.type == "cuda":
            torch.cuda.empty_cache()
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join([*header, *(_row(r) for r in rows)]) + "\n")
    print(f"written to {out}")
    return 0 if all(r["bit-exact"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
