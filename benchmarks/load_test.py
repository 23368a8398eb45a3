"""Load test: completions keep flowing, verified, while the trainer hot-loads a chain.

While N client streams keep a local deployment busy with greedy completions (token-id
prompts, loopback only, bounded count and duration), a `WeightSyncer` hot-loads a base
and a chain of deltas. Every response must be HTTP 200, must name the snapshot(s) that
produced it, and its tokens must equal a plain `transformers` model's greedy tokens for
that snapshot (under the async transition a response that spans a swap is checked up to
the swap). After each swap every replica's live-weight checksums must equal the
trainer's. Reported: the serving pause per swap (each replica's `pause_s`), and
completion latency percentiles before / during / after the swaps.

The soak (`--soak-streams N`): N more clients stream long sampled completions
(`--soak-max-tokens`, default 300) the whole time, far more than the replica can
run at once, while a probe times `/health` and the hot-load status every 50 ms.
Reported: those latencies and each hot-load's, as percentiles, and every soak
completion's outcome (all must be answered without error; a soak client hangs up
at the end, which cancels its generation).

    .venv/bin/python benchmarks/load_test.py                   # 1 and 2 replicas, async + sync
    .venv/bin/python benchmarks/load_test.py --replicas 2 --streams 8 --deltas 5 --json out.json
    .venv/bin/python benchmarks/load_test.py --replicas 1 --transition async --soak-streams 200

`tests/load/test_load.py` runs a small configuration of the same code in CI.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import httpx
import torch

PROMPTS = [
    [5, 17, 33, 8, 90, 41, 12, 77, 64, 3],
    [99, 21, 40, 41, 42, 43, 44, 45, 46, 47, 48, 49],
    [7, 7, 7, 100, 101, 102, 11, 60],
    [30, 31, 2, 88, 87, 86, 85, 84, 83, 82, 81, 80, 79, 78],
]
START_IDENTITY = "load-start"
CHECKSUM = "xxh3_64"


@dataclass(frozen=True, kw_only=True)
class LoadConfig:
    """One load-test run: deployment shape, client load, and the chain the trainer syncs."""

    replicas: int = 1
    streams: int = 4
    num_deltas: int = 3
    max_tokens: int = 8
    transition: Literal["async", "sync"] = "async"
    model_size: str = "tiny"
    before_s: float = 2.0  # load before the first swap
    gap_s: float = 1.0  # load between swaps
    after_s: float = 2.0  # load after the last swap
    max_duration_s: float = 300.0  # hard bound on the whole run
    engine_threads: int = 1
    soak_streams: int = 0  # more clients streaming long sampled completions (the soak)
    soak_max_tokens: int = 300
    probe_interval_s: float = 0.05  # how often the probe times /health and the status


@dataclass
class Completion:
    stream: int
    prompt: int
    started: float
    finished: float
    status: int
    identities: list[str] = field(default_factory=list)
    token_ids: list[int] = field(default_factory=list)
    switch_at: int | None = None  # token index where a second snapshot took over
    error: str = ""


@dataclass
class Swap:
    identity: str
    kind: str
    started: float
    finished: float
    pause_s: dict[str, float]
    hotload_only_s: float = 0.0  # the syncer's hot-load phase: POST until every replica is ready
    warmup_s: float = 0.0  # its warmup: a completion that queues like any other


def _percentiles(values: list[float]) -> dict[str, float | int]:
    if not values:
        return {"count": 0}
    ordered = sorted(values)

    def pick(q: float) -> float:
        return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]

    return {
        "count": len(ordered),
        "p50_ms": 1000 * pick(0.5),
        "p90_ms": 1000 * pick(0.9),
        "p99_ms": 1000 * pick(0.99),
        "max_ms": 1000 * ordered[-1],
        "mean_ms": 1000 * statistics.fmean(ordered),
    }


@torch.no_grad()
def _reference(config: dict[str, Any], weights: dict[str, torch.Tensor], n: int) -> list[list[int]]:
    """Greedy tokens of a plain transformers model holding `weights`, for every prompt."""
    from transformers import AutoModelForCausalLM, Qwen3Config

    model = AutoModelForCausalLM.from_config(Qwen3Config(**config), dtype=torch.bfloat16)
    model.load_state_dict(weights, strict=False)
    model.tie_weights()
    model.eval()
    out = []
    for prompt in PROMPTS:
        ids = list(prompt)
        for _ in range(n):
            ids.append(int(torch.argmax(model(input_ids=torch.tensor([ids])).logits[0, -1])))
        out.append(ids[len(prompt) :])
    return out


def _step(model: Any, seed: int) -> None:
    """A deterministic stand-in for an optimizer step that moves greedy outputs."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            mask = torch.rand(p.shape, generator=gen) < 0.2
            p.add_(torch.randn(p.shape, generator=gen) * 0.1 * mask)


