"""What waiting for a hot-load adds to its time-to-serve: the status long-poll against polling.

Writes a base and a chain of deltas (a fraction of every tensor's elements changed, like
an RL step) of one model shape, serves the base from an in-process replica on 127.0.0.1,
and hot-loads the deltas one after the other with `DeploymentManager.hotload_and_wait`,
alternating two ways of waiting: the long-poll (`?wait_s=`, the default) and polling (the
same manager through a transport that drops `wait_s`, as against a server without the
long-poll: every 5 ms, doubling up to `--poll-interval`). For each load it reports the
wall time of `hotload_and_wait` and the replica's own load time (`last_load.total_s`);
their difference is what the wait added. The first delta warms up and is not reported.

    .venv/bin/python benchmarks/status_wait.py --size small --loads 10
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
import torch

from weightsync.wire import HOT_LOAD_WAIT_PARAM


class PollingTransport(httpx.HTTPTransport):
    """Drops the long-poll parameter: the server answers each status GET at once."""

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        if HOT_LOAD_WAIT_PARAM in request.url.params:
            request.url = request.url.copy_remove_param(HOT_LOAD_WAIT_PARAM)
        return super().handle_request(request)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", default="small", help="toy model size (weightsync.toymodel)")
    parser.add_argument("--loads", type=int, default=10, help="reported loads per way of waiting")
    parser.add_argument("--fraction", type=float, default=0.03, help="elements changed per delta")
    parser.add_argument("--poll-interval", type=float, default=0.5, help="the polling's cap")
    args = parser.parse_args()

    from weightsync.deployment import DeploymentManager
    from weightsync.server.app import create_app
    from weightsync.server.config import ReplicaConfig
    from weightsync.server.replica import Replica
    from weightsync.server.runner import ServerThread
    from weightsync.snapshot import write_base, write_delta
    from weightsync.toymodel import build_model, perturbed

    model = build_model(args.size, seed=0, dtype=torch.bfloat16)
    config = model.config.to_dict()
    weights = {k: v.detach().clone() for k, v in model.state_dict().items()}
    if getattr(model.config, "tie_word_embeddings", False):
        weights.pop("lm_head.weight", None)
    del model
    root = Path(tempfile.mkdtemp(prefix="status-wait-"))
    store = root / "store"
    parent = write_base(store, "base-0a0a0a0a", weights, config=config)
    gen = torch.Generator().manual_seed(1)
    chain: list[tuple[str, str]] = []
    for step in range(1, 2 + 2 * args.loads):
        new = perturbed(weights, args.fraction, gen)
        delta = write_delta(store, f"step{step}-0a0a0a0a", parent=parent, old=weights, new=new)
        chain.append((delta.identity, parent.identity))
        weights, parent = new, delta
    num_elements = sum(t.numel() for t in weights.values())
    del weights

    replica = Replica(
        ReplicaConfig(storage=str(store), snapshot="base-0a0a0a0a", state_dir=root / "state")
    )
    replica.start()
    rows: dict[str, list[tuple[float, float]]] = {"long-poll": [], "polling": []}
    with ServerThread(create_app(replica)) as url:
        managers: dict[str, Any] = {
            "long-poll": DeploymentManager(
                hotload_api_url=url, registry_dir=root / "r1", stop_on_exit=False
            ),
            "polling": DeploymentManager(
                hotload_api_url=url,
                registry_dir=root / "r2",
                stop_on_exit=False,
                transport=PollingTransport(),
            ),
        }
        try:
            for k, (identity, previous) in enumerate(chain):
                way = "long-poll" if k % 2 else "polling"
                mgr = managers[way]
                started = time.perf_counter()
                ok = mgr.hotload_and_wait(
                    "d", "m", identity, {"previous_snapshot_identity": previous},
                    timeout_seconds=300, poll_interval=args.poll_interval,
                )  # fmt: skip
                wall = time.perf_counter() - started
                if not ok:
                    raise SystemExit(f"hot-load of {identity} failed: {mgr.last_hotload_error}")
                total = float(replica.pipeline.status()["last_load"]["total_s"])
                if k > 0:  # the first warms the decoder up
                    rows[way].append((wall, total))
        finally:
            for mgr in managers.values():
                mgr.close()
            replica.close()

    print(
        f"\nmodel {args.size}: {num_elements:,} elements, {args.fraction:.1%} changed per "
        f"delta; polling capped at {args.poll_interval}s; medians of {args.loads} loads each"
    )
    header = ("wait", "hotload_and_wait s", "replica load s", "added by the wait s")
    print(f"{header[0]:<10} {header[1]:>19} {header[2]:>15} {header[3]:>20}")
    for way, measured in rows.items():
        walls = [w for w, _ in measured]
        totals = [t for _, t in measured]
        added = [w - t for w, t in measured]
        print(
            f"{way:<10} {statistics.median(walls):>19.4f} {statistics.median(totals):>15.4f} "
            f"{statistics.median(added):>20.4f}"
        )


if __name__ == "__main__":
    main()
