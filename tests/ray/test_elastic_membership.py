"""Admission and catch-up of an elastic deployment without Ray: real replicas in threads.

The endpoint source is a list the test edits (a replica joining late, one whose
server stops); the gateway, the membership and the replicas are the real ones,
on 127.0.0.1, reading a local snapshot storage. Runs where `ray` is not installed.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import httpx
import pytest
import torch

from weightsync.deployment import DeploymentManager
from weightsync.errors import UnsupportedOperationError
from weightsync.server.app import create_app
from weightsync.server.config import ReplicaConfig
from weightsync.server.elastic_membership import ElasticMembership, Endpoint
from weightsync.server.gateway import create_gateway_app
from weightsync.server.head_record import HeadRecordFile
from weightsync.server.replica import Replica
from weightsync.server.runner import ServerThread
from weightsync.server.stage_hooks import StageHook
from weightsync.toymodel import build_model, build_tokenizer
from weightsync.trainer import TrainingClient

pytestmark = pytest.mark.timeout(180)

HOT_LOAD = "/hot_load/v1/models/hot_load"


class Source:
    """The replicas the test runs: id → (url, incarnation); `None` url = gone."""

    def __init__(self) -> None:
        self.replicas: dict[str, tuple[str | None, str]] = {}

    def endpoints(self) -> list[Endpoint]:
        return [
            Endpoint(replica_id=r, url=url, incarnation=inc, problem=None if url else "stopped")
            for r, (url, inc) in self.replicas.items()
        ]


@pytest.fixture
def chain(tmp_path: Path) -> tuple[TrainingClient, list[str]]:
    model = build_model("tiny", seed=0)
    client = TrainingClient(
        model, storage=str(tmp_path / "store"), tokenizer_dir=build_tokenizer(tmp_path / "tok")
    )
    names = [client.save_weights_for_sampler_ext("base").snapshot_name]
    for step in range(2):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p) * 1e-2)
        names.append(client.save_weights_for_sampler_ext(f"d{step}").snapshot_name)
    return client, names


def request(client: TrainingClient, identity: str) -> dict[str, Any]:
    manifest = client.store.read_manifest(identity)
    return {
        "identity": identity,
        "incremental_snapshot_metadata": {"previous_snapshot_identity": manifest.parent},
    }


@pytest.fixture
def replicas(tmp_path: Path, chain: tuple[TrainingClient, list[str]]) -> Iterator[Any]:
    client, names = chain
    servers: dict[str, ServerThread] = {}
    with ExitStack() as stack:

        def start(replica_id: str, on_stage: StageHook | None = None, **options: Any) -> str:
            config = ReplicaConfig(
                storage=client.storage.url,
                snapshot=names[0],
                state_dir=tmp_path / "replicas" / replica_id,
                replica_id=replica_id,
                model_name="tiny",
                transition="sync",
                engine_options={"num_threads": 1},
                **options,
            )
            replica = Replica(config, on_stage=on_stage)
            replica.start()
            server = ServerThread(create_app(replica))
            servers[replica_id] = server
            url = server.start()
            stack.callback(server.stop)
            return url

        yield start, servers


def status(url: str) -> dict[str, dict[str, Any]]:
    answer = httpx.get(f"{url}{HOT_LOAD}", timeout=30.0)
    answer.raise_for_status()
    return {r["replica_id"]: r for r in answer.json()["replicas"]}


def wait_for(predicate: Any, what: str, timeout_s: float = 60.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what}")
        time.sleep(0.05)


def test_sync_deployment_admits_only_the_head_and_catches_a_late_replica_up(
    tmp_path: Path, chain: tuple[TrainingClient, list[str]], replicas: Any
) -> None:
    client, (base, d1, d2) = chain
    start, servers = replicas
    source = Source()
    source.replicas["replica-0"] = (start("replica-0"), "a")
    source.replicas["replica-1"] = (start("replica-1"), "a")
    membership = ElasticMembership(
        source,
        HeadRecordFile(tmp_path / "gateway" / "head.json"),
        start_identity=base,
        transition="sync",
        poll_interval_s=0.05,
    )
    membership.start()
    try:
        membership.wait_until(num_admitted=2, timeout_s=60)
        app = create_gateway_app([], api_key=None, max_body_bytes=1 << 20, membership=membership)
        with ServerThread(app) as url:
            answer = httpx.post(f"{url}{HOT_LOAD}", json=request(client, d1), timeout=30.0)
            assert answer.status_code == 200, answer.text
            assert answer.json()["membership"]["admitted"] == ["replica-0", "replica-1"]
            wait_for(
                lambda: all(
                    r["current_snapshot_identity"] == d1 and r["membership"] == "admitted"
                    for r in status(url).values()
                ),
                "both replicas admitted at d1",
            )
            # A replica that starts from the base, one version behind: not admitted (sync
            # allows none) until the membership has replayed d1 into it.
            source.replicas["replica-2"] = (start("replica-2"), "a")
            seen: set[tuple[str | None, str]] = set()

            def late_admitted() -> bool:
                entry = status(url).get("replica-2")
                if entry is None:
                    return False
                seen.add((entry["current_snapshot_identity"], entry["membership"]))
                return entry["membership"] == "admitted"

            wait_for(late_admitted, "replica-2 admitted")
            assert (base, "admitted") not in seen
            assert status(url)["replica-2"]["current_snapshot_identity"] == d1
            ledger = httpx.get(f"{url}/hot_load/v1/ledger", timeout=30.0).json()
            late = next(r for r in ledger["replicas"] if r["replica_id"] == "replica-2")
            assert [e["identity"] for e in late["entries"]][-1] == d1
            # A replica whose server stops is missing; the next hot-load counts the others.
            servers["replica-1"].stop()
            wait_for(
                lambda: status(url)["replica-1"]["membership"] == "missing", "replica-1 missing"
            )
            answer = httpx.post(f"{url}{HOT_LOAD}", json=request(client, d2), timeout=30.0)
            assert answer.status_code == 200, answer.text
            view = answer.json()["membership"]
            assert view["admitted"] == ["replica-0", "replica-2"]
            assert view["missing"] == ["replica-1"]
            assert view["head_snapshot_identity"] == d2
            assert (
                HeadRecordFile(tmp_path / "gateway" / "head.json")
                .load(start_identity="unused")
                .head
                == d2
            )
            # Status lists the admitted replicas first (the Fireworks SDK reads the first).
            order = [r["replica_id"] for r in httpx.get(f"{url}{HOT_LOAD}").json()["replicas"]]
            assert order[-1] == "replica-1"
    finally:
        membership.stop()


def test_a_replica_that_cannot_catch_up_stays_out_and_status_says_why(
    tmp_path: Path, chain: tuple[TrainingClient, list[str]], replicas: Any
) -> None:
    import shutil

    client, (base, d1, _) = chain
    start, _ = replicas
    source = Source()
    source.replicas["replica-0"] = (start("replica-0"), "a")
    membership = ElasticMembership(
        source,
        HeadRecordFile(tmp_path / "gateway" / "head.json"),
        start_identity=base,
        transition="async",
        poll_interval_s=0.05,
    )
    membership.start()
    try:
        membership.wait_until(num_admitted=1, timeout_s=60)
        app = create_gateway_app([], api_key=None, max_body_bytes=1 << 20, membership=membership)
        with ServerThread(app) as url:
            answer = httpx.post(f"{url}{HOT_LOAD}", json=request(client, d1), timeout=30.0)
            assert answer.status_code == 200, answer.text
            wait_for(
                lambda: status(url)["replica-0"]["current_snapshot_identity"] == d1,
                "replica-0 at d1",
            )
            # The chain's delta is gone from storage: a late replica cannot verify it.
            shutil.rmtree(tmp_path / "store" / d1)
            source.replicas["replica-1"] = (start("replica-1"), "a")

            def reason() -> str:
                entry = status(url).get("replica-1") or {}
                return str(entry.get("degraded") or entry.get("loading_state", {}).get("error"))

            wait_for(lambda: d1 in reason(), "replica-1's reason naming d1")
            entry = status(url)["replica-1"]
            assert entry["membership"] == "catching_up"
            assert entry["current_snapshot_identity"] == base
            assert membership.view().admitted == ["replica-0"]
            served = {
                httpx.post(
                    f"{url}/v1/completions",
                    json={"model": "tiny", "prompt": "ab", "max_tokens": 2, "temperature": 0},
                    timeout=60.0,
                ).json()["snapshot_identity"]
                for _ in range(4)  # round robin would reach replica-1 if it were admitted
            }
            assert served == {d1}
    finally:
        membership.stop()


def adapter_answer(url: str, model: str) -> tuple[list[int], list[float]]:
    """A greedy completion's token ids and logprobs (compared exactly across replicas)."""
    answer = httpx.post(
        f"{url}/v1/completions",
        json={
            "model": model, "prompt": "ab", "max_tokens": 4, "temperature": 0,
            "logprobs": 1, "return_token_ids": True,
        },
        timeout=60.0,
    )  # fmt: skip
    assert answer.status_code == 200, answer.text
    (choice,) = answer.json()["choices"]
    return list(choice["token_ids"]), list(choice["logprobs"]["token_logprobs"])


