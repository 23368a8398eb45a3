"""How long a replica's in-place apply (the serving pause of a delta load) takes.

    python benchmarks/apply_bench.py                      # 0.6b shape, 3 % and 18 % changed
    python benchmarks/apply_bench.py --size tiny          # seconds (a smoke test)

The tensors are the given model size's bf16 state dict (random values, shapes from
the config; no model is built), each patched at random positions at the row's
density, as a decoded delta would patch them. Per row, the median of `--repeats`
runs of each way to write the same patches, in the same process:

- `fancy index`: numpy's `view[positions] = values`, tensor after tensor (the baseline);
- `apply_ (undo)`: `Patch.apply_`, tensor after tensor, building the undo
  (`swap_in`: what a replica that keeps an undo does);
- `write_patches`: every tensor at once, no undo (what a replica's hot-load does).

Every way writes the same bits; the bench checks them against the baseline's before
it prints. `floor` is the time to read and write back each touched cache line once at the
measured memcpy bandwidth (a memcpy of those lines), not counting the patch's own
positions and values: no in-place apply can beat it.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import numpy as np
import torch

from weightsync.codec import Patch, write_patches
from weightsync.codec.bits import bits
from weightsync.codec.patch_kernels import warm_up
from weightsync.toymodel import MODEL_SIZES, model_config

_CACHE_LINE = 64


def _shapes(size: str) -> dict[str, tuple[int, ...]]:
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(model_config(size), dtype=torch.bfloat16)
    return {n: tuple(t.shape) for n, t in model.state_dict().items() if n != "lm_head.weight"}


def _patches(
    shapes: dict[str, tuple[int, ...]], density: float, seed: int
) -> dict[str, tuple[torch.Tensor, Patch]]:
    rng = np.random.default_rng(seed)
    out = {}
    for name, shape in shapes.items():
        target = torch.empty(shape, dtype=torch.bfloat16)
        bits(target).reshape(-1)[:] = rng.integers(0, 1 << 16, target.numel(), dtype=np.uint16)
        keep = rng.random(target.numel()) < density
        positions = np.flatnonzero(keep).astype(np.int64)
        values = rng.integers(0, 1 << 16, positions.size, dtype=np.uint16)
        out[name] = (target, Patch(positions, values))
    return out


def _fancy(pairs: list[tuple[torch.Tensor, Patch]]) -> None:
    for target, patch in pairs:
        bits(target).reshape(-1)[patch.positions] = patch.values


def _undo(pairs: list[tuple[torch.Tensor, Patch]]) -> None:
    for target, patch in pairs:
        patch.apply_(target)


def _memcpy_gbps(num_bytes: int = 256 << 20) -> float:
    src = np.ones(num_bytes, dtype=np.uint8)
    dst = np.empty_like(src)
    best = float("inf")
    for _ in range(3):
        started = time.perf_counter()
        np.copyto(dst, src)
        best = min(best, time.perf_counter() - started)
    return num_bytes / best / 1e9


def _touched_lines(pairs: list[tuple[torch.Tensor, Patch]]) -> int:
    lines = 0
    for _, patch in pairs:
        assert patch.positions is not None
        lines += int(np.unique(patch.positions * 2 // _CACHE_LINE).size)
    return lines


def _median_ms(
    fn: Callable[[list[tuple[torch.Tensor, Patch]]], None],
    pairs: list[tuple[torch.Tensor, Patch]],
    repeats: int,
) -> float:
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        fn(pairs)
        times.append(time.perf_counter() - started)
    return statistics.median(times) * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", choices=MODEL_SIZES, default="0.6b")
    parser.add_argument("--densities", type=float, nargs="+", default=[0.03, 0.18])
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()
    warm_up()
    shapes = _shapes(args.size)
    elements = sum(int(np.prod(s)) for s in shapes.values())
    gbps = _memcpy_gbps()
    print(f"{args.size}: {len(shapes)} tensors, {elements / 1e6:.0f}M bf16 elements; "
          f"memcpy {gbps:.1f} GB/s")  # fmt: skip
    header = "| changed | elements changed | floor ms | fancy index ms | apply_ (undo) ms | write_patches ms | vs fancy index |"  # noqa: E501
    print(header)
    print("| ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for density in args.densities:
        patches = _patches(shapes, density, seed=int(density * 1000))
        pairs = list(patches.values())
        changed = sum(p.positions.size for _, p in pairs if p.positions is not None)
        expected = [t.clone() for t, _ in pairs]
        _fancy([(t, p) for t, (_, p) in zip(expected, pairs, strict=True)])
        times = {}
        for label, fn in (("fancy", _fancy), ("undo", _undo), ("write", write_patches)):
            times[label] = _median_ms(fn, pairs, args.repeats)
            for (target, _), want in zip(pairs, expected, strict=True):
                assert np.array_equal(bits(target), bits(want)), f"{label} wrote other bits"
        # Each touched line is read and written back once: a memcpy of its bytes.
        floor_ms = _touched_lines(pairs) * _CACHE_LINE / (gbps * 1e9) * 1e3
        print(
            f"| {density:.0%} | {changed / 1e6:.2f}M | {floor_ms:.1f} | {times['fancy']:.1f} | "
            f"{times['undo']:.1f} | {times['write']:.1f} | "
            f"{times['fancy'] / times['write']:.1f}x |"
        )


if __name__ == "__main__":
    main()