def _stream(url: str, index: int, cfg: LoadConfig, stop: threading.Event, out: list[Completion]):
    body = {"max_tokens": cfg.max_tokens, "temperature": 0, "return_token_ids": True,
            "stop_token_ids": []}  # fmt: skip
    with httpx.Client(base_url=url, timeout=60) as client:
        i = index
        while not stop.is_set():
            prompt = i % len(PROMPTS)
            i += 1
            started = time.perf_counter()
            record = Completion(stream=index, prompt=prompt, started=started, finished=0.0,
                                status=0)  # fmt: skip
            try:
                r = client.post("/v1/completions", json={**body, "prompt": PROMPTS[prompt]})
                record.status = r.status_code
                if r.status_code == 200:
                    doc = r.json()
                    choice = doc["choices"][0]
                    record.token_ids = list(choice.get("token_ids") or [])
                    record.identities = list(
                        doc.get("snapshot_identities") or [doc.get("snapshot_identity")]
                    )
                    changes = choice.get("snapshot_changes") or []
                    if len(changes) > 1:
                        record.switch_at = int(changes[1]["token_index"])
                else:
                    record.error = r.text[:300]
            except httpx.HTTPError as e:
                record.error = f"{type(e).__name__}: {e}"
            record.finished = time.perf_counter()
            out.append(record)


@dataclass
class SoakCompletion:
    status: int = 0
    chunks: int = 0
    finished: bool = False  # ended with [DONE] (else cut when the run stopped)
    error: str = ""


def _soak(url: str, index: int, cfg: LoadConfig, stop: threading.Event,
          out: list[SoakCompletion]) -> None:  # fmt: skip
    """Stream long sampled completions until `stop`; hang up mid-stream then (a cancel)."""
    body = {"prompt": PROMPTS[index % len(PROMPTS)], "max_tokens": cfg.soak_max_tokens,
            "temperature": 0.8, "stream": True}  # fmt: skip
    with httpx.Client(base_url=url, timeout=600) as client:
        while not stop.is_set():
            record = SoakCompletion()
            try:
                with client.stream("POST", "/v1/completions", json=body) as r:
                    record.status = r.status_code
                    if r.status_code != 200:
                        record.error = r.read().decode(errors="replace")[:300]
                    else:
                        for line in r.iter_lines():
                            if line.startswith("event: error"):
                                record.error = "error event in the stream"
                            elif line == "data: [DONE]":
                                record.finished = True
                            elif line.startswith("data:"):
                                record.chunks += 1
                            if stop.is_set():
                                break  # leaving the block hangs up mid-stream
            except httpx.HTTPError as e:
                if stop.is_set():
                    break  # the deployment is shutting down after the run
                record.error = f"{type(e).__name__}: {e}"
            out.append(record)


def _probe(url: str, cfg: LoadConfig, stop: threading.Event,
           latencies: dict[str, list[float]], errors: list[str]) -> None:  # fmt: skip
    """Time the control routes every `probe_interval_s` while the load runs."""
    routes = {"health": "/health", "status": "/hot_load/v1/models/hot_load"}
    with httpx.Client(base_url=url, timeout=120) as client:
        while not stop.is_set():
            for name, path in routes.items():
                started = time.perf_counter()
                try:
                    r = client.get(path)
                    if r.status_code != 200:
                        errors.append(f"{path}: HTTP {r.status_code} {r.text[:200]}")
                except httpx.HTTPError as e:
                    errors.append(f"{path}: {type(e).__name__}: {e}")
                latencies[name].append(time.perf_counter() - started)
            stop.wait(cfg.probe_interval_s)


