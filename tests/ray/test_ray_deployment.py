"""Replicas as Ray actors on a two-node local cluster, pulling from a loopback S3 server.

One cluster, one S3 bucket and one deployment serve the whole module, in order:
base + deltas to replicas on both nodes; a replica killed mid-chain restarts
and catches up before it takes traffic; a replica added after five deltas
serves the head; scaling down while a delta hot-loads leaves the rest at it; a
node removed leaves the other serving; a replica added on a new node serves
the deployment's LoRA adapter before it takes traffic, and scaling it away (the
gateway's scale route) drains it. Everything binds 127.0.0.1 (Ray's node
address included).
"""

from __future__ import annotations

import os
import secrets
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import torch

from _support.long_completion import LONG_MAX_TOKENS, LongCompletion

ray = pytest.importorskip("ray", reason="the 'ray' extra is not installed (pip install '.[ray]')")

from ray.cluster_utils import Cluster  # noqa: E402  (after the skip)

from weightsync.codec.checksums import checksum_tensor  # noqa: E402
from weightsync.deployment.ray_replicas import RayDeployment, RayPlacement  # noqa: E402
from weightsync.server.config import ReplicaConfig, ServedDeployment  # noqa: E402
from weightsync.server.runner import ServerThread  # noqa: E402
from weightsync.toymodel import build_model, build_tokenizer  # noqa: E402
from weightsync.trainer import TrainingClient  # noqa: E402

pytestmark = pytest.mark.timeout(300)

CHECKSUM = "blake3"
API_KEY = "ray-test-key"
HEADERS = {"Authorization": f"Bearer {API_KEY}"}
HOT_LOAD = "/hot_load/v1/models/hot_load"
NODE_ARGS: dict[str, Any] = {
    "node_ip_address": "127.0.0.1",
    "object_store_memory": 80 * 1024 * 1024,
}


class Trainer:
    """A real training client writing a base and deltas to S3; the bits each one should serve."""

    def __init__(self, storage: str, tok_dir: Path) -> None:
        self.model = build_model("tiny", seed=0)
        self.client = TrainingClient(self.model, storage=storage, tokenizer_dir=tok_dir)
        self.expected: dict[str, dict[str, str]] = {}
        self.chain: list[str] = []

    def save(self, name: str) -> str:
        if self.chain:
            with torch.no_grad():
                for p in self.model.parameters():
                    p.add_(torch.randn_like(p) * 1e-2)
        identity = self.client.save_weights_for_sampler_ext(name).snapshot_name
        exported = self.client.exported_weights()
        self.expected[identity] = {n: checksum_tensor(CHECKSUM, t) for n, t in exported.items()}
        self.chain.append(identity)
        return identity

    def request(self, identity: str) -> dict[str, Any]:
        manifest = self.client.store.read_manifest(identity)
        if manifest.parent is None:
            return {"identity": identity}
        metadata = {
            "previous_snapshot_identity": manifest.parent,
            "compression_format": manifest.compression_format,
            "checksum_format": manifest.checksum_format,
        }
        return {"identity": identity, "incremental_snapshot_metadata": metadata}


@pytest.fixture(scope="module")
def cluster(s3_endpoint_url: str) -> Iterator[tuple[Cluster, Any]]:
    """Two Ray nodes on 127.0.0.1: the head (1 CPU) and a worker (2 CPUs); S3 in the env."""
    env = {
        "AWS_ENDPOINT_URL": s3_endpoint_url,
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
    }
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)  # Ray's node processes and the actors inherit it
    cluster = Cluster(
        initialize_head=True,
        head_node_args={**NODE_ARGS, "num_cpus": 1, "include_dashboard": False},
    )
    worker = cluster.add_node(**NODE_ARGS, num_cpus=2)
    ray.init(address=cluster.address, namespace="weightsync-test")
    try:
        yield cluster, worker
    finally:
        ray.shutdown()
        cluster.shutdown()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@pytest.fixture(scope="module")
