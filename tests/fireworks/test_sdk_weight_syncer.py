"""The Fireworks SDK's own `WeightSyncer` and `DeploymentManager`, with their defaults,
against real `weightsync serve` processes (1 and 2 replicas), weightsync's `TrainingClient`
as the policy client. After every sync the served weights are the trainer's, bit for bit.

The SDK polls hot-load status every 5 s and retries warmup every 10 s: each test is
bounded by `pytest.mark.timeout`, and its waits by the SDK's own timeout arguments.
"""

from __future__ import annotations

import httpx
import pytest
from fireworks.training.sdk import WeightSyncer as SdkWeightSyncer

from _support.fireworks_sdk import (
    SDK_TIMING_KEYS,
    assert_serves_trainer_bits,
    sdk_manager,
    served_checksums,
    serving,
)
from _support.training import train_step

pytestmark = pytest.mark.timeout(300)


def _sdk_syncer(client, mgr, deployment_id, **options):
    options.setdefault("hotload_timeout", 60)
    return SdkWeightSyncer(
        policy_client=client,
        deploy_mgr=mgr,
        deployment_id=deployment_id,
        base_model="tiny",
        **options,
    )


@pytest.mark.parametrize("deployment", ["one_replica", "two_replicas"])
def test_base_then_arc_v2_deltas_then_reset_are_served_bit_exactly(
    deployment, request, make_client, tokenizer
):
    deployment_id, url = request.getfixturevalue(deployment)
    num_replicas = 1 if deployment == "one_replica" else 2
    mgr = sdk_manager(url)
    client = make_client()
    syncer = _sdk_syncer(client, mgr, deployment_id)
    syncer.wait_for_hotload_ready(timeout_s=30, poll_interval_s=1)

    saved: list[str] = []
    for step in range(3):
        train_step(client, tokenizer)
        identity = syncer.save_and_hotload(f"sdk-{step:05d}")
        assert identity == f"sdk-{step:05d}-{client.session_id}"
        assert set(syncer.last_timing) >= SDK_TIMING_KEYS
        manifest = client.store.read_manifest(identity)
        if step == 0:
            assert manifest.kind == "base"
        else:  # the SDK's default codec, written by weightsync's client by default
            assert manifest.kind == "delta" and manifest.parent == saved[-1]
            assert manifest.compression_format == "arc_v2"
        assert syncer.base_identity == identity
        assert syncer.check_deployment_state() == identity
        assert serving(url) == {identity}
        assert_serves_trainer_bits(url, client, num_replicas)
        saved.append(identity)

    # reset_delta_chain(): the SDK's next save is a base, and it loads.
    syncer.reset_delta_chain()
    train_step(client, tokenizer)
    identity = syncer.save_and_hotload("sdk-reset")
    assert client.store.read_manifest(identity).kind == "base"
    assert serving(url) == {identity}
    assert_serves_trainer_bits(url, client, num_replicas)
    mgr.close()


def test_refused_delta_raises_and_the_sdks_recovery_is_reset_then_base(
    one_replica, make_client, tokenizer
):
    deployment_id, url = one_replica
    mgr = sdk_manager(url)
    client = make_client()
    syncer = _sdk_syncer(client, mgr, deployment_id)
    train_step(client, tokenizer)
    syncer.save_and_hotload("mine-00000")

    # Another trainer loads its own base: this chain's next delta has the wrong parent.
    other = make_client(seed=3)
    train_step(other, tokenizer)
    theirs = _sdk_syncer(other, mgr, deployment_id).save_and_hotload("theirs-00000")

    train_step(client, tokenizer)
    with pytest.raises(httpx.HTTPStatusError) as info:
        syncer.save_and_hotload("mine-00001")  # the SDK re-raises the refusal
    assert info.value.response.status_code == 409
    reason = info.value.response.text  # the server says which parent and what it serves
    assert f"mine-00001-{client.session_id}" in reason and theirs in reason
    assert serving(url) == {theirs}  # it kept serving what it had
    assert_serves_trainer_bits(url, other, 1)

    # The SDK's way back: reset the chain, the next save is a base.
    syncer.reset_delta_chain()
    train_step(client, tokenizer)
    identity = syncer.save_and_hotload("mine-00002")
    assert client.store.read_manifest(identity).kind == "base"
    assert serving(url) == {identity}
    assert_serves_trainer_bits(url, client, 1)
    mgr.close()


def test_a_corrupted_delta_fails_and_the_old_weights_keep_serving(
    one_replica, make_client, tokenizer
):
    deployment_id, url = one_replica
    mgr = sdk_manager(url)
    client = make_client()
    syncer = _sdk_syncer(client, mgr, deployment_id, hotload_timeout=30)
    train_step(client, tokenizer)
    good = syncer.save_and_hotload("good-00000")
    good_bits = dict(next(iter(served_checksums(url).values())))

    train_step(client, tokenizer)
    delta = syncer.save_only("bad-00001")  # the split form: save, then hot-load
    manifest = client.store.read_manifest(delta)
    assert manifest.kind == "delta"
    payload = max(manifest.files, key=lambda f: manifest.files[f].size_bytes)
    path = client.store.storage.local_path(f"{delta}/{payload}")
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF  # one flipped byte, same size
    path.write_bytes(bytes(data))

    assert syncer.hotload(delta, "delta") is False
    assert delta in (mgr.last_hotload_error_message or "")
    assert serving(url) == {good}
    assert next(iter(served_checksums(url).values())) == good_bits

    syncer.reset_delta_chain()
    identity = syncer.save_and_hotload("fixed-00002")
    assert serving(url) == {identity}
    assert_serves_trainer_bits(url, client, 1)
    mgr.close()


def test_lora_adapters_load_as_standalone_snapshots(serve, make_client, tokenizer):
    deployment_id, url = serve(1)
    mgr = sdk_manager(url)
    client = make_client(lora_rank=4)
    syncer = _sdk_syncer(client, mgr, deployment_id, lora_rank=4, hotload_timeout=30)
    for step in range(2):
        train_step(client, tokenizer)
        identity = syncer.save_and_hotload(f"lora-{step:05d}")
        manifest = client.store.read_manifest(identity)
        assert manifest.kind == "lora" and manifest.parent is None
        [replica] = mgr.hotload_check_status(deployment_id, "tiny")["replicas"]
        assert {"identity": identity, "status": "loaded"} in replica["loaded_adapters"] or (
            replica["current_snapshot_identity"] == identity
        )
    mgr.close()