def save_adapter(client: TrainingClient, tmp_path: Path) -> str:
    """A LoRA adapter of the tiny model, saved to `client`'s storage, that changes outputs."""
    lora_client = TrainingClient(
        build_model("tiny", seed=0),
        storage=client.storage.url,
        lora_rank=4,
        tokenizer_dir=build_tokenizer(tmp_path / "lora-tok"),
    )
    with torch.no_grad():  # PEFT starts lora_B at zero
        for name, p in lora_client.model.named_parameters():
            if "lora_B" in name:
                p.add_(torch.randn_like(p) * 0.5)
    adapter = lora_client.save_weights_for_sampler_ext("adapter").snapshot_name
    assert client.store.read_manifest(adapter).kind == "lora"
    return adapter


def adapter_membership(
    source: Source, head_file: HeadRecordFile, base: str, client: TrainingClient, **options: Any
) -> ElasticMembership:
    """The async membership of the adapter tests: it tells adapters by their manifests' kind."""
    return ElasticMembership(
        source,
        head_file,
        start_identity=base,
        transition="async",
        poll_interval_s=0.05,
        is_adapter=lambda identity: client.store.read_manifest(identity).kind == "lora",
        **options,
    )


def test_a_late_replica_loads_the_deployments_adapters_before_it_is_admitted(
    tmp_path: Path, chain: tuple[TrainingClient, list[str]], replicas: Any
) -> None:
    client, (base, d1, _) = chain
    start, _ = replicas
    adapter = save_adapter(client, tmp_path)
    source = Source()
    source.replicas["replica-0"] = (start("replica-0"), "a")
    head_file = HeadRecordFile(tmp_path / "gateway" / "head.json")
    membership = adapter_membership(source, head_file, base, client)
    membership.start()
    try:
        membership.wait_until(num_admitted=1, timeout_s=60)
        app = create_gateway_app([], api_key=None, max_body_bytes=1 << 20, membership=membership)
        with ServerThread(app) as url:
            for body in (request(client, d1), {"identity": adapter}):
                answer = httpx.post(f"{url}{HOT_LOAD}", json=body, timeout=30.0)
                assert answer.status_code == 200, answer.text
                wait_for(
                    lambda: status(url)["replica-0"]["loading_state"]["stage"] == "ready",
                    f"replica-0 loaded {body['identity']}",
                )
            entry = status(url)["replica-0"]
            assert entry["current_snapshot_identity"] == d1  # the adapter left the head alone
            assert [a["identity"] for a in entry["loaded_adapters"]] == [adapter]
            recorded = head_file.load(start_identity="unused")
            assert recorded.head == d1 and recorded.adapter_identities == [adapter]
            old_url = entry["url"]
            expected = adapter_answer(old_url, adapter)
            assert expected != adapter_answer(old_url, "tiny"), "the adapter changes nothing"
            # A replica that starts from the base: the chain, then the adapter, then traffic.
            source.replicas["replica-1"] = (start("replica-1"), "a")
            seen: list[tuple[str | None, list[str], str]] = []

            def late_admitted() -> bool:
                late = status(url).get("replica-1")
                if late is None:
                    return False
                loaded = [a["identity"] for a in late["loaded_adapters"]]
                seen.append((late["current_snapshot_identity"], loaded, late["membership"]))
                return late["membership"] == "admitted"

            wait_for(late_admitted, "replica-1 admitted")
            assert all(loaded == [adapter] for _, loaded, state in seen if state == "admitted")
            assert seen[-1][:2] == (d1, [adapter])
            late = status(url)["replica-1"]
            assert adapter_answer(late["url"], adapter) == expected  # bit for bit
            ledger = httpx.get(f"{url}/hot_load/v1/ledger", timeout=30.0).json()
            loads = next(r for r in ledger["replicas"] if r["replica_id"] == "replica-1")
            assert [e["identity"] for e in loads["entries"]][-2:] == [d1, adapter]
            # Through the gateway (round robin over both), every answer is the adapter's.
            assert {tuple(map(tuple, adapter_answer(url, adapter))) for _ in range(4)} == {
                tuple(map(tuple, expected))
            }
    finally:
        membership.stop()