def trainer(cluster: object, tmp_path_factory: pytest.TempPathFactory) -> Trainer:
    import s3fs

    bucket = f"ray-{secrets.token_hex(4)}"
    s3fs.S3FileSystem(skip_instance_cache=True).mkdir(bucket)
    trainer = Trainer(f"s3://{bucket}/runs", build_tokenizer(tmp_path_factory.mktemp("tok")))
    trainer.save("base")
    return trainer


@pytest.fixture(scope="module")
def deployment(
    cluster: tuple[Cluster, Any], trainer: Trainer, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[RayDeployment, str]]:
    template = ReplicaConfig(
        storage=trainer.client.storage.url,
        snapshot=trainer.chain[0],
        model_name="tiny",
        deployment_id="ray-test",
        transition="async",
        engine_options={"num_threads": 1},
        api_key=API_KEY,
    )
    deployment = RayDeployment(
        template=template,
        placement=RayPlacement(address=cluster[0].address, num_cpus=1),
        state_dir=tmp_path_factory.mktemp("gateway"),
        served=ServedDeployment(deployment_id="ray-test", model_name="tiny"),
        api_key=API_KEY,
        max_body_bytes=8 * 1024 * 1024,
        host="127.0.0.1",
        poll_interval_s=0.1,
    )
    deployment.start(2, timeout_s=240)
    with ServerThread(deployment.app) as url:
        yield deployment, url
    deployment.stop()


def status(url: str) -> list[dict[str, Any]]:
    answer = httpx.get(f"{url}{HOT_LOAD}", headers=HEADERS, timeout=30.0)
    answer.raise_for_status()
    return list(answer.json()["replicas"])


def hot_load(url: str, trainer: Trainer, identity: str) -> dict[str, Any]:
    answer = httpx.post(
        f"{url}{HOT_LOAD}", json=trainer.request(identity), headers=HEADERS, timeout=60.0
    )
    assert answer.status_code == 200, answer.text
    return dict(answer.json())


def wait_all_at(url: str, identity: str, num_admitted: int, timeout_s: float = 120.0) -> None:
    """Until `num_admitted` replicas are admitted, idle, and serve `identity`."""
    deadline = time.monotonic() + timeout_s
    last: list[dict[str, Any]] = []
    while time.monotonic() < deadline:
        last = status(url)
        at = [
            r
            for r in last
            if r.get("membership") == "admitted"
            and r["current_snapshot_identity"] == identity
            and r["loading_state"]["stage"] in ("ready", "idle")
        ]
        if len(at) == num_admitted:
            return
        time.sleep(0.1)
    pytest.fail(f"{num_admitted} replicas did not serve {identity} in {timeout_s}s: {last}")


def served_checksums(url: str) -> dict[str, tuple[str | None, dict[str, str]]]:
    answer = httpx.get(
        f"{url}/hot_load/v1/weights",
        params={"checksum_format": CHECKSUM},
        headers=HEADERS,
        timeout=30.0,
    )
    answer.raise_for_status()
    return {
        r["replica_id"]: (r["current_snapshot_identity"], r["checksums"])
        for r in answer.json()["replicas"]
    }


def assert_serves_bits(url: str, trainer: Trainer, identity: str, replica_ids: set[str]) -> None:
    served = served_checksums(url)
    assert set(served) == replica_ids
    for replica_id, (current, checksums) in served.items():
        assert current == identity, replica_id
        assert checksums == trainer.expected[identity], f"{replica_id} serves other bits"


def complete(url: str) -> str:
    """One completion through the gateway; the snapshot identity that answered it."""
    answer = httpx.post(
        f"{url}/v1/completions",
        json={"model": "tiny", "prompt": "ab", "max_tokens": 2, "temperature": 0},
        headers=HEADERS,
        timeout=60.0,
    )
    assert answer.status_code == 200, answer.text
    return str(answer.json()["snapshot_identity"])


