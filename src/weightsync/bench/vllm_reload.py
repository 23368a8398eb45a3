"""vLLM's own weight update, end to end: the baseline the bench's vLLM column is read against.

With `weightsync bench --engine vllm` every method syncs into a `weightsync serve
--engine vllm` deployment (vLLM's OpenAI server plus the weightsync sidecar). This
module measures what a vLLM user does without weightsync on the same recorded
steps and the same server: write the full bf16 checkpoint directory (safetensors +
config, as a trainer hands a directory to vLLM), then `/pause` (keep) ->
`/collective_rpc reload_weights(weights_path=<dir>)` -> `/reset_prefix_cache` ->
`/resume` on vLLM's own server (its dev-mode routes, which the deployment enables).

Per step: *payload* is the directory's bytes, *save* its write, *hot-load* the four
calls, *pause* `/pause` to `/resume` (nothing is served meanwhile). *lossless*
reads back what vLLM holds: the xxh3 checksums, computed in the worker, of every
parameter vLLM keeps in checkpoint layout (embedding, norms; fused and re-packed
layers cannot be compared bit for bit this way) against the trainer's bits.
"""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Callable
from pathlib import Path

import httpx
import torch

from weightsync.bench.memory import PeakRssSampler
from weightsync.bench.report import EndToEndRow, SyncRow
from weightsync.bench.rl_updates import sampler_state_dict
from weightsync.bench.trajectory import Trajectory
from weightsync.codec import checksum_tensor
from weightsync.errors import DeploymentError

METHOD = "vllm reload_weights"
# Read-back checksums: the worker computes them where the weights live.
_CHECKSUM = "xxh3_64"

Progress = Callable[[str], None]


def reload_full_directory(
    url: str,
    weights: dict[str, torch.Tensor],
    config_dir: Path,
    out: Path,
    *,
    timeout_s: float = 600.0,
) -> dict[str, float]:
    """vLLM's own path for `weights`: write a full checkpoint dir, reload vLLM from it.

    `url` is vLLM's server (the replica status's `inference_url`), `config_dir`
    holds the model's `config.json`. Returns `bytes`, `save_s`, `pause_s` and
    `time_to_serve_s` (save + reload, to `/resume` answered).
    """
    from safetensors.torch import save_file

    out.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(config_dir / "config.json", out / "config.json")
    started = time.perf_counter()
    save_file({n: t.contiguous() for n, t in weights.items()}, str(out / "model.safetensors"))
    saved = time.perf_counter()
    with httpx.Client(timeout=timeout_s, trust_env=False) as http:
        _ok(http.post(f"{url}/pause", params={"mode": "keep", "clear_cache": "false"}))
        paused = time.perf_counter()
        _ok(
            http.post(
                f"{url}/collective_rpc",
                json={"method": "reload_weights", "kwargs": {"weights_path": str(out)}},
            )
        )
        _ok(http.post(f"{url}/reset_prefix_cache", params={"reset_running_requests": "true"}))
        _ok(http.post(f"{url}/resume"))
        resumed = time.perf_counter()
    return {
        "bytes": float((out / "model.safetensors").stat().st_size),
        "save_s": saved - started,
        "pause_s": resumed - paused,
        "time_to_serve_s": resumed - started,
    }


def held_matches(url: str, weights: dict[str, torch.Tensor], *, timeout_s: float = 600.0) -> bool:
    """True when every parameter vLLM holds in checkpoint layout has `weights`' bits.

    False also when vLLM answers for none of them (nothing was compared).
    """
    names = sorted(weights)
    with httpx.Client(timeout=timeout_s, trust_env=False) as http:
        answer = _ok(
            http.post(
                f"{url}/collective_rpc",
                json={"method": "weightsync_checksums", "args": [json.dumps(names), _CHECKSUM]},
            )
        )
    per_worker = answer.json().get("results") or []
    if not per_worker or not all(isinstance(held, dict) and held for held in per_worker):
        return False
    return all(
        held[name] == checksum_tensor(_CHECKSUM, weights[name].contiguous())
        for held in per_worker
        for name in held
    )