def test_an_adapter_that_failed_to_load_everywhere_does_not_keep_a_late_replica_out(
    tmp_path: Path, chain: tuple[TrainingClient, list[str]], replicas: Any
) -> None:
    client, (base, _, _) = chain
    start, _ = replicas
    adapter = save_adapter(client, tmp_path)
    # Its manifest reads (the hot-load is accepted), its weights are gone (the load fails).
    (tmp_path / "store" / adapter / "adapter_model.safetensors").unlink()
    source = Source()
    source.replicas["replica-0"] = (start("replica-0"), "a")
    head_file = HeadRecordFile(tmp_path / "gateway" / "head.json")
    membership = adapter_membership(source, head_file, base, client)
    membership.start()
    try:
        membership.wait_until(num_admitted=1, timeout_s=60)
        app = create_gateway_app([], api_key=None, max_body_bytes=1 << 20, membership=membership)
        with ServerThread(app) as url:
            answer = httpx.post(f"{url}{HOT_LOAD}", json={"identity": adapter}, timeout=30.0)
            assert answer.status_code == 200, answer.text
            wait_for(
                lambda: status(url)["replica-0"]["loading_state"]["stage"] == "error",
                "replica-0's adapter load failed",
            )
            assert status(url)["replica-0"]["loading_state"]["target_snapshot_identity"] == adapter
            wait_for(
                lambda: head_file.load(start_identity="unused").adapters == (),
                "the failed adapter forgotten by the head record",
            )
            source.replicas["replica-1"] = (start("replica-1"), "a")
            wait_for(
                lambda: status(url).get("replica-1", {}).get("membership") == "admitted",
                "replica-1 admitted",
            )
            late = status(url)["replica-1"]
            assert late["loaded_adapters"] == [] and late["current_snapshot_identity"] == base
    finally:
        membership.stop()