def test_base_and_deltas_reach_replicas_on_both_nodes(
    deployment: tuple[RayDeployment, str], trainer: Trainer
) -> None:
    ray_deployment, url = deployment
    nodes = ray_deployment.replicas.nodes()
    assert set(nodes) == {"replica-0", "replica-1"}
    assert nodes["replica-0"] != nodes["replica-1"], "SPREAD placed both replicas on one node"
    assert_serves_bits(url, trainer, trainer.chain[0], {"replica-0", "replica-1"})
    for name in ("d1", "d2"):
        identity = trainer.save(name)
        answer = hot_load(url, trainer, identity)
        assert {r["replica_id"] for r in answer["replicas"]} == {"replica-0", "replica-1"}
        assert answer["membership"]["admitted"] == ["replica-0", "replica-1"]
        assert answer["membership"]["head_snapshot_identity"] == identity
        wait_all_at(url, identity, 2)
        assert_serves_bits(url, trainer, identity, {"replica-0", "replica-1"})
    assert complete(url) == trainer.chain[-1]
    # The head is on the gateway's disk, in order, for replicas that start later.
    record = ray_deployment.membership.head_file.load(start_identity="unused")
    assert [link.identity for link in record.links] == trainer.chain


def test_killed_replica_restarts_and_catches_up_before_taking_traffic(
    deployment: tuple[RayDeployment, str], trainer: Trainer
) -> None:
    ray_deployment, url = deployment
    actor = ray_deployment.replicas.actor("replica-1")
    before = ray.get(actor.endpoint.remote(), timeout=30)
    ray.kill(actor, no_restart=False)  # a crash: Ray restarts it (max_restarts=-1)
    d3 = trainer.save("d3")
    answer = hot_load(url, trainer, d3)
    assert "replica-1" not in answer["membership"]["admitted"]
    wait_all_at(url, d3, 1)
    # From now on every answer must come from the head, whoever answers it.
    answered: list[str] = []
    failed: list[BaseException] = []
    stop = threading.Event()

    def traffic() -> None:
        while not stop.is_set():
            try:
                answered.append(complete(url))
            except (AssertionError, httpx.HTTPError) as e:
                failed.append(e)
                return

    sender = threading.Thread(target=traffic)
    sender.start()
    try:
        wait_all_at(url, d3, 2, timeout_s=180)
    finally:
        stop.set()
        sender.join(60)
    after = ray.get(actor.endpoint.remote(), timeout=30)
    assert after["incarnation"] != before["incarnation"], "replica-1 was not restarted"
    assert not failed, failed
    assert answered and set(answered) == {d3}
    assert_serves_bits(url, trainer, d3, {"replica-0", "replica-1"})
    ledger = httpx.get(f"{url}/hot_load/v1/ledger", headers=HEADERS, timeout=30.0).json()
    loads = {r["replica_id"]: [e["identity"] for e in r["entries"]] for r in ledger["replicas"]}
    assert loads["replica-1"][-1] == d3  # it replayed the chain up to the head itself


def test_replica_added_after_five_deltas_serves_the_head(
    deployment: tuple[RayDeployment, str], trainer: Trainer
) -> None:
    ray_deployment, url = deployment
    d4 = trainer.save("d4")
    hot_load(url, trainer, d4)
    wait_all_at(url, d4, 2)
    d5 = trainer.save("d5")
    assert len(trainer.chain) == 6  # the base and five deltas
    ray_deployment.scale(3)  # replica-2 starts from the head, d4 ...
    answer = hot_load(url, trainer, d5)  # ... while d5 is hot-loaded into the others
    assert "replica-2" not in answer["membership"]["admitted"]
    wait_all_at(url, d5, 3, timeout_s=180)
    assert_serves_bits(url, trainer, d5, {"replica-0", "replica-1", "replica-2"})
    nodes = ray_deployment.replicas.nodes()
    assert len(set(nodes.values())) == 2


