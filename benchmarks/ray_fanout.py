"""Fan-out of one delta to N replicas on Ray: time from the hot-load POST to all replicas ready.

    .venv/bin/python benchmarks/ray_fanout.py                         # N = 1..4, tiny model
    .venv/bin/python benchmarks/ray_fanout.py --replicas 1,2,4 --size small --deltas 5

Starts a one-node Ray cluster on 127.0.0.1 and an S3-compatible server (moto) on
loopback, writes a base and deltas with a real `TrainingClient`, and runs a
`RayDeployment` (replicas as actors, the gateway in this process) scaled up step
by step. For each N it hot-loads `--deltas` deltas one at a time and reports,
over those, the median and worst time from the POST to every admitted replica
serving the delta (the gateway's status polled every 5 ms), the slowest replica's
own load time (its ledger's `total_s`), and the bytes every replica read from
storage (the trainer wrote each delta once). N = 1 is the baseline of the same
run: the rest is what fanning out costs. Prints a Markdown table (docs/scale.md).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

# Ray reads these when it is imported: a single-machine cluster on loopback.
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

import httpx
import torch

from weightsync.toymodel import MODEL_SIZES, build_model, build_tokenizer
from weightsync.trainer import TrainingClient

HOT_LOAD = "/hot_load/v1/models/hot_load"


def start_s3() -> tuple[Any, str]:
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    url = f"http://{host}:{port}"
    os.environ.update(
        AWS_ENDPOINT_URL=url,
        AWS_ACCESS_KEY_ID="bench",
        AWS_SECRET_ACCESS_KEY="bench",
        AWS_DEFAULT_REGION="us-east-1",
    )
    return server, url


def wait_ready(url: str, identity: str, num_replicas: int) -> list[dict[str, Any]]:
    while True:
        replicas = httpx.get(f"{url}{HOT_LOAD}", timeout=30.0).json()["replicas"]
        done = [
            r
            for r in replicas
            if r.get("membership") == "admitted"
            and r["current_snapshot_identity"] == identity
            and r["loading_state"]["stage"] in ("ready", "idle")
        ]
        if len(done) == num_replicas:
            return list(replicas)
        time.sleep(0.005)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--replicas", default="1,2,3,4", help="N values, increasing")
    parser.add_argument("--size", default="tiny", choices=MODEL_SIZES)
    parser.add_argument("--deltas", type=int, default=3, help="hot-loads measured per N")
    parser.add_argument("--lr", type=float, default=1e-3, help="step size of each delta")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    counts = [int(n) for n in args.replicas.split(",")]
    torch.manual_seed(0)

    import s3fs

    import ray
    from weightsync.deployment.ray_replicas import RayDeployment, RayPlacement
    from weightsync.server.config import ReplicaConfig, ServedDeployment
    from weightsync.server.runner import ServerThread

    s3, _ = start_s3()
    ray.init(num_cpus=os.cpu_count() or 1, include_dashboard=False, object_store_memory=100 * 2**20)
    work = Path(tempfile.mkdtemp(prefix="ray-fanout-"))
    s3fs.S3FileSystem(skip_instance_cache=True).mkdir("fanout")
    model = build_model(args.size, seed=0)
    trainer = TrainingClient(
        model, storage="s3://fanout/runs", tokenizer_dir=build_tokenizer(work / "tok")
    )
    base = trainer.save_weights_for_sampler_ext("base").snapshot_name
    template = ReplicaConfig(
        storage="s3://fanout/runs",
        snapshot=base,
        model_name=args.size,
        deployment_id="fanout",
        engine_options={"num_threads": 1},
    )
    deployment = RayDeployment(
        template=template,
        placement=RayPlacement(address=ray.get_runtime_context().gcs_address, num_cpus=0),
        state_dir=work / "gateway",
        served=ServedDeployment(deployment_id="fanout", model_name=args.size),
        max_body_bytes=8 * 2**20,
        host="127.0.0.1",
        poll_interval_s=0.05,
    )
    rows = []
    step = 0
    try:
        deployment.start(counts[0], timeout_s=600)
        with ServerThread(deployment.app) as url:
            for n in counts:
                deployment.scale(n)
                deployment.membership.wait_until(num_admitted=n, timeout_s=600)
                seconds, load_s, fetched = [], [], []
                for _ in range(args.deltas):
                    step += 1
                    with torch.no_grad():
                        for p in model.parameters():
                            p.add_(torch.randn_like(p) * args.lr)
                    saved = trainer.save_weights_for_sampler_ext(f"d{step}")
                    manifest = trainer.store.read_manifest(saved.snapshot_name)
                    body = {
                        "identity": saved.snapshot_name,
                        "incremental_snapshot_metadata": {
                            "previous_snapshot_identity": manifest.parent,
                            "compression_format": manifest.compression_format,
                            "checksum_format": manifest.checksum_format,
                        },
                    }
                    started = time.perf_counter()
                    answer = httpx.post(f"{url}{HOT_LOAD}", json=body, timeout=60.0)
                    answer.raise_for_status()
                    replicas = wait_ready(url, saved.snapshot_name, n)
                    seconds.append(time.perf_counter() - started)
                    loads = [r["last_load"] for r in replicas if r.get("last_load")]
                    load_s.append(max(load["total_s"] for load in loads))
                    fetched.append(sum(load["bytes_fetched"] for load in loads))
                rows.append(
                    {
                        "replicas": n,
                        "median_s": statistics.median(seconds),
                        "max_s": max(seconds),
                        "slowest_replica_load_s": statistics.median(load_s),
                        "bytes_read_per_delta": int(statistics.median(fetched)),
                    }
                )
    finally:
        deployment.stop()
        ray.shutdown()
        s3.stop()
    base_s = rows[0]["median_s"]
    print(
        f"\nOne delta to N replicas ({args.size} model, {args.deltas} deltas each, S3 on loopback)"
    )
    print(
        "\n| replicas | POST → all ready, median (s) | worst (s) | × N=1 "
        "| slowest replica's load (s) | bytes read from storage |\n|---:|---:|---:|---:|---:|---:|"
    )
    for row in rows:
        print(
            f"| {row['replicas']} | {row['median_s']:.3f} | {row['max_s']:.3f} | "
            f"{row['median_s'] / base_s:.2f} | {row['slowest_replica_load_s']:.3f} | "
            f"{row['bytes_read_per_delta']:,} |"
        )
    if args.json is not None:
        args.json.write_text(json.dumps(rows, indent=1) + "\n")


if __name__ == "__main__":
    main()