def run_load_test(cfg: LoadConfig, work_dir: Path) -> dict[str, Any]:
    """Run one configuration; return the report (see the module docstring)."""
    from weightsync import WeightSyncer
    from weightsync.codec import checksum_tensor
    from weightsync.deployment import DeploymentConfig, DeploymentManager
    from weightsync.toymodel import build_model, build_tokenizer, save_model_dir
    from weightsync.trainer import TrainingClient

    torch.set_num_threads(1)
    tok = build_tokenizer(work_dir / "tokenizer")

    def model() -> Any:
        return build_model(cfg.model_size, seed=0, initializer_range=0.2)

    start_dir = save_model_dir(model(), work_dir / START_IDENTITY, tokenizer_dir=tok)
    start_model = model().to(torch.bfloat16)
    weights = {START_IDENTITY: {
        k: v.detach().clone() for k, v in start_model.state_dict().items() if k != "lm_head.weight"
    }}  # fmt: skip
    model_config = start_model.config.to_dict()
    mgr = DeploymentManager(registry_dir=work_dir / "registry")
    deployment_id = f"load-{cfg.replicas}r-{cfg.transition}"
    info = mgr.create_or_get(
        DeploymentConfig(
            deployment_id=deployment_id, storage=str(work_dir / "store"),
            model_dir=str(start_dir), replicas=cfg.replicas, transition=cfg.transition,
            startup_timeout_s=300, extra_args=("--engine-threads", str(cfg.engine_threads)),
        )
    )  # fmt: skip
    url = info.url or ""
    client = TrainingClient(model(), storage=str(work_dir / "store"), tokenizer_dir=tok)
    syncer = WeightSyncer(
        policy_client=client, deploy_mgr=mgr, deployment_id=deployment_id,
        hotload_timeout=120, warmup_retry_interval_s=0.05, hotload_poll_interval_s=0.02,
    )  # fmt: skip
    completions: list[Completion] = []
    swaps: list[Swap] = []
    served_checks: list[dict[str, Any]] = []
    soaked: list[SoakCompletion] = []
    control: dict[str, list[float]] = {"health": [], "status": []}
    control_errors: list[str] = []
    stop = threading.Event()
    deadline = time.perf_counter() + cfg.max_duration_s
    threads = [
        threading.Thread(target=_stream, args=(url, i, cfg, stop, completions), daemon=True)
        for i in range(cfg.streams)
    ]
    threads += [
        threading.Thread(target=_soak, args=(url, i, cfg, stop, soaked), daemon=True)
        for i in range(cfg.soak_streams)
    ]
    if cfg.soak_streams:
        threads.append(threading.Thread(
            target=_probe, args=(url, cfg, stop, control, control_errors), daemon=True
        ))  # fmt: skip
    try:
        for t in threads:
            t.start()
        time.sleep(cfg.before_s)
        for step in range(cfg.num_deltas + 1):
            if time.perf_counter() > deadline:
                break
            _step(client.model, seed=step + 1)
            started = time.perf_counter()
            identity = syncer.save_and_hotload(
                f"step-{step}", checkpoint_type="base" if step == 0 else "delta"
            )
            finished = time.perf_counter()
            assert identity is not None
            weights[identity] = client.exported_weights()
            status = mgr.hotload_check_status(deployment_id)
            timing = syncer.last_timing
            swaps.append(Swap(
                identity=identity,
                kind=str(timing.checkpoint_type if timing else "?"),
                started=started, finished=finished,
                hotload_only_s=timing.hotload_time_s, warmup_s=timing.warmup_time_s,
                pause_s={r["replica_id"]: float((r.get("last_load") or {}).get("pause_s", -1))
                         for r in status["replicas"]},
            ))  # fmt: skip
            live = httpx.get(f"{url}/hot_load/v1/weights", params={"checksum_format": CHECKSUM},
                             timeout=60).json()  # fmt: skip
            expected = {n: checksum_tensor(CHECKSUM, t) for n, t in weights[identity].items()}
            served_checks.append({
                "identity": identity,
                "replicas_matching": sum(
                    r["current_snapshot_identity"] == identity and r["checksums"] == expected
                    for r in live["replicas"]
                ),
                "replicas": len(live["replicas"]),
            })  # fmt: skip
            time.sleep(cfg.gap_s)
        time.sleep(max(0.0, min(cfg.after_s, deadline - time.perf_counter())))
    finally:
        stop.set()
        for t in threads:
            t.join(120)
        mgr.delete(deployment_id)
        mgr.close()
    report = _report(cfg, completions, swaps, served_checks, weights, model_config)
    report["control"] = {
        **{name: _percentiles(values) for name, values in control.items()},
        "hot-load (POST to ready)": _percentiles([s.hotload_only_s for s in swaps]),
        "warmup (queued like any completion)": _percentiles([s.warmup_s for s in swaps]),
        "whole sync (save, hot-load, warmup)": _percentiles(
            [s.finished - s.started for s in swaps]
        ),
    }
    report["control_errors"] = control_errors[:5]
    report["soak"] = {
        "completions": len(soaked),
        "finished": sum(c.finished for c in soaked),
        "failed": sum(1 for c in soaked if c.status != 200 or c.error),
        "failures": [asdict(c) for c in soaked if c.status != 200 or c.error][:5],
    }
    return report