def test_scaling_down_while_a_delta_hot_loads(
    deployment: tuple[RayDeployment, str], trainer: Trainer
) -> None:
    """3 → 2 replicas while a delta hot-loads: the load completes on the rest, which serve it
    bit for bit; status drops the stopped one; every answer meanwhile is the head or, under
    the async transition, the one version before it."""
    ray_deployment, url = deployment
    before = trainer.chain[-1]
    wait_all_at(url, before, 3)
    shrink = trainer.save("shrink")
    answered: list[str] = []
    failed: list[BaseException] = []
    stop = threading.Event()

    def traffic() -> None:
        while not stop.is_set():
            try:
                answered.append(complete(url))
            except (AssertionError, httpx.HTTPError) as e:
                failed.append(e)
                return

    answers: list[dict[str, Any]] = []

    def load() -> None:
        try:
            answers.append(hot_load(url, trainer, shrink))
        except (AssertionError, httpx.HTTPError) as e:
            failed.append(e)

    sender = threading.Thread(target=traffic)
    loader = threading.Thread(target=load)
    sender.start()
    try:
        loader.start()
        # Once the head moves, all three replicas were sent the delta and are loading it.
        deadline = time.monotonic() + 60
        while ray_deployment.membership.record.head != shrink and time.monotonic() < deadline:
            time.sleep(0.01)
        assert ray_deployment.membership.record.head == shrink, "no replica accepted the delta"
        ray_deployment.scale(2)  # replica-2, the newest, goes; the hot-load goes on
        loader.join(90)
        assert not loader.is_alive(), "the hot-load did not answer within 90s of a scale-down"
        wait_all_at(url, shrink, 2)
    finally:
        stop.set()
        sender.join(60)
    assert not failed, failed
    (answer,) = answers
    # Every replica accepted, replica-2 included: it stopped while the delta was in flight.
    assert {r["replica_id"] for r in answer["replicas"]} == {"replica-0", "replica-1", "replica-2"}
    assert answer["membership"]["head_snapshot_identity"] == shrink
    assert len(ray_deployment.replicas) == 2
    entries = status(url)
    assert {r["replica_id"] for r in entries} == {"replica-0", "replica-1"}
    assert all(r["membership"] == "admitted" for r in entries), entries
    assert_serves_bits(url, trainer, shrink, {"replica-0", "replica-1"})
    assert answered and set(answered) <= {before, shrink}, set(answered)
    assert complete(url) == shrink
    # Back to three (the cluster's three CPUs: one replica or more on each node, which the
    # next test needs; the newest went, wherever Ray had placed it).
    ray_deployment.scale(3)
    wait_all_at(url, shrink, 3, timeout_s=180)
    assert_serves_bits(url, trainer, shrink, {"replica-0", "replica-1", "replica-3"})
    assert len(set(ray_deployment.replicas.nodes().values())) == 2


def test_node_removed_leaves_the_rest_serving(
    deployment: tuple[RayDeployment, str], trainer: Trainer, cluster: tuple[Cluster, Any]
) -> None:
    ray_deployment, url = deployment
    test_cluster, worker = cluster
    nodes = ray_deployment.replicas.nodes()
    on_worker = {r for r, n in nodes.items() if n == worker.node_id}
    survivors = set(nodes) - on_worker
    assert on_worker and survivors
    test_cluster.remove_node(worker)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        entries = {r["replica_id"]: r for r in status(url)}
        if all(entries[r].get("membership") == "missing" for r in on_worker):
            break
        time.sleep(0.2)
    assert {r for r, e in entries.items() if e.get("membership") == "missing"} == on_worker
    assert complete(url) == trainer.chain[-1]
    d6 = trainer.save("d6")
    answer = hot_load(url, trainer, d6)
    # "Every replica accepted" meant the survivors; the answer says who was missing.
    assert set(answer["membership"]["admitted"]) == survivors
    assert set(answer["membership"]["missing"]) == on_worker
    wait_all_at(url, d6, len(survivors))
    assert complete(url) == d6
    ray_deployment.scale(len(survivors))
    assert {r["replica_id"] for r in status(url)} == survivors


