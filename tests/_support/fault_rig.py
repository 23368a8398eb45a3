"""The fault-matrix rig: a real replica on 127.0.0.1 behind a fault-injecting storage, a real
trainer and `WeightSyncer`, and the four observations every case records.

Observations (see `Observation`): what the syncer (or the HTTP call) answered, what the
replica reports, what it serves — its live-weight checksums and a greedy completion,
both compared with the trainer's reference for the identity it reports — and the ledger.
`Rig.observe` fails the test unless the replica serves exactly the weights of a snapshot
the trainer verified (one of `allowed`), never anything else.
"""

from __future__ import annotations

import json
import os
import threading
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import httpx
import torch

from _support.faulty_storage import FaultyStorage
from _support.models import model_holding
from _support.training import reference_greedy
from weightsync import WeightSyncer
from weightsync.codec import checksum_tensor
from weightsync.deployment import DeploymentManager
from weightsync.server.app import create_app
from weightsync.server.config import ReplicaConfig
from weightsync.server.replica import Replica
from weightsync.server.runner import ServerThread
from weightsync.server.stage_hooks import StageHook
from weightsync.storage import open_storage
from weightsync.toymodel import build_model, save_model_dir
from weightsync.trainer import TrainingClient

START_IDENTITY = "tiny-base"
PROMPT_IDS = [5, 17, 33, 8, 90, 41, 12, 77, 64, 3, 99, 21]
CHECKSUM = "xxh3_64"
#: Set to a file path to collect every case's observations (docs/reliability.md's table).
MATRIX_OUT_ENV = "WEIGHTSYNC_MATRIX_OUT"


def start_model_dir(root: Path, tokenizer_dir: Path) -> Path:
    """The untrained tiny model (seed 0) as a Hugging Face directory named `tiny-base`."""
    out = root / START_IDENTITY
    if not out.exists():
        save_model_dir(build_model("tiny", seed=0), out, tokenizer_dir=tokenizer_dir)
    return out