def run_vllm_reload(
    *,
    trajectory: Trajectory,
    model: torch.nn.Module,
    seed_model_dir: Path,
    work_dir: Path,
    num_syncs: int,
    hotload_timeout_s: int = 900,
    progress: Progress | None = None,
) -> EndToEndRow:
    """Replay `num_syncs` recorded steps through vLLM's own `reload_weights`; one row.

    A `weightsync serve --engine vllm` deployment is started on `seed_model_dir`
    only to run vLLM's server; weightsync's hot-load API is not used. The first
    row (`first_sync`) reloads the initial weights, like the methods' first base.
    """
    from weightsync.deployment import DeploymentConfig, DeploymentManager

    say = progress or (lambda _msg: None)
    root = work_dir / "vllm-reload"
    shutil.rmtree(root, ignore_errors=True)
    (root / "storage").mkdir(parents=True)
    trajectory.load_initial(model)
    deployment_id = "bench-vllm-reload"
    manager = DeploymentManager(registry_dir=root / "registry")
    config = DeploymentConfig(
        deployment_id=deployment_id,
        storage=str(root / "storage"),
        model_dir=str(seed_model_dir),
        engine="vllm",
        state_dir=str(root / "state"),
        startup_timeout_s=float(hotload_timeout_s),
    )
    say(f"{METHOD}: starting vLLM's server")
    deployment = manager.create_or_get(config)
    try:
        [replica] = manager.hotload_check_status(deployment_id)["replicas"]
        url = str(replica.get("inference_url") or "")
        if not url:
            raise DeploymentError(
                f"the vllm deployment {deployment_id} names no inference_url in its status; "
                "is the vllm extra installed (scripts/install-vllm.sh)?"
            )

        def sync(name: str) -> SyncRow:
            weights = sampler_state_dict(model)
            done = reload_full_directory(
                url, weights, seed_model_dir, root / "full", timeout_s=hotload_timeout_s
            )
            return SyncRow(
                name=name,
                checkpoint_type="full-dir",
                save_s=done["save_s"],
                hotload_s=done["time_to_serve_s"] - done["save_s"],
                warmup_s=0.0,
                total_s=done["time_to_serve_s"],
                pause_s=done["pause_s"],
                payload_bytes=int(done["bytes"]),
            )

        say(f"{METHOD}: first reload (initial weights)")
        first = sync("step-00000")
        rows: list[SyncRow] = []
        with PeakRssSampler(server_pid=deployment.pid) as rss:
            for step in range(1, num_syncs + 1):
                trajectory.apply_step(model, step)
                say(f"{METHOD}: reload {step}/{num_syncs}")
                rows.append(sync(f"step-{step:05d}"))
        say(f"{METHOD}: reading back what vLLM holds")
        lossless = held_matches(url, sampler_state_dict(model), timeout_s=hotload_timeout_s)
    finally:
        manager.delete(deployment_id)
        manager.close()
        shutil.rmtree(root, ignore_errors=True)
    return EndToEndRow(
        method=METHOD,
        codec="none",
        checkpoint_type="full-dir",
        lr=trajectory.lr,
        changed_fraction=sum(trajectory.changed_fraction(s) for s in range(1, num_syncs + 1))
        / num_syncs,
        syncs=rows,
        first_sync=first,
        trainer_peak_rss_bytes=rss.trainer_peak_bytes,
        trainer_added_rss_bytes=rss.trainer_added_bytes,
        replica_peak_rss_bytes=rss.replica_peak_bytes,
        lossless=lossless,
    )


def _ok(answer: httpx.Response) -> httpx.Response:
    """`answer`, or a DeploymentError naming the vLLM route that refused and its body."""
    if answer.status_code >= 400:
        raise DeploymentError(
            f"vLLM {answer.request.method} {answer.request.url} answered "
            f"{answer.status_code}: {answer.text[:500]}; the server must run with "
            "VLLM_SERVER_DEV_MODE=1 (weightsync serve --engine vllm sets it)"
        )
    return answer