def adapter_answer(url: str, adapter: str) -> tuple[list[int], list[float]]:
    """A greedy completion naming `adapter`: its token ids and logprobs (compared exactly)."""
    answer = httpx.post(
        f"{url}/v1/completions",
        json={
            "model": adapter, "prompt": "ab", "max_tokens": 4, "temperature": 0,
            "logprobs": 1, "return_token_ids": True,
        },
        headers=HEADERS,
        timeout=60.0,
    )  # fmt: skip
    assert answer.status_code == 200, answer.text
    (choice,) = answer.json()["choices"]
    return list(choice["token_ids"]), list(choice["logprobs"]["token_logprobs"])


def test_a_replica_added_later_serves_the_adapters_and_scaling_down_drains_it(
    deployment: tuple[RayDeployment, str],
    trainer: Trainer,
    cluster: tuple[Cluster, Any],
    tmp_path: Path,
) -> None:
    """A LoRA adapter hot-loaded into the deployment reaches a replica added later before it
    takes traffic (its answers bit-identical to the others'); removing that replica while a
    long streamed completion runs on it lets the completion finish whole."""
    ray_deployment, url = deployment
    cluster[0].add_node(**NODE_ARGS, num_cpus=2)  # room for one more replica
    head = trainer.chain[-1]
    before = {r["replica_id"] for r in status(url)}
    wait_all_at(url, head, len(before))
    lora = TrainingClient(
        build_model("tiny", seed=0),
        storage=trainer.client.storage.url,
        lora_rank=4,
        tokenizer_dir=build_tokenizer(tmp_path / "tok"),
    )
    with torch.no_grad():  # PEFT starts lora_B at zero: make the adapter change outputs
        for name, p in lora.model.named_parameters():
            if "lora_B" in name:
                p.add_(torch.randn_like(p) * 0.5)
    adapter = lora.save_weights_for_sampler_ext("adapter").snapshot_name
    hot_load(url, trainer, adapter)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        entries = status(url)
        if all([a["identity"] for a in r["loaded_adapters"]] == [adapter] for r in entries):
            break
        time.sleep(0.1)
    assert all([a["identity"] for a in r["loaded_adapters"]] == [adapter] for r in entries)
    record = ray_deployment.membership.head_file.load(start_identity="unused")
    assert record.head == head and record.adapter_identities == [adapter]
    expected = adapter_answer(entries[0]["url"], adapter)
    assert expected != adapter_answer(entries[0]["url"], "tiny"), "the adapter changes nothing"
    # Every answer naming the adapter, whichever replica gives it, is the adapter's.
    answered: list[tuple[list[int], list[float]]] = []
    failed: list[BaseException] = []
    stop = threading.Event()

    def traffic() -> None:
        while not stop.is_set():
            try:
                answered.append(adapter_answer(url, adapter))
            except (AssertionError, httpx.HTTPError) as e:
                failed.append(e)
                return

    sender = threading.Thread(target=traffic)
    sender.start()
    try:
        ray_deployment.scale(len(before) + 1)
        wait_all_at(url, head, len(before) + 1, timeout_s=180)
        (late,) = {r["replica_id"] for r in status(url)} - before
        # Round robin over the admitted replicas: the late one answers one in each cycle.
        target = len(answered) + 2 * (len(before) + 1)
        deadline = time.monotonic() + 60
        while len(answered) < target and not failed and time.monotonic() < deadline:
            time.sleep(0.05)
        assert len(answered) >= target or failed, "the traffic stalled"
    finally:
        stop.set()
        sender.join(60)
    assert not failed, failed
    assert answered and all(a == expected for a in answered), "an answer had other weights"
    entry = next(r for r in status(url) if r["replica_id"] == late)
    assert [a["identity"] for a in entry["loaded_adapters"]] == [adapter]
    assert adapter_answer(entry["url"], adapter) == expected  # bit for bit
    # The gateway's scale route: the API key as on every control route, a count >= 0.
    scale_url = f"{url}/hot_load/v1/deployment/scale"
    refused = httpx.post(scale_url, json={"replicas": len(before)}, timeout=30.0)
    assert refused.status_code == 401, refused.text
    refused = httpx.post(scale_url, json={"replicas": -1}, headers=HEADERS, timeout=30.0)
    assert refused.status_code == 400, refused.text
    assert len(ray_deployment.replicas) == len(before) + 1
    # One long completion per replica (round robin), the late one included; then scale it
    # away: the newest admitted replica goes, drained.
    completions = [LongCompletion(url, headers=HEADERS).start() for _ in range(len(before) + 1)]
    metrics = httpx.get(f"{entry['url']}/metrics", headers=HEADERS, timeout=30.0).text
    assert "weightsync_inference_running 1.0" in metrics, "no completion runs on the late one"
    scale_started = time.monotonic()
    answer = httpx.post(
        scale_url, json={"replicas": len(before)}, headers={"X-Api-Key": API_KEY}, timeout=120.0
    )
    assert answer.status_code == 200, answer.text
    scaled = answer.json()
    assert scaled["replicas"] == len(before)
    assert scaled["cancelled"] == {late: 0}  # its drain let the completion finish
    assert set(scaled["membership"]["admitted"]) == before
    for completion in completions:
        completion.join()
        assert completion.error is None, completion.error
        assert completion.done and completion.finish_reasons == ["length"]
        assert completion.tokens == LONG_MAX_TOKENS
        assert completion.last_chunk_at > scale_started, "it ended before the scale-down"
    assert {r["replica_id"] for r in status(url)} == before
    assert adapter_answer(url, adapter) == expected