def _report(
    cfg: LoadConfig,
    completions: list[Completion],
    swaps: list[Swap],
    served_checks: list[dict[str, Any]],
    weights: dict[str, dict[str, torch.Tensor]],
    model_config: dict[str, Any],
) -> dict[str, Any]:
    references = {i: _reference(model_config, w, cfg.max_tokens) for i, w in weights.items()}
    distinct = len({json.dumps(r) for r in references.values()})
    failed = [c for c in completions if c.status != 200]
    unnamed = [
        c for c in completions if c.status == 200 and (not c.identities or None in c.identities)
    ]
    corrupted, mixed = [], 0
    for c in completions:
        if c.status != 200 or not c.identities or c.identities[0] not in references:
            continue
        ref = references[c.identities[0]][c.prompt]
        if len(c.identities) == 1:
            ok = c.token_ids == ref
        else:
            mixed += 1
            cut = c.switch_at or 0
            ok = 0 < cut < len(c.token_ids) and c.token_ids[:cut] == ref[:cut]
        if not ok:
            corrupted.append(c)
    first = swaps[0].started if swaps else float("inf")
    last = swaps[-1].finished if swaps else float("-inf")

    def during(c: Completion) -> bool:
        return any(c.started < s.finished and c.finished > s.started for s in swaps)

    def between(c: Completion) -> bool:
        return c.started >= first and c.finished <= last and not during(c)

    ok = [c for c in completions if c.status == 200]
    return {
        "config": asdict(cfg),
        "responses": len(completions),
        "failed": len(failed),
        "unnamed": len(unnamed),
        "corrupted": len(corrupted),
        "spanning_a_swap": mixed,
        "distinct_references": distinct,
        "snapshots": len(references),
        "failures": [asdict(c) for c in (failed + corrupted + unnamed)[:5]],
        "swaps": [
            {
                **asdict(s),
                "hotload_s": s.finished - s.started,
                "started": s.started - first,
                "finished": s.finished - first,
            }
            for s in swaps
        ],
        "served_checks": served_checks,
        "latency": {
            "before": _percentiles([c.finished - c.started for c in ok if c.finished < first]),
            "during": _percentiles([c.finished - c.started for c in ok if during(c)]),
            "between": _percentiles([c.finished - c.started for c in ok if between(c)]),
            "after": _percentiles([c.finished - c.started for c in ok if c.started > last]),
        },
    }


