"""Peak RSS of a replica process during a hot-load (default: a delta, the Qwen3-0.6B shape).

Writes a base and two deltas (a fraction of every tensor's elements changed, like an RL
step) to a temporary store, starts `weightsync serve` from the base, and samples the
replica's RSS every few milliseconds while it hot-loads the first delta and then the
second. Reports the peak extra RSS over the idle baseline and over the freshly started
replica next to the model size, the delta payload, and the changed data (positions +
new values of the changed elements). The claim it checks: a delta load holds about one
extra copy of the changed data, never a second full model.

`--mode base`: the same with two more bases of the same model (other seeds) hot-loaded
in turn instead of the deltas — every element changes, and the claim is about one extra
copy of the model (the fetched weight files), not three.

    flock /tmp/weightsync-bigrun.lock .venv/bin/python benchmarks/replica_memory.py
    .venv/bin/python benchmarks/replica_memory.py --size small --fraction 0.05 --json out.json
    # the 47 MiB model of docs/reliability.md's dense-delta table:
    .venv/bin/python benchmarks/replica_memory.py --size small --fraction 1.0 \
        --override num_hidden_layers=12 --override hidden_size=384 \
        --override intermediate_size=1536 --override head_dim=64
    # a base hot-load of the 0.6B shape:
    flock /tmp/weightsync-bigrun.lock .venv/bin/python benchmarks/replica_memory.py --mode base
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import httpx
import psutil
import torch

T = TypeVar("T")
BASE, WARM, DELTA = "base-0a0a0a0a", "step1-0a0a0a0a", "step2-0a0a0a0a"


def _weights(size: str, seed: int, overrides: dict[str, int]) -> tuple[dict[str, Any], Any]:
    from weightsync.toymodel import build_model

    model = build_model(size, seed=seed, dtype=torch.bfloat16, **overrides)
    tensors = {k: v.detach() for k, v in model.state_dict().items() if k != "lm_head.weight"}
    return tensors, model.config.to_dict()


def _write_snapshots(
    store: Path, size: str, fraction: float, overrides: dict[str, int], mode: str
) -> dict[str, Any]:
    from weightsync.snapshot import write_base, write_delta
    from weightsync.toymodel import perturbed

    old, config = _weights(size, 0, overrides)
    base = write_base(store, BASE, old, config=config)
    if mode == "base":  # two more bases of the same model, every element other
        for seed, identity in enumerate((WARM, DELTA), start=1):
            manifest = write_base(store, identity, _weights(size, seed, overrides)[0],
                                  config=config)  # fmt: skip
        return {
            "model_bytes": sum(t.numel() * t.element_size() for t in old.values()),
            "largest_tensor_bytes": max(t.numel() * t.element_size() for t in old.values()),
            "num_elements": sum(t.numel() for t in old.values()),
            "num_changed": sum(t.numel() for t in old.values()),
            "payload_bytes": sum(f.size_bytes for f in manifest.files.values()),
        }
    gen = torch.Generator().manual_seed(1)
    parent, manifest = old, base
    for identity in (WARM, DELTA):  # the first delta warms the decoder (JIT) up
        new = perturbed(parent, fraction, gen)
        manifest = write_delta(store, identity, parent=manifest, old=parent, new=new)
        parent = new
    delta = manifest
    return {
        "model_bytes": sum(t.numel() * t.element_size() for t in old.values()),
        "largest_tensor_bytes": max(t.numel() * t.element_size() for t in old.values()),
        "num_elements": sum(t.numel() for t in old.values()),
        "num_changed": sum(e.num_changed or 0 for e in delta.tensors.values()),
        "payload_bytes": sum(f.size_bytes for f in delta.files.values()),
    }


def _rss(pid: int) -> int:
    return int(psutil.Process(pid).memory_info().rss)


def _idle_rss(pid: int) -> int:
    samples = []
    for _ in range(5):
        samples.append(_rss(pid))
        time.sleep(0.1)
    return min(samples)


def _peak_during(pid: int, run: Callable[[], T]) -> tuple[int, T]:
    """Run `run()` while sampling the process's RSS every 2 ms; return the peak and result."""
    peak = _rss(pid)
    stop = threading.Event()

    def sample() -> None:
        nonlocal peak
        while not stop.is_set():
            peak = max(peak, _rss(pid))
            time.sleep(0.002)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        result = run()
        time.sleep(0.2)
    finally:
        stop.set()
        sampler.join()
    return peak, result


def _hot_load(url: str, identity: str, parent: str | None) -> tuple[dict[str, Any], float]:
    """Hot-load a delta onto `parent` (a base: None) and wait for it; return the replica's
    status entry and seconds."""
    started = time.perf_counter()
    body: dict[str, Any] = {"identity": identity}
    if parent is not None:
        body["incremental_snapshot_metadata"] = {"previous_snapshot_identity": parent}
    httpx.post(f"{url}/hot_load/v1/models/hot_load", json=body, timeout=60).raise_for_status()
    while True:
        entry = httpx.get(f"{url}/hot_load/v1/models/hot_load", timeout=60).json()["replicas"][0]
        if entry["loading_state"]["stage"] in ("ready", "error"):
            return entry, time.perf_counter() - started
        time.sleep(0.01)