def test_serve_with_ray_from_the_deployment_manager(
    cluster: tuple[Cluster, Any], trainer: Trainer, tmp_path: Path
) -> None:
    """`DeploymentConfig(ray_address=...)` runs `weightsync serve --ray`: a gateway here, the
    replica an actor on the cluster (no CPU reserved: the module's replicas hold them);
    `DeploymentManager.scale` resizes it through the gateway, drained by the configured
    bound (`--drain-timeout-s`)."""
    from weightsync.deployment import DeploymentConfig, DeploymentManager

    manager = DeploymentManager(registry_dir=tmp_path / "registry")
    config = DeploymentConfig(
        deployment_id="ray-cli",
        storage=trainer.client.storage.url,
        snapshot=trainer.chain[-1],
        api_key=API_KEY,
        model_name="tiny",
        ray_address=cluster[0].address,
        ray_num_cpus=0.0,
        ray_drain_timeout_s=5.0,
        extra_args=("--engine-threads", "1"),
    )
    try:
        info = manager.create_or_get(config)
        assert info.url is not None
        d7 = trainer.save("d7")
        metadata = trainer.request(d7)["incremental_snapshot_metadata"]
        assert manager.hotload_and_wait("ray-cli", "tiny", d7, metadata, timeout_seconds=120)
        (entry,) = status(info.url)
        assert entry["membership"] == "admitted"
        assert entry["current_snapshot_identity"] == d7
        assert_serves_bits(info.url, trainer, d7, {"replica-0"})
        grown = manager.scale("ray-cli", 2)
        assert grown.replicas == 2 and grown.cancelled == {}
        wait_all_at(info.url, d7, 2, timeout_s=180)  # the new one caught up to the head
        assert_serves_bits(info.url, trainer, d7, {"replica-0", "replica-1"})
        shrunk = manager.scale("ray-cli", 1)
        assert shrunk.replicas == 1 and shrunk.cancelled == {"replica-1": 0}
        assert [r["replica_id"] for r in status(info.url)] == ["replica-0"]
    finally:
        manager.delete("ray-cli")
        manager.close()