def test_a_completion_naming_an_adapter_goes_only_to_replicas_that_hold_it(
    tmp_path: Path, chain: tuple[TrainingClient, list[str]], replicas: Any
) -> None:
    """Past --max-adapters the replicas differ in which adapters they hold (each keeps its
    newest by use, the record its newest by load): a completion naming one is answered by a
    replica that holds it, 425 while the only ones are loading it, 404 when none has it —
    never by a replica that would serve it with the base weights."""
    client, (base, _, _) = chain
    start, _ = replicas
    first, second, third = (save_adapter(client, tmp_path / f"a{i}") for i in range(3))
    stalls: dict[str, threading.Event] = {}

    def on_stage(stage: str, identity: str) -> None:
        if stage == "fetching" and identity in stalls:
            stalls[identity].wait(60)

    source = Source()
    source.replicas["replica-0"] = (start("replica-0", on_stage, max_adapters=2), "a")
    head_file = HeadRecordFile(tmp_path / "gateway" / "head.json")
    membership = adapter_membership(source, head_file, base, client, max_adapters=2)
    membership.start()
    try:
        membership.wait_until(num_admitted=1, timeout_s=60)
        app = create_gateway_app([], api_key=None, max_body_bytes=1 << 20, membership=membership)
        with ServerThread(app) as url:

            def hot_load_adapter(adapter: str) -> None:
                answer = httpx.post(f"{url}{HOT_LOAD}", json={"identity": adapter}, timeout=30.0)
                assert answer.status_code == 200, answer.text

            def holders(adapter: str) -> set[str]:
                return {
                    r for r, e in status(url).items()
                    if adapter in [a["identity"] for a in e["loaded_adapters"]]
                }  # fmt: skip

            for adapter in (first, second):
                hot_load_adapter(adapter)
                wait_for(lambda: holders(adapter) == {"replica-0"}, f"{adapter} loaded")  # noqa: B023
            zero = status(url)["replica-0"]["url"]
            expected_first = adapter_answer(zero, first)  # now replica-0's newest by use
            assert expected_first != adapter_answer(zero, "tiny"), "the adapter changes nothing"
            # The third unloads the second there (least recently used); the record drops the
            # first (least recently loaded), then the second (no admitted replica holds it).
            hot_load_adapter(third)
            wait_for(lambda: holders(third) == {"replica-0"}, "the third adapter loaded")
            wait_for(
                lambda: head_file.load(start_identity="unused").adapter_identities == [third],
                "the record down to the third adapter",
            )
            assert [a["identity"] for a in status(url)["replica-0"]["loaded_adapters"]] == [
                first, third,
            ]  # fmt: skip
            # A late replica loads the record's adapter only: it never loaded the first.
            source.replicas["replica-1"] = (start("replica-1", on_stage, max_adapters=2), "a")
            wait_for(
                lambda: status(url).get("replica-1", {}).get("membership") == "admitted",
                "replica-1 admitted",
            )
            assert holders(third) == {"replica-0", "replica-1"}
            one = status(url)["replica-1"]["url"]
            assert adapter_answer(one, first) == adapter_answer(one, "tiny")  # the gap itself
            # Through the gateway (round robin over both) the first is always the adapter's.
            for _ in range(4):
                assert adapter_answer(url, first) == expected_first
            # The second: replica-0 unloaded it, replica-1 never had it.
            for _ in range(2):
                refused = httpx.post(
                    f"{url}/v1/completions",
                    json={"model": second, "prompt": "ab", "max_tokens": 2},
                    timeout=60.0,
                )
                assert refused.status_code == 404, refused.text
                message = refused.json()["error"]["message"]
                assert second in message and "hot-load it again" in message
            # Hot-loaded again: 425 while every replica is still fetching it, then served by
            # both, bit for bit.
            stalls[second] = threading.Event()
            hot_load_adapter(second)
            wait_for(
                lambda: all(
                    e["loading_state"]["target_snapshot_identity"] == second
                    for e in status(url).values()
                ),
                "both replicas loading the second adapter",
            )
            early = httpx.post(
                f"{url}/v1/completions",
                json={"model": second, "prompt": "ab", "max_tokens": 2},
                timeout=60.0,
            )
            assert early.status_code == 425, early.text
            assert early.headers["retry-after"] == "1"
            assert "still loading" in early.json()["error"]["message"]
            stalls.pop(second).set()
            wait_for(lambda: holders(second) == {"replica-0", "replica-1"}, "the second loaded")
            expected_second = adapter_answer(zero, second)
            assert adapter_answer(one, second) == expected_second
            for _ in range(4):
                assert adapter_answer(url, second) == expected_second
            # replica-0 kept the first (used through the gateway) and dropped the third; the
            # third is replica-1's only: answered there, through the gateway, every time.
            assert holders(third) == {"replica-1"}
            expected_third = adapter_answer(one, third)
            for _ in range(4):
                assert adapter_answer(url, third) == expected_third
            # A gateway without Ray replicas has no scale route; the manager says so.
            manager = DeploymentManager(
                base_url=url, registry_dir=tmp_path / "registry", stop_on_exit=False
            )
            try:
                with pytest.raises(UnsupportedOperationError, match="Only a deployment on Ray"):
                    manager.scale(None, 2)
            finally:
                manager.close()
    finally:
        for stall in stalls.values():
            stall.set()
        membership.stop()