def measure(
    size: str,
    fraction: float,
    engine_threads: int,
    work: Path,
    overrides: dict[str, int] | None = None,
    mode: str = "delta",
) -> dict[str, Any]:
    store = work / "store"
    facts = _write_snapshots(store, size, fraction, overrides or {}, mode)
    parents = (None, None) if mode == "base" else (BASE, WARM)
    ready = work / "ready.json"
    log = (work / "serve.log").open("wb")
    proc = subprocess.Popen(
        [sys.executable, "-m", "weightsync.cli", "serve", "--storage", str(store),
         "--snapshot", BASE, "--state-dir", str(work / "state"), "--ready-file", str(ready),
         "--engine-threads", str(engine_threads), "--port", "0"],
        stdout=log, stderr=subprocess.STDOUT,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 900
        while not ready.exists() or not ready.read_text().strip():
            if proc.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(f"the replica did not start; see {work / 'serve.log'}")
            time.sleep(0.2)
        url = json.loads(ready.read_text())["url"]
        time.sleep(2.0)  # let start-up settle
        start_rss = _idle_rss(proc.pid)
        first_peak, (_, warm_s) = _peak_during(proc.pid, lambda: _hot_load(url, WARM, parents[0]))
        time.sleep(2.0)
        baseline = _idle_rss(proc.pid)
        peak, (entry, seconds) = _peak_during(proc.pid, lambda: _hot_load(url, DELTA, parents[1]))
        after = _idle_rss(proc.pid)
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()
    changed_bytes = facts["num_changed"] * 2  # the new bf16 values
    # int64 position + bf16 value per change (a base: the new bits, no positions)
    patch_bytes = facts["num_changed"] * (2 if mode == "base" else 8 + 2)
    extra = peak - baseline
    return {
        "mode": mode,
        "size": size,
        "fraction": 1.0 if mode == "base" else fraction,
        **facts,
        "result": entry["loading_state"]["stage"],
        "serving": entry["current_snapshot_identity"],
        "load_s": seconds,
        "warmup_load_s": warm_s,
        "last_load": entry.get("last_load"),
        "start_rss_bytes": start_rss,
        "first_load_peak_rss_bytes": first_peak,
        "first_load_extra_bytes": first_peak - start_rss,
        "baseline_rss_bytes": baseline,
        "peak_rss_bytes": peak,
        "after_rss_bytes": after,
        "extra_peak_bytes": extra,
        "changed_bytes": changed_bytes,
        "patch_bytes": patch_bytes,
        "extra_over_model": extra / facts["model_bytes"],
        "extra_over_patch": extra / max(1, patch_bytes),
        # Everything a delta load ever added over the freshly started replica: the honest
        # figure (the allocator keeps freed memory, so a second load reuses the first's).
        "extra_over_start_bytes": max(first_peak, peak) - start_rss,
        "extra_over_start_over_model": (max(first_peak, peak) - start_rss) / facts["model_bytes"],
        "extra_over_start_over_patch": (max(first_peak, peak) - start_rss) / max(1, patch_bytes),
        # The target of a dense delta: one copy of the changed values plus a chunk.
        "extra_over_start_over_changed": (max(first_peak, peak) - start_rss)
        / max(1, changed_bytes),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", default="0.6b", help="toy model size (tiny|small|medium|0.6b)")
    parser.add_argument(
        "--mode", choices=("delta", "base"), default="delta",
        help="hot-load two deltas, or two more bases of the same model",
    )  # fmt: skip
    parser.add_argument("--fraction", type=float, default=0.05, help="elements changed (delta)")
    parser.add_argument("--engine-threads", type=int, default=2)
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument(
        "--override",
        action="append",
        default=[],
        metavar="KEY=INT",
        help="model config override, e.g. --override num_hidden_layers=12 (repeatable)",
    )
    args = parser.parse_args()
    overrides = {k: int(v) for k, _, v in (o.partition("=") for o in args.override)}
    torch.set_num_threads(2)
    with tempfile.TemporaryDirectory(prefix="weightsync-mem-") as tmp:
        report = measure(
            args.size, args.fraction, args.engine_threads, Path(tmp), overrides, args.mode
        )
    report["overrides"] = overrides
    mib = 1024**2
    kind = args.mode
    print(f"model {args.size}: {report['model_bytes'] / mib:.0f} MiB bf16, "
          f"{report['num_changed']:,} of {report['num_elements']:,} elements changed "
          f"({report['fraction']:.0%}); {kind} payload {report['payload_bytes'] / mib:.1f} MiB; "
          f"changed data ({'values' if kind == 'base' else 'positions + values'}) "
          f"{report['patch_bytes'] / mib:.1f} MiB")  # fmt: skip
    print(f"replica RSS: idle {report['baseline_rss_bytes'] / mib:.0f} MiB, peak during the "
          f"second {kind} load {report['peak_rss_bytes'] / mib:.0f} MiB -> extra "
          f"{report['extra_peak_bytes'] / mib:.0f} MiB = {report['extra_over_model']:.2f}x the "
          f"model, {report['extra_over_patch']:.2f}x the changed data; load "
          f"{report['result']} in {report['load_s']:.2f}s")  # fmt: skip
    print(f"peak over the freshly started replica (both loads, decoder JIT included): "
          f"{report['extra_over_start_bytes'] / mib:.0f} MiB = "
          f"{report['extra_over_start_over_model']:.2f}x the model, "
          f"{report['extra_over_start_over_patch']:.2f}x the changed data, "
          f"{report['extra_over_start_over_changed']:.2f}x the changed values "
          f"({report['changed_bytes'] / mib:.1f} MiB)")  # fmt: skip
    print(f"first {kind} load of the process (decoder JIT warm-up included): extra "
          f"{report['first_load_extra_bytes'] / mib:.0f} MiB over "
          f"{report['start_rss_bytes'] / mib:.0f} MiB at start")  # fmt: skip
    if args.json is not None:
        args.json.write_text(json.dumps(report, indent=2))
    raise SystemExit(0 if report["result"] == "ready" else 1)


if __name__ == "__main__":
    main()