def train_step(client: TrainingClient, seed: int, fraction: float = 0.05) -> None:
    """A deterministic stand-in for an optimizer step: a few weights of every tensor move."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in client.model.parameters():
            mask = torch.rand(p.shape, generator=gen) < fraction
            p.add_(torch.randn(p.shape, generator=gen) * 0.05 * mask)


def checksums(weights: dict[str, torch.Tensor]) -> dict[str, str]:
    return {n: checksum_tensor(CHECKSUM, t) for n, t in weights.items()}


@dataclass
class Observation:
    """The four things every case records."""

    case: str
    expected: str
    syncer: str  # what WeightSyncer (or the HTTP call) returned or raised
    serving: str | None  # identity the replica reports
    stage: str
    error: str | None
    serves_reference_of: str | None  # identity whose reference checksums + completion match
    ledger_last: dict[str, Any] | None
    ledger_ok: list[str] = field(default_factory=list)
    test: str = field(
        default_factory=lambda: os.environ.get("PYTEST_CURRENT_TEST", "").rsplit(" ", 1)[0]
    )

    @classmethod
    def of(
        cls,
        case: str,
        expected: str,
        outcome: Any,
        status: dict[str, Any],
        entries: list[dict[str, Any]],
    ) -> Observation:
        """What a case saw: the replica's status entry (checked to serve its identity's
        reference) and its ledger entries, oldest first."""
        served = status["current_snapshot_identity"]
        state = status["loading_state"]
        return cls(
            case=case,
            expected=expected,
            syncer=describe(outcome),
            serving=served,
            stage=state["stage"],
            error=state.get("error"),
            serves_reference_of=served,
            ledger_last=(
                {k: entries[-1][k] for k in ("identity", "kind", "result", "error")}
                if entries
                else None
            ),
            ledger_ok=[e["identity"] for e in entries if e["result"] == "ok"],
        )


def record(observation: Observation) -> None:
    """Append the observation to `$WEIGHTSYNC_MATRIX_OUT` (JSON lines), when set."""
    out = os.environ.get(MATRIX_OUT_ENV)
    if out:
        with Path(out).open("a") as f:
            f.write(json.dumps(asdict(observation)) + "\n")


def describe(outcome: Any) -> str:
    if isinstance(outcome, BaseException):
        return f"raised {type(outcome).__name__}: {str(outcome)[:160]}"
    if isinstance(outcome, httpx.Response):
        return f"HTTP {outcome.status_code}: {outcome.text[:160]}"
    return f"returned {outcome!r}"


class Rig:
    """One replica (in a thread) reading storage through `faults`, one trainer, one syncer."""

    def __init__(
        self, *, root: Path, tokenizer_dir: Path, state_dir: Path, stack: ExitStack
    ) -> None:
        self.root = root
        self.tokenizer_dir = tokenizer_dir
        self.state_dir = state_dir
        self.stack = stack
        self.faults = FaultyStorage(open_storage(root / "store"))
        self.references: dict[str, dict[str, torch.Tensor]] = {}
        self.configs: dict[str, dict[str, Any]] = {}
        self._greedy_cache: dict[str, list[int]] = {}
        self.api_key: str | None = None

    # --- parts -----------------------------------------------------------------

    def start_replica(self, *, on_stage: StageHook | None = None, **config: Any) -> None:
        model_dir = start_model_dir(self.root, self.tokenizer_dir)
        fields: dict[str, Any] = dict(
            storage=str(self.root / "store"),
            model_dir=model_dir,
            state_dir=self.state_dir,
            engine_options={"num_threads": 1},
        )
        fields.update(config)
        self.api_key = fields.get("api_key")
        replica = Replica(ReplicaConfig(**fields), storage=self.faults, on_stage=on_stage)
        replica.start()
        self.stack.callback(self.faults.clear)  # release hung reads before the replica closes
        server = ServerThread(create_app(replica))
        url = server.start()
        self.stack.callback(server.stop)
        self.replica = replica
        self.attach(url)

    def attach(self, url: str) -> None:
        """Observe the deployment at `url` (a replica in a thread, or a process)."""
        self.url = url
        headers = {"Authorization": f"Bearer {self.api_key}"} if self.api_key else None
        self.http = self.stack.enter_context(
            httpx.Client(base_url=self.url, timeout=60, headers=headers)
        )
        start = build_model("tiny", seed=0, dtype=torch.bfloat16)
        self.references[START_IDENTITY] = {
            k: v for k, v in start.state_dict().items() if k != "lm_head.weight"
        }
        self.configs[START_IDENTITY] = start.config.to_dict()

    def trainer(
        self,
        *,
        seed: int = 0,
        mgr: DeploymentManager | None = None,
        deployment_id: str = "faults",
        **syncer_options: Any,
    ) -> tuple[TrainingClient, WeightSyncer]:
        """A training client on the same storage and a syncer to this replica (or `mgr`'s)."""
        client = TrainingClient(
            build_model("tiny", seed=seed), storage=str(self.root / "store"),
            tokenizer_dir=self.tokenizer_dir,
        )  # fmt: skip
        if mgr is None:
            mgr = DeploymentManager(base_url=self.url, api_key=self.api_key, stop_on_exit=False)
            self.stack.callback(mgr.close)
        options: dict[str, Any] = dict(
            hotload_timeout=30,
            warmup_retry_interval_s=0.05,
            hotload_poll_interval_s=0.02,
            hotload_ready_timeout_s=30.0,
        )
        options.update(syncer_options)
        syncer = WeightSyncer(
            policy_client=client, deploy_mgr=mgr, deployment_id=deployment_id, **options
        )
        return client, syncer

    def remember(self, client: TrainingClient, identity: str | None) -> str:
        """Record the trainer's own weights for the snapshot it just saved (the reference)."""
        assert identity is not None
        self.references[identity] = client.exported_weights()
        self.configs[identity] = client.store.read_config(identity)
        return identity

    def sync(self, client: TrainingClient, syncer: WeightSyncer, name: str, **kw: Any) -> Any:
        """`save_and_hotload`, returning the identity or the exception; references recorded."""
        try:
            identity = syncer.save_and_hotload(name, **kw)
        except Exception as e:
            if syncer.last_saved_snapshot is not None:
                self.remember(client, syncer.last_saved_snapshot)
            return e
        self.remember(client, identity)
        return identity

    def save(self, client: TrainingClient, syncer: WeightSyncer, name: str, **kw: Any) -> str:
        identity = syncer.save_only(name, **kw)
        return self.remember(client, identity)

    # --- observing -------------------------------------------------------------

    def status(self) -> dict[str, Any]:
        return dict(self.http.get("/hot_load/v1/models/hot_load").json()["replicas"][0])

    def ledger(self) -> list[dict[str, Any]]:
        return list(self.http.get("/hot_load/v1/ledger").json()["replicas"][0]["entries"])

    def wait_idle(self, timeout_s: float = 30.0) -> dict[str, Any]:
        deadline = time.monotonic() + timeout_s
        while True:
            status = self.status()
            if status["loading_state"]["stage"] in ("ready", "error"):
                return status
            assert time.monotonic() < deadline, f"replica still loading: {status}"
            time.sleep(0.02)

    def _greedy_reference(self, identity: str) -> list[int]:
        if identity not in self._greedy_cache:
            model = model_holding(self.configs[identity], self.references[identity])
            self._greedy_cache[identity] = reference_greedy(model, PROMPT_IDS, 4)
        return self._greedy_cache[identity]

    def observe(self, case: str, expected: str, outcome: Any, *, allowed: set[str]) -> Observation:
        """Gather the four observations; fail unless the replica serves a verified snapshot."""
        status = self.wait_idle()
        served = status["current_snapshot_identity"]
        assert served in allowed, f"{case}: serves {served!r}, expected one of {sorted(allowed)}"
        assert status["readiness"] is True, status
        live = self.http.get("/hot_load/v1/weights", params={"checksum_format": CHECKSUM}).json()
        entry = live["replicas"][0]
        assert entry["current_snapshot_identity"] == served
        assert entry["checksums"] == checksums(self.references[served]), (
            f"{case}: live weights are not those of {served!r}"
        )
        body = {"prompt": PROMPT_IDS, "max_tokens": 4, "temperature": 0, "stop_token_ids": []}
        r = self.http.post("/v1/completions", json={**body, "return_token_ids": True})
        assert r.status_code == 200, r.text
        completion = r.json()
        assert completion["snapshot_identity"] == served
        assert completion["choices"][0]["token_ids"] == self._greedy_reference(served)
        entries = self.ledger()
        observation = Observation.of(case, expected, outcome, status, entries)
        # Zero lost snapshots: what the replica serves is the ledger's newest verified load.
        if entries:
            assert observation.ledger_ok and observation.ledger_ok[-1] == served, entries
        record(observation)
        return observation


@contextmanager
def rig(tmp_path: Path, tokenizer_dir: Path) -> Iterator[Rig]:
    with ExitStack() as stack:
        yield Rig(
            root=tmp_path, tokenizer_dir=tokenizer_dir, state_dir=tmp_path / "state", stack=stack
        )


def hold_at(stage: str) -> tuple[StageHook, threading.Event, threading.Event]:
    """A stage hook that blocks hot-loads at `stage` until `release` is set."""
    reached, release = threading.Event(), threading.Event()

    def hook(current: str, identity: str) -> None:
        if current == stage:
            reached.set()
            release.wait(60)

    return hook, reached, release
