"""Replica-side hot-load time of a delta against model size and against density (issue 17).

For each model shape it writes a base and a chain of deltas (a fraction of every tensor's
elements changed, like an RL step: `benchmarks/replica_memory.py`'s perturbation) to a
temporary store, starts an in-process replica (the torch engine) from the base, and
hot-loads the deltas one after the other. The first delta of each replica warms the
decoder and patch kernels up and is not reported; each reported row is the best of
`--repeats` loads. Stage seconds are the replica's own load record (`last_load`):

    fetch   read every payload file and check its file checksum
    decode  parse the payloads into patches against the live weights
    verify  check each patch before the swap: from the changed elements alone against
            the manifest's change sum (format 3, `wsdelta1`), or, without change sums,
            rebuild each patched tensor and check its full checksum
    stage   the engine's work before the swap lock (`--buffered-swap`: write the spare
            copy, after waiting for the previous load's catch-up of it; else nothing)
    pause   the swap lock held: apply in place, or point the model at the spare
            (`--buffered-swap`), + prompt-cache reset
    check   re-checksum the live weights against the manifest
    total   the whole load, as the replica measured it

Two tables: every `--sizes` shape at `--fraction` (with `--change-sums both`, each
shape twice: the same deltas with and without change sums in their manifests), then
`--density-size` at every `--fractions`. Then a least-squares fit, over the rows
verified the density table's way, of each stage's seconds as
`a + b * changed_elements + c * model_elements`: `b` is the cost per changed element,
`c` the part that grows with the model whatever changed (what issue 17 asks to remove).

    flock /tmp/weightsync-bigrun.lock .venv/bin/python benchmarks/replica_scaling.py
    .venv/bin/python benchmarks/replica_scaling.py --change-sums on --buffered-swap
    .venv/bin/python benchmarks/replica_scaling.py --sizes tiny,small,medium \\
        --density-size medium --json out.json
"""

from __future__ import annotations

import argparse
import gc
import json
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

STAGES = ("fetch", "decode", "verify", "stage", "pause", "check", "total")
#: Named model shapes: a `weightsync.toymodel` size and its config overrides.
SHAPES: dict[str, tuple[str, dict[str, int]]] = {
    "tiny": ("tiny", {}),
    "small": ("small", {}),
    "medium": ("medium", {}),
    # Qwen3-0.6B's vocabulary and width with 3 of its 28 layers (~200M elements).
    "0.6b-3l": ("0.6b", {"num_hidden_layers": 3}),
    # Qwen3-0.6B's vocabulary and width with 10 of its 28 layers (~300M elements).
    "0.6b-10l": ("0.6b", {"num_hidden_layers": 10}),
    "0.6b": ("0.6b", {}),
}


@dataclass(frozen=True, kw_only=True)
class Row:
    """One reported load: the model, what changed, and the replica's stage seconds."""

    shape: str
    change_sums: bool
    fraction: float
    model_elements: int
    changed_elements: int
    payload_bytes: int
    fetch: float
    decode: float
    verify: float
    stage: float
    pause: float
    check: float
    total: float


def measure_shape(
    shape: str,
    fractions: list[float],
    repeats: int,
    warm_fraction: float,
    work: Path,
    change_sums: bool,
    buffered_swap: bool = False,
) -> list[Row]:
    """Hot-load a warm-up delta, then `repeats` deltas at each of `fractions`; best of each."""
    from weightsync.server.config import ReplicaConfig
    from weightsync.server.replica import Replica
    from weightsync.snapshot import write_base, write_delta
    from weightsync.toymodel import build_model, perturbed
    from weightsync.wire import HotLoadRequest, IncrementalSnapshotMetadata

    size, overrides = SHAPES[shape]
    model = build_model(size, seed=0, dtype=torch.bfloat16, **overrides)
    config = model.config.to_dict()
    tied = bool(getattr(model.config, "tie_word_embeddings", False))
    weights = {
        k: v.detach().clone()
        for k, v in model.state_dict().items()
        if not (tied and k == "lm_head.weight")
    }
    del model
    run_dir = Path(tempfile.mkdtemp(prefix=f"{shape}-", dir=work))
    store = run_dir / "store"
    manifest = write_base(store, "base-0a0a0a0a", weights, config=config)
    model_elements = sum(t.numel() for t in weights.values())
    gen = torch.Generator().manual_seed(1)
    plan = [(warm_fraction, False)] + [(f, True) for f in fractions for _ in range(repeats)]
    chain: list[tuple[str, str, float, bool, int, int]] = []
    parent = manifest
    for step, (fraction, reported) in enumerate(plan, start=1):
        new = perturbed(weights, fraction, gen)
        identity = f"step{step}-0a0a0a0a"
        delta = write_delta(
            store, identity, parent=parent, old=weights, new=new,
            compression_format="wsdelta1", change_sums=change_sums,
        )  # fmt: skip
        changed = sum(e.num_changed or 0 for e in delta.tensors.values())
        payload = sum(f.size_bytes for f in delta.files.values())
        chain.append((identity, parent.identity, fraction, reported, changed, payload))
        weights, parent = new, delta
    del weights
    gc.collect()
    replica = Replica(
        ReplicaConfig(
            storage=str(store),
            snapshot="base-0a0a0a0a",
            state_dir=run_dir / "state",
            engine_options={"num_threads": 2, "buffered_swap": buffered_swap},
        )
    )
    replica.start()
    best: dict[float, Row] = {}
    try:
        for identity, previous, fraction, reported, changed, payload in chain:
            meta = IncrementalSnapshotMetadata(previous_snapshot_identity=previous)
            request = HotLoadRequest(identity=identity, incremental_snapshot_metadata=meta)
            answer = replica.request_hot_load(request)
            if answer["status"] != "accepted":
                raise SystemExit(f"{shape}: hot-load of {identity} answered {answer}")
            replica.pipeline.join(timeout_s=900)
            status = replica.pipeline.status()
            last = status["last_load"]
            if status["loading_state"]["stage"] != "ready" or last["identity"] != identity:
                raise SystemExit(f"{shape}: hot-load of {identity} ended {status}")
            if not reported:
                continue
            row = Row(
                shape=shape,
                change_sums=change_sums,
                fraction=fraction,
                model_elements=model_elements,
                changed_elements=changed,
                payload_bytes=payload,
                **{stage: float(last[f"{stage}_s"]) for stage in STAGES},
            )
            if fraction not in best or row.total < best[fraction].total:
                best[fraction] = row
    finally:
        replica.close()
        shutil.rmtree(run_dir, ignore_errors=True)
    return [best[f] for f in fractions]


