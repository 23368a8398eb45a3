"""`weightsync demo`: a real on-policy GRPO run with a weight sync after every step.

It builds a small causal LM and a tokenizer locally, saves a base snapshot,
starts a local deployment serving it, then loops: sample rollouts from the
deployment → score them → one GRPO step on the trainer → `save_and_hotload`.
At the end it checks that the deployment serves weights bit-identical to the
trainer's, and writes a JSON report and a PNG plot.
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from weightsync.codec import DEFAULT_CHECKSUM, checksum_tensor
from weightsync.demo.grpo import RolloutGroup, grpo_update
from weightsync.demo.task import make_prompts, reward
from weightsync.errors import InvalidInputError
from weightsync.toymodel import MODEL_SIZES, build_model, build_tokenizer

logger = logging.getLogger(__name__)


@dataclass(frozen=True, kw_only=True)
class DemoConfig:
    """Knobs of the demo; the defaults finish in a few minutes on 2 CPU cores."""

    steps: int = 40
    model_size: str = "small"
    learning_rate: float = 2e-3
    sync_interval: int = 1
    replicas: int = 1
    storage: str | None = None  # default: <out_dir>/snapshots
    out_dir: Path = Path("weightsync-demo")
    prompts_per_step: int = 8
    group_size: int = 8
    max_tokens: int = 8
    seed: int = 0
    #: Not the reference's "arc_v2": the demo's deltas change a small fraction of the
    #: weights, and wsdelta1 writes several times fewer bytes for them (docs/codecs.md).
    compression_format: str = "wsdelta1"
    keep: bool = False
    #: Intra-op threads of the trainer and of each replica: a small model on a
    #: 2-core machine runs several times faster on one thread than on contended two.
    num_threads: int = 1

    def __post_init__(self) -> None:
        if self.steps < 1:
            raise InvalidInputError(f"steps must be >= 1, got {self.steps}")
        if self.sync_interval < 1:
            raise InvalidInputError(f"sync interval must be >= 1, got {self.sync_interval}")
        if self.replicas < 1:
            raise InvalidInputError(f"replicas must be >= 1, got {self.replicas}")
        if self.model_size not in MODEL_SIZES:
            raise InvalidInputError(
                f"unknown model size {self.model_size!r}; choose one of {', '.join(MODEL_SIZES)}"
            )
        if self.learning_rate <= 0:
            raise InvalidInputError(f"learning rate must be > 0, got {self.learning_rate}")
        if self.group_size < 2:
            raise InvalidInputError("group size must be >= 2 (GRPO compares within a group)")


@dataclass(kw_only=True)
class StepRecord:
    """One training step as shown in the live table and the JSON report."""

    step: int
    reward: float
    loss: float
    logprob_gap: float
    sample_s: float
    train_s: float
    snapshot: str | None = None
    kind: str | None = None
    payload_bytes: int = 0
    full_bytes: int = 0
    save_s: float = 0.0
    hotload_s: float = 0.0
    warmup_s: float = 0.0
    pause_s: float | None = None
    #: Fraction of the exported elements this snapshot changed (None for a base).
    changed_fraction: float | None = None
    served_by: list[str] = field(default_factory=list)

    @property
    def times_smaller(self) -> float | None:
        if self.payload_bytes <= 0 or self.full_bytes <= 0:
            return None
        return self.full_bytes / self.payload_bytes


@dataclass(kw_only=True)
class DemoResult:
    config: dict[str, Any]
    steps: list[StepRecord]
    deployment_url: str
    deployment_pid: int | None
    final_snapshot: str
    weights_identical: bool
    num_tensors_checked: int
    mismatched_tensors: list[str]
    first_rewards_mean: float
    last_rewards_mean: float
    total_s: float

    def as_dict(self) -> dict[str, Any]:
        data = asdict(self)
        for record, step in zip(data["steps"], self.steps, strict=True):
            record["times_smaller"] = step.times_smaller
        return data


StepCallback = Callable[[StepRecord], None]


def run_demo(config: DemoConfig, *, on_step: StepCallback | None = None) -> DemoResult:
    """Run the demo end to end; always stops the deployment it started (unless `keep`)."""
    from transformers import AutoTokenizer

    from weightsync.deployment import DeploymentConfig, DeploymentManager
    from weightsync.syncer import WeightSyncer
    from weightsync.trainer import TrainingClient

    started = time.perf_counter()
    out_dir = config.out_dir.resolve()
    out_dir.mkdir(parents=True, exist_ok=True)
    storage = config.storage or str(out_dir / "snapshots")
    torch.manual_seed(config.seed)
    torch.set_num_threads(config.num_threads)
    rng = random.Random(config.seed)

    tokenizer_dir = build_tokenizer(out_dir / "tokenizer")
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    model = build_model(config.model_size, seed=config.seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.learning_rate, weight_decay=0.0)
    client = TrainingClient(
        model,
        storage=storage,
        optimizer=optimizer,
        tokenizer_dir=tokenizer_dir,
        compression_format=config.compression_format,
    )
    deploy_mgr = DeploymentManager(registry_dir=out_dir / "deployments")
    deployment_id = f"demo-{client.session_id}"
    syncer = WeightSyncer(
        policy_client=client,
        deploy_mgr=deploy_mgr,
        deployment_id=deployment_id,
        base_model=deployment_id,
        compression_format=config.compression_format,
        warmup_max_retries=5,
    )
    base = syncer.save_only("step-00000", checkpoint_type="base")
    if base is None:
        raise InvalidInputError(f"could not save the initial base snapshot to {storage}")
    info = deploy_mgr.create_or_get(
        DeploymentConfig(
            deployment_id=deployment_id,
            storage=storage,
            snapshot=base,
            replicas=config.replicas,
            state_dir=str(out_dir / "deployment-state"),
            extra_args=("--engine-threads", str(config.num_threads)),
        )
    )
    logger.info("deployment %s serves %s at %s", deployment_id, base, info.url)
    try:
        steps = _train(
            config,
            syncer=syncer,
            tokenizer=tokenizer,
            model=model,
            optimizer=optimizer,
            rng=rng,
            on_step=on_step,
        )
        final = syncer.save_and_hotload(f"step-{config.steps:05d}-final")
        if final is None:
            raise InvalidInputError("the final sync returned no snapshot name")
        expected = {
            name: checksum_tensor(DEFAULT_CHECKSUM, t)
            for name, t in client.exported_weights().items()
        }
        served = deploy_mgr.weights_checksums(deployment_id, checksum_format=DEFAULT_CHECKSUM)
        mismatched = _mismatches(expected, served)
    finally:
        if not config.keep:
            deploy_mgr.delete(deployment_id)
    return DemoResult(
        config={k: str(v) if isinstance(v, Path) else v for k, v in asdict(config).items()},
        steps=steps,
        deployment_url=str(info.url),
        deployment_pid=info.pid,
        final_snapshot=final,
        weights_identical=not mismatched,
        num_tensors_checked=len(expected),
        mismatched_tensors=mismatched,
        first_rewards_mean=_mean([s.reward for s in steps[: max(1, len(steps) // 5)]]),
        last_rewards_mean=_mean([s.reward for s in steps[-max(1, len(steps) // 5) :]]),
        total_s=time.perf_counter() - started,
    )


def _train(
    config: DemoConfig,
    *,
    syncer: Any,
    tokenizer: Any,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    rng: random.Random,
    on_step: StepCallback | None,
) -> list[StepRecord]:
    sampler = syncer.get_deployment_sampler()
    records = []
    for step in range(1, config.steps + 1):
        t0 = time.perf_counter()
        groups, served_by = _rollouts(config, sampler, tokenizer, rng, step)
        t1 = time.perf_counter()
        stats = grpo_update(model, optimizer, groups)
        record = StepRecord(
            step=step,
            reward=stats.mean_reward,
            loss=stats.loss,
            logprob_gap=stats.logprob_gap,
            sample_s=t1 - t0,
            train_s=time.perf_counter() - t1,
            served_by=sorted(served_by),
        )
        if step % config.sync_interval == 0 or step == config.steps:
            record.snapshot = syncer.save_and_hotload(f"step-{step:05d}")
            timing = syncer.last_timing
            record.kind = timing.checkpoint_type
            record.payload_bytes = timing.payload_bytes
            record.full_bytes = timing.full_bytes
            record.save_s = timing.save_time_s
            record.hotload_s = timing.hotload_time_s
            record.warmup_s = timing.warmup_time_s
            record.pause_s = timing.pause_s
            record.changed_fraction = _changed_fraction(syncer, record.snapshot)
        records.append(record)
        if on_step is not None:
            on_step(record)
    return records


def _rollouts(
    config: DemoConfig, sampler: Any, tokenizer: Any, rng: random.Random, step: int
) -> tuple[list[RolloutGroup], set[str]]:
    groups = []
    served_by: set[str] = set()
    for i, prompt in enumerate(make_prompts(config.prompts_per_step, rng)):
        prompt_ids = tokenizer(prompt.text)["input_ids"]
        completions = sampler.sample(
            prompt_token_ids=prompt_ids,
            n=config.group_size,
            max_tokens=config.max_tokens,
            temperature=1.0,
            seed=config.seed * 1_000_003 + step * 1_009 + i,
        )
        groups.append(
            RolloutGroup(
                prompt_token_ids=prompt_ids,
                completion_token_ids=[c.token_ids for c in completions],
                rewards=[reward(prompt, c.text) for c in completions],
                sampled_logprobs=[c.logprobs or [] for c in completions],
            )
        )
        served_by.update(c.snapshot_identity for c in completions if c.snapshot_identity)
    return groups, served_by


def _mismatches(expected: dict[str, str], served: dict[str, dict[str, str]]) -> list[str]:
    """Tensors whose served checksum differs from the trainer's, per replica."""
    bad = []
    for replica_id, checksums in sorted(served.items()):
        for name in sorted(set(expected) | set(checksums)):
            if expected.get(name) != checksums.get(name):
                bad.append(f"replica {replica_id}: {name}")
    if not served:
        bad.append("no replica reported its weights")
    return bad


def _changed_fraction(syncer: Any, identity: str | None) -> float | None:
    if identity is None:
        return None
    manifest = syncer.policy_client.store.read_manifest(identity)
    if manifest.kind != "delta":
        return None
    total = int(manifest.stats.get("num_elements") or 0)
    changed = manifest.stats.get("num_changed")
    return None if not total or changed is None else int(changed) / total


def _mean(values: list[float]) -> float:
    return sum(values) / len(values) if values else 0.0
