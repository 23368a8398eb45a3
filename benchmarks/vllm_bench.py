"""Hot-load into vLLM's own server: weightsync's delta path against vLLM's `reload_weights`.

Run in the vLLM venv (`scripts/install-vllm.sh`):

    .venv-vllm/bin/python benchmarks/vllm_bench.py --size small --deltas 3 \\
        --out docs/benchmarks/vllm.json

A `weightsync serve --engine vllm` deployment (vLLM's OpenAI server + the
sidecar) is driven by `WeightSyncer`: a base, then `--deltas` AdamW steps, each
saved as a delta and hot-loaded. Per load it records the bytes written to
storage, the time to serve (hot-load request to the new weights serving: the
replica's `total_s`) and the serving pause (`pause_s`: vLLM's `/pause` +
in-place apply + read-back check + prefix-cache reset + `/resume`), from the
replica's status. For the same weights it then measures vLLM's own path: save
the full checkpoint directory, and `/pause` → `/collective_rpc reload_weights
(weights_path=<dir>)` → `/reset_prefix_cache` → `/resume` on vLLM's server.
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from weightsync import WeightSyncer
from weightsync.bench.vllm_reload import reload_full_directory
from weightsync.deployment import DeploymentConfig, DeploymentManager
from weightsync.toymodel import build_model, build_tokenizer, save_model_dir
from weightsync.trainer import TrainingClient


def swap_phases(log: Path, identity: str) -> dict[str, float]:
    """The sidecar's logged phases of the swap to `identity` (write, vLLM's pause, push...)."""
    phases: dict[str, float] = {}
    marker = f"swap to {identity}: "
    for line in log.read_text(errors="replace").splitlines():
        if marker in line:
            for part in line.split(marker, 1)[1].split(", "):
                key, _, value = part.partition(" ")
                phases[key] = float(value.rstrip("s"))
    return phases


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", default="small", help="toy model size (weightsync.toymodel)")
    parser.add_argument("--deltas", type=int, default=3)
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--out", type=Path, default=None, help="write the rows here as JSON")
    parser.add_argument(
        "--override", action="append", default=[], metavar="KEY=INT",
        help="model config override (repeatable), e.g. --override num_hidden_layers=8",
    )  # fmt: skip
    parser.add_argument(
        "--vllm-first", action="store_true",
        help="run vLLM's reload_weights of each step before weightsync's hot-load of it "
        "(default: after), to see what running second on the same server gains",
    )  # fmt: skip
    parser.add_argument(
        "--settle-s", type=float, default=0.0,
        help="sleep this long before each of the two paths' loads, so that both reload "
        "into memory that has been free as long (on a VM that hands free guest pages back to "
        "its host, the first touch of such pages costs ~10x; docs/vllm.md)",
    )  # fmt: skip
    args = parser.parse_args()
    overrides = {k: int(v) for k, _, v in (o.partition("=") for o in args.override)}

    root = Path(tempfile.mkdtemp(prefix="vllm-bench-"))
    tok_dir = build_tokenizer(root / "tok")
    base_model = build_model(args.size, seed=5, **overrides)
    base_dir = save_model_dir(base_model, root / "base", tokenizer_dir=tok_dir)
    del base_model
    mgr = DeploymentManager(registry_dir=root / "registry")
    started = time.perf_counter()
    mgr.create_or_get(
        DeploymentConfig(
            deployment_id="vllm-bench",
            storage=str(root / "snapshots"),
            model_dir=str(base_dir),
            engine="vllm",
            model_name=args.size,
            startup_timeout_s=900.0,
        )
    )
    startup_s = time.perf_counter() - started
    model = build_model(args.size, seed=0, **overrides)
    model.train()
    client = TrainingClient(model, storage=str(root / "snapshots"), tokenizer_dir=tok_dir)
    client.optimizer = torch.optim.AdamW(client.model.parameters(), lr=args.lr)
    syncer = WeightSyncer(
        policy_client=client, deploy_mgr=mgr, deployment_id="vllm-bench",
        warmup_retry_interval_s=0.2,
    )  # fmt: skip
    gen = torch.Generator().manual_seed(0)
    vocab = int(model.config.vocab_size)
    rows: list[dict[str, Any]] = []
    try:
        for step in range(args.deltas + 1):
            ids = torch.randint(0, vocab, (4, 64), generator=gen)
            client.optimizer.zero_grad()
            client.model(input_ids=ids, labels=ids).loss.backward()
            client.optimizer.step()
            vllm_first = None
            if args.vllm_first and step > 0:  # the base starts weightsync's chain
                time.sleep(args.settle_s)
                [before] = mgr.hotload_check_status("vllm-bench")["replicas"]
                vllm_first = reload_full_directory(
                    before["inference_url"], client.exported_weights(), base_dir,
                    root / f"full-{step}",
                )  # fmt: skip
            time.sleep(args.settle_s)
            identity = syncer.save_and_hotload(f"step-{step:05d}")
            if identity is None:
                raise SystemExit(
                    f"hot-load of step {step} failed: {mgr.last_hotload_error_message}"
                )
            [replica] = mgr.hotload_check_status("vllm-bench")["replicas"]
            load = replica["last_load"]
            timing = syncer.last_timing
            row: dict[str, Any] = {
                "identity": identity,
                "kind": load["kind"],
                "bytes": timing.payload_bytes,
                "full_bytes": timing.full_bytes,
                "save_s": timing.save_time_s,
                "fetch_s": load["fetch_s"],
                "decode_s": load["decode_s"],
                "verify_s": load["verify_s"],
                "pause_s": load["pause_s"],
                "time_to_serve_s": load["total_s"],
                "sidecar_phases": swap_phases(
                    root / "registry" / "vllm-bench" / "serve.log", identity
                ),
            }
            if vllm_first is None:
                time.sleep(args.settle_s)
            row["vllm_reload_weights"] = vllm_first or reload_full_directory(
                replica["inference_url"], client.exported_weights(), base_dir,
                root / f"full-{step}",
            )  # fmt: skip
            row["vllm_reload_first"] = vllm_first is not None
            row["settle_s"] = args.settle_s
            rows.append(row)
            base = row["vllm_reload_weights"]
            print(
                f"{row['kind']:5} {identity}: weightsync {row['bytes'] / 1e6:.2f} MB, serve "
                f"{row['time_to_serve_s']:.3f}s, pause {row['pause_s']:.3f}s | vLLM "
                f"reload_weights {base['bytes'] / 1e6:.2f} MB, serve "
                f"{base['time_to_serve_s']:.3f}s, pause {base['pause_s']:.3f}s"
            )
    finally:
        mgr.delete("vllm-bench")
        mgr.close()
        shutil.rmtree(root, ignore_errors=True)  # every step's full directory: GBs
    result = {
        "model_size": args.size,
        "overrides": overrides,
        "params": sum(p.numel() for p in model.parameters()),
        "startup_s": startup_s,
        "loads": rows,
    }
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