def fit(rows: list[Row]) -> dict[str, dict[str, float]]:
    """Per stage, least squares of seconds = a + b * changed + c * model elements."""
    x = torch.tensor(
        [[1.0, r.changed_elements, r.model_elements] for r in rows], dtype=torch.float64
    )
    scale = x.abs().amax(dim=0).clamp_min(1.0)  # columns of very different magnitude
    fitted = {}
    for stage in STAGES:
        y = torch.tensor([[getattr(r, stage)] for r in rows], dtype=torch.float64)
        coef = torch.linalg.lstsq(x / scale, y).solution.squeeze(1) / scale
        a, b, c = (float(v) for v in coef)
        fitted[stage] = {"fixed_s": a, "s_per_changed": b, "s_per_model_element": c}
    return fitted


def _table(title: str, rows: list[Row]) -> str:
    head = f"{'shape':>9} {'sums':>5} {'elements':>12} {'changed':>8} {'changed':>11}"
    head += f" {'payload':>9}"
    head += "".join(f" {s + '_ms':>9}" for s in STAGES)
    lines = [title, head]
    for r in rows:
        line = (
            f"{r.shape:>9} {'yes' if r.change_sums else 'no':>5} {r.model_elements:>12,}"
            f" {r.fraction:>8.1%} {r.changed_elements:>11,} {r.payload_bytes / 2**20:>7.1f}Mi"
        )
        line += "".join(f" {getattr(r, s) * 1e3:>9.1f}" for s in STAGES)
        lines.append(line)
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="tiny,small,medium,0.6b-3l,0.6b-10l,0.6b")
    parser.add_argument("--fraction", type=float, default=0.03, help="density of the size table")
    parser.add_argument("--density-size", default="0.6b-3l", choices=sorted(SHAPES))
    parser.add_argument("--fractions", default="0.001,0.003,0.01,0.03,0.1,0.3")
    parser.add_argument("--repeats", type=int, default=2, help="loads per row (best reported)")
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument(
        "--change-sums", choices=("on", "off", "both"), default="both",
        help="deltas with change sums in their manifests, without, or the size table both ways",
    )  # fmt: skip
    parser.add_argument(
        "--buffered-swap", action="store_true",
        help="replicas keep a spare copy of the weights (weightsync serve --buffered-swap)",
    )  # fmt: skip
    args = parser.parse_args()
    sizes = [s for s in args.sizes.split(",") if s]
    unknown = [s for s in sizes if s not in SHAPES]
    if unknown:
        parser.error(f"unknown shapes {unknown}; choose from {', '.join(SHAPES)}")
    fractions = [float(f) for f in args.fractions.split(",") if f]
    torch.set_num_threads(2)
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="weightsync-scaling-") as tmp:
        by_size = []
        ways = {"on": [True], "off": [False], "both": [True, False]}[args.change_sums]
        for shape in sizes:
            for sums in ways:
                by_size += measure_shape(
                    shape, [args.fraction], args.repeats, args.fraction, Path(tmp), sums,
                    buffered_swap=args.buffered_swap,
                )  # fmt: skip
                gc.collect()
        by_density = measure_shape(
            args.density_size, fractions, args.repeats, args.fraction, Path(tmp), ways[0],
            buffered_swap=args.buffered_swap,
        )  # fmt: skip
    rows = by_size + by_density
    # The fit is of one way of verifying: the density table's.
    fitted = fit([r for r in rows if r.change_sums == ways[0]])
    print(_table(f"hot-load of one delta at {args.fraction:.1%} changed, by model size", by_size))
    print()
    print(_table(f"hot-load of one delta on {args.density_size}, by density", by_density))
    print()
    print(
        f"fit over the rows {'with' if ways[0] else 'without'} change sums: "
        "seconds = fixed + b * changed elements + c * model elements"
    )
    print(f"{'stage':>7} {'fixed_ms':>9} {'ns/changed':>11} {'ns/model el':>12}")
    for stage, f in fitted.items():
        print(
            f"{stage:>7} {f['fixed_s'] * 1e3:>9.2f} {f['s_per_changed'] * 1e9:>11.3f}"
            f" {f['s_per_model_element'] * 1e9:>12.4f}"
        )
    print(f"(benchmark wall time {time.perf_counter() - started:.0f}s)")
    if args.json is not None:
        report: dict[str, Any] = {
            "fraction": args.fraction,
            "density_size": args.density_size,
            "buffered_swap": args.buffered_swap,
            "by_size": [asdict(r) for r in by_size],
            "by_density": [asdict(r) for r in by_density],
            "fit": fitted,
        }
        args.json.write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
