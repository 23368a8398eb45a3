"""One rank of a sharded trainer, launched by the tests (torchrun or plain processes).

Builds the tiny toy model on every rank from the same seed, shards it (`--mode
fsdp`: FSDP2 `fully_shard`, every parameter a `Shard(0)` DTensor; `--mode
shard1`: every 2-D weight `distribute_tensor(..., [Shard(1)])`, the rest plain
replicated tensors), and saves a base and 3 deltas with `TrainingClient`. After
each save rank 0 writes the whole exported weights (gathered here, by the test's
script, never by the library) to `<out>/full-<k>.safetensors`, so the test can
compare. `--kill-rank R` makes rank R SIGKILL itself right after its first part
file of the second save is durable (a storage wrapper: the seam where a rank
dies mid-save); `--fail-rank R` makes that write raise `OSError` once instead
(both ranks then save the same snapshot again). `--sync-url URL` saves through a
`WeightSyncer` on every rank instead (`save_and_hotload`), rank 0's talking to the
deployment at URL; after each sync rank 0 writes `<out>/synced-<k>` and waits for the
test's `<out>/checked-<k>`. Results go to `<out>/rank<r>.json`.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import time
import traceback
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from safetensors.torch import save_file
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor, Replicate, Shard, distribute_tensor

from weightsync.deployment import DeploymentManager
from weightsync.errors import InvalidInputError, UnsupportedOperationError
from weightsync.storage import LocalStorage
from weightsync.syncer import WeightSyncer
from weightsync.toymodel import build_model
from weightsync.trainer import TrainingClient

torch.set_num_threads(1)


class DyingStorage(LocalStorage):
    """Local storage whose owner rank kills itself after writing its part of one save."""

    def __init__(
        self, root: Path, *, rank: int, kill_rank: int, fail_rank: int, fault_save: str
    ) -> None:
        super().__init__(root)
        self.rank = rank
        self.kill_rank = kill_rank
        self.fail_rank = fail_rank
        self.fault_save = fault_save

    def write_bytes(self, path: str, data: bytes) -> None:
        mine = path.startswith(f"{self.fault_save}-") and f".r{self.rank:05d}." in path
        if mine and self.rank == self.fail_rank:
            self.fail_rank = -1  # once
            raise OSError(28, "No space left on device (injected)", path)
        super().write_bytes(path, data)
        if mine and self.rank == self.kill_rank:
            os.kill(os.getpid(), signal.SIGKILL)


def batch(step: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(100 + step)
    return torch.randint(0, 128, (2, 12), generator=g)


def train_step(model: Any, optimizer: torch.optim.Optimizer, step: int) -> float:
    ids = batch(step)
    loss = model(input_ids=ids, labels=ids).loss
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    return float(loss.detach())


def fsdp_model(mesh: Any) -> Any:
    model = build_model("tiny", seed=0, dtype=torch.float32, initializer_range=0.2)
    model.train()
    for layer in model.model.layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


def shard1_model(mesh: Any) -> Any:
    model = build_model("tiny", seed=0, dtype=torch.float32, initializer_range=0.2)
    with torch.no_grad():
        for module in model.modules():
            for pname, p in list(module.named_parameters(recurse=False)):
                if p.dim() == 2:
                    setattr(
                        module, pname, torch.nn.Parameter(distribute_tensor(p, mesh, [Shard(1)]))
                    )
    return model


def mesh2d_model(mesh: Any) -> Any:
    """A 2x2 mesh: 2-D weights Shard(0) x Shard(1) (FSDP rows, TP columns); 1-D weights
    Shard(0) on the first mesh dimension, replicated on the second."""
    model = build_model("tiny", seed=0, dtype=torch.float32, initializer_range=0.2)
    with torch.no_grad():
        for module in model.modules():
            for pname, p in list(module.named_parameters(recurse=False)):
                placements = [Shard(0), Shard(1)] if p.dim() == 2 else [Shard(0), Replicate()]
                setattr(module, pname, torch.nn.Parameter(distribute_tensor(p, mesh, placements)))
    return model


def shard1_update(model: Any, step: int) -> None:
    """Change ~5% of every weight, the same on every rank (a stand-in for a TP step)."""
    g = torch.Generator().manual_seed(step)
    with torch.no_grad():
        for _, p in sorted(model.named_parameters()):
            full = p.full_tensor() if isinstance(p, DTensor) else p.detach().clone()
            mask = torch.rand(full.shape, generator=g) < 0.05
            full = torch.where(mask, full + 0.01 * torch.randn(full.shape, generator=g), full)
            if isinstance(p, DTensor):
                p.to_local().copy_(distribute_tensor(full, p.device_mesh, p.placements).to_local())
            else:
                p.copy_(full)


def full_weights(model: Any) -> dict[str, torch.Tensor]:
    out = {}
    for name, t in model.state_dict().items():
        whole = t.full_tensor() if isinstance(t, DTensor) else t
        out[name] = whole.detach().to(torch.bfloat16).contiguous().clone()
    return out


def wait_for(path: Path, *, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while not path.exists():
        if time.monotonic() > deadline:
            raise TimeoutError(f"the test did not write {path} within {timeout_s:g} s")
        time.sleep(0.02)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--storage", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--tokenizer", default=None)
    ap.add_argument("--mode", choices=["fsdp", "shard1", "mesh2d"], default="fsdp")
    ap.add_argument("--deltas", type=int, default=3)
    ap.add_argument("--kill-rank", type=int, default=-1)
    ap.add_argument("--fail-rank", type=int, default=-1)
    ap.add_argument("--timeout", type=float, default=20.0)
    ap.add_argument("--bucket-bytes", type=int, default=256)
    ap.add_argument("--resume", action="store_true")
    ap.add_argument("--sync-url", default=None)
    ap.add_argument("--check-deployment", action="store_true")
    args = ap.parse_args()

    dist.init_process_group("gloo")
    rank, world_size = dist.get_rank(), dist.get_world_size()
    shape = (2, world_size // 2) if args.mode == "mesh2d" else (world_size,)
    mesh = init_device_mesh("cpu", shape)
    out = Path(args.out)
    result: dict[str, Any] = {"rank": rank, "saves": []}
    storage = DyingStorage(
        Path(args.storage),
        rank=rank,
        kill_rank=args.kill_rank,
        fail_rank=args.fail_rank,
        fault_save="step1",
    )
    try:
        builders = {"fsdp": fsdp_model, "shard1": shard1_model, "mesh2d": mesh2d_model}
        model = builders[args.mode](mesh)
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
        client = TrainingClient(
            model,
            storage=storage,
            optimizer=optimizer,
            tokenizer_dir=args.tokenizer,
            compression_format=os.environ.get("WS_CODEC", "arc_v2"),
            barrier_timeout_s=args.timeout,
            bucket_bytes=args.bucket_bytes,
        )
        result["session_id"] = client.session_id
        syncer = None
        if args.sync_url is not None:
            mgr = None
            if rank == 0:
                url = args.sync_url
                registry = out / "registry"
                mgr = DeploymentManager(
                    base_url=url, hotload_api_url=url, inference_url=url, registry_dir=registry
                )
            syncer = WeightSyncer(
                policy_client=client,
                deploy_mgr=mgr,
                deployment_id="sharded" if rank == 0 else None,
                base_model="tiny",
                hotload_timeout=60,
                hotload_ready_timeout_s=30.0,
                warmup_max_retries=2,
                check_deployment_before_save=args.check_deployment,
            )
            try:
                WeightSyncer(policy_client=client, deploy_mgr=mgr, recover_with_base=True)
            except InvalidInputError as e:
                result["recover_with_base"] = str(e)
        for k in range(args.deltas + 1):
            if k:
                if args.mode == "fsdp":
                    train_step(model, optimizer, k)
                else:
                    shard1_update(model, k)
            name = "base" if k == 0 else f"step{k}"
            started = time.monotonic()
            if syncer is not None:
                identity = syncer.save_and_hotload(name)
                result["saves"].append({"identity": identity, "timing": dict(syncer.last_timing)})
                weights = full_weights(model)
                if rank == 0:
                    save_file(weights, str(out / f"full-{k}.safetensors"))
                    (out / f"synced-{k}.tmp").write_text(str(identity))
                    os.replace(out / f"synced-{k}.tmp", out / f"synced-{k}")  # whole, at once
                    wait_for(out / f"checked-{k}", timeout_s=120.0)
                continue
            try:
                saved = client.save_weights_for_sampler_ext(name)
            except Exception as e:  # the fault tests' ranks report what they raised
                result["error"] = {
                    "type": type(e).__name__,
                    "message": str(e),
                    "seconds": time.monotonic() - started,
                    "last_snapshot": client.last_snapshot,
                }
                if args.fail_rank < 0:
                    break
                saved = client.save_weights_for_sampler_ext(name)  # the fault fired once
            result["saves"].append(
                {"identity": saved.snapshot_name, "kind": saved.kind, "parent": saved.parent}
            )
            weights = full_weights(model)
            if rank == 0:
                save_file(weights, str(out / f"full-{k}.safetensors"))
        try:
            client.exported_weights()
        except UnsupportedOperationError as e:
            result["exported_weights"] = str(e)
        if args.resume and "error" not in result:
            location = client.save_state("resume")
            result["loss_after_save"] = train_step(model, optimizer, 50)
            fresh = fsdp_model(mesh)
            fresh_opt = torch.optim.AdamW(fresh.parameters(), lr=1e-3)
            resumed = TrainingClient(
                fresh, storage=storage, optimizer=fresh_opt, barrier_timeout_s=args.timeout
            )
            resumed.load_state_with_optimizer(location)
            result["loss_after_resume"] = train_step(fresh, fresh_opt, 50)
    except BaseException:
        result["crash"] = traceback.format_exc()
        raise
    finally:
        (out / f"rank{rank}.json").write_text(json.dumps(result))
        sys.stdout.flush()
    if "error" not in result or args.fail_rank >= 0:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