def format_report(report: dict[str, Any]) -> str:
    cfg = report["config"]
    lines = [
        f"## {cfg['replicas']} replica(s), {cfg['transition']} transition, {cfg['streams']} "
        f"streams, {cfg['max_tokens']} tokens, base + {cfg['num_deltas']} deltas "
        f"({cfg['model_size']} model)",
        f"responses {report['responses']}, failed {report['failed']}, corrupted "
        f"{report['corrupted']}, unnamed {report['unnamed']}, spanning a swap "
        f"{report['spanning_a_swap']}; {report['distinct_references']} distinct reference "
        f"outputs over {report['snapshots']} snapshots",
        "",
        "| swap | kind | hot-load s | pause ms per replica | replicas verified |",
        "| --- | --- | --- | --- | --- |",
    ]
    for swap, check in zip(report["swaps"], report["served_checks"], strict=True):
        pauses = ", ".join(f"{1000 * p:.2f}" for p in swap["pause_s"].values())
        lines.append(
            f"| {swap['identity']} | {swap['kind']} | {swap['hotload_s']:.2f} | {pauses} | "
            f"{check['replicas_matching']}/{check['replicas']} |"
        )
    lines += ["", "| window | n | p50 ms | p90 ms | p99 ms | max ms |", "| --- |" + " --- |" * 5]
    for window, stats in report["latency"].items():
        if stats["count"]:
            lines.append(
                f"| {window} | {stats['count']} | {stats['p50_ms']:.0f} | {stats['p90_ms']:.0f} "
                f"| {stats['p99_ms']:.0f} | {stats['max_ms']:.0f} |"
            )
    soak = report.get("soak") or {}
    if soak.get("completions") or cfg.get("soak_streams"):
        lines += [
            "",
            f"soak: {cfg['soak_streams']} clients streaming {cfg['soak_max_tokens']}-token "
            f"sampled completions; {soak['completions']} answered ({soak['finished']} to the "
            f"end, the rest cut when the run stopped), {soak['failed']} failed; control "
            f"errors {len(report['control_errors'])}",
            "",
            "| control route under the soak | n | p50 ms | p90 ms | p99 ms | max ms |",
            "| --- |" + " --- |" * 5,
        ]
        for route, stats in report["control"].items():
            if stats["count"]:
                lines.append(
                    f"| {route} | {stats['count']} | {stats['p50_ms']:.1f} | "
                    f"{stats['p90_ms']:.1f} | {stats['p99_ms']:.1f} | {stats['max_ms']:.1f} |"
                )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--replicas", type=int, nargs="*", default=[1, 2])
    parser.add_argument("--transition", nargs="*", default=["async", "sync"])
    parser.add_argument("--streams", type=int, default=8)
    parser.add_argument("--deltas", type=int, default=5)
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument("--model-size", default="tiny")
    parser.add_argument("--soak-streams", type=int, default=0)
    parser.add_argument("--soak-max-tokens", type=int, default=300)
    parser.add_argument("--json", type=Path, default=None, help="write the reports here")
    args = parser.parse_args()
    reports = []
    for replicas in args.replicas:
        for transition in args.transition:
            cfg = LoadConfig(
                replicas=replicas, streams=args.streams, num_deltas=args.deltas,
                max_tokens=args.max_tokens, transition=transition, model_size=args.model_size,
                before_s=3.0, gap_s=2.0, after_s=3.0, soak_streams=args.soak_streams,
                soak_max_tokens=args.soak_max_tokens,
            )  # fmt: skip
            with tempfile.TemporaryDirectory(prefix="weightsync-load-") as tmp:
                report = run_load_test(cfg, Path(tmp))
            reports.append(report)
            print(format_report(report), end="\n\n", flush=True)
    if args.json is not None:
        args.json.write_text(json.dumps(reports, indent=2))
    bad = sum(
        r["failed"] + r["corrupted"] + r["unnamed"] + r["soak"]["failed"] + len(r["control_errors"])
        for r in reports
    )
    raise SystemExit(1 if bad else 0)


if __name__ == "__main__":
    main()
