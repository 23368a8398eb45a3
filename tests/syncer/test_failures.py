"""Failures against a real local deployment: each gives the documented return or exception."""

from __future__ import annotations

import logging
import socket

import pytest

from _support.deployments import serving
from _support.training import PROMPT, reference_logprobs, reference_model, train_step
from weightsync import WeightSyncer
from weightsync.deployment import DeploymentManager, RetryPolicy
from weightsync.errors import (
    DeploymentError,
    HotloadRefusedError,
    HotloadTimeoutError,
)

pytestmark = pytest.mark.timeout(240)


@pytest.fixture
def deployment_id(shared_deployment):
    return shared_deployment


def _syncer(client, deploy_mgr, deployment_id, **kwargs):
    kwargs.setdefault("warmup_retry_interval_s", 0.05)
    return WeightSyncer(
        policy_client=client, deploy_mgr=deploy_mgr, deployment_id=deployment_id, **kwargs
    )


def _take_over(make_client, deploy_mgr, deployment_id, tokenizer):
    """Another trainer loads its own base: the first one's chain no longer matches."""
    other = make_client(seed=3)
    train_step(other, tokenizer)
    return _syncer(other, deploy_mgr, deployment_id).save_and_hotload("other")


def test_refused_delta_raises_with_identity_status_and_advice(
    make_client, deploy_mgr, deployment_id, tokenizer, caplog
):
    client = make_client()
    syncer = _syncer(client, deploy_mgr, deployment_id)  # the reference: no recovery
    assert syncer.recover_with_base is False
    train_step(client, tokenizer)
    syncer.save_and_hotload("mine-00000")
    theirs = _take_over(make_client, deploy_mgr, deployment_id, tokenizer)

    train_step(client, tokenizer)
    with pytest.raises(HotloadRefusedError) as info:
        syncer.save_and_hotload("mine-00001")  # automatic: a delta, the syncer asks nobody
    message = str(info.value)
    delta = f"mine-00001-{client.session_id}"
    assert delta in message and theirs in message  # expected identity, what it serves
    assert "Deployment reports" in message and "reset_delta_chain()" in message
    assert serving(deploy_mgr, deployment_id) == {theirs}  # it kept serving its snapshot
    assert syncer.deployed_snapshot is None and syncer.base_identity is None
    assert syncer.last_timing["checkpoint_type"] == "delta"
    assert syncer.last_timing["total_time_s"] >= syncer.last_timing["save_time_s"] > 0

    # The split form returns False for the same refusal.
    assert syncer.hotload(delta, checkpoint_type="delta") is False
    # The automatic check: the next save is a base, which loads.
    train_step(client, tokenizer)
    identity = syncer.save_and_hotload("mine-00002")
    assert syncer.last_timing.checkpoint_type == "base"
    assert serving(deploy_mgr, deployment_id) == {identity}


def test_refused_delta_recovers_with_a_base_once(
    make_client, deploy_mgr, deployment_id, tokenizer, caplog
):
    client = make_client()
    syncer = _syncer(client, deploy_mgr, deployment_id, recover_with_base=True)  # opt-in
    train_step(client, tokenizer)
    syncer.save_and_hotload("rec-00000")
    _take_over(make_client, deploy_mgr, deployment_id, tokenizer)
    train_step(client, tokenizer)
    with caplog.at_level(logging.ERROR):
        identity = syncer.save_and_hotload("rec-00001", checkpoint_type="delta")
    assert identity == f"rec-00001-base-{client.session_id}"
    assert syncer.last_timing.recovered is True
    assert syncer.last_timing.checkpoint_type == "base"
    assert "recovering" in caplog.text
    assert serving(deploy_mgr, deployment_id) == {identity}
    assert syncer.deployed_snapshot == identity
    # Sync continues with deltas on top of the recovery base.
    train_step(client, tokenizer)
    syncer.save_and_hotload("rec-00002")
    assert syncer.last_timing.checkpoint_type == "delta"
    assert syncer.last_timing.recovered is False


def test_asking_before_each_save_saves_a_base_instead_of_a_refused_delta(
    make_client, deploy_mgr, deployment_id, tokenizer, caplog
):
    client = make_client()
    syncer = _syncer(client, deploy_mgr, deployment_id, check_deployment_before_save=True)
    train_step(client, tokenizer)
    syncer.save_and_hotload("ask-00000")
    theirs = _take_over(make_client, deploy_mgr, deployment_id, tokenizer)

    train_step(client, tokenizer)
    with caplog.at_level(logging.WARNING):
        identity = syncer.save_and_hotload("ask-00001")  # would be a delta; it asks first
    assert "saving a full base instead" in caplog.text and theirs in caplog.text
    assert syncer.last_timing.checkpoint_type == "base" and not syncer.last_timing.recovered
    assert identity == f"ask-00001-{client.session_id}"
    assert serving(deploy_mgr, deployment_id) == {identity}
    # An explicit delta is still sent, with the mismatch said before sending.
    _take_over(make_client, deploy_mgr, deployment_id, tokenizer)
    train_step(client, tokenizer)
    caplog.clear()
    with caplog.at_level(logging.WARNING), pytest.raises(HotloadRefusedError):
        syncer.save_and_hotload("ask-00002", checkpoint_type="Delta")
    assert "will likely be refused" in caplog.text


def test_corrupted_snapshot_is_not_loaded_and_old_weights_keep_serving(
    make_client, deploy_mgr, deployment_id, tokenizer
):
    client = make_client()
    syncer = _syncer(client, deploy_mgr, deployment_id)
    train_step(client, tokenizer)
    good = syncer.save_and_hotload("corrupt-00000")
    sampler = syncer.get_deployment_sampler(tokenizer=tokenizer)
    [before] = sampler.sample(messages=PROMPT, max_tokens=6, temperature=0.0)
    reference = reference_model(client)

    train_step(client, tokenizer)
    delta = syncer.save_only("corrupt-00001")
    manifest = client.store.read_manifest(delta)
    assert manifest.kind == "delta"
    payload = sorted(manifest.files)[0]
    path = client.store.storage.local_path(f"{delta}/{payload}")
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF  # one flipped byte, same size
    path.write_bytes(bytes(data))

    assert syncer.hotload(delta, checkpoint_type="delta") is False
    assert serving(deploy_mgr, deployment_id) == {good}
    assert syncer.deployed_snapshot is None
    [after] = sampler.sample(messages=PROMPT, max_tokens=6, temperature=0.0)
    assert after.snapshot_identity == good and after.token_ids == before.token_ids
    expected = reference_logprobs(reference, after.prompt_token_ids, after.token_ids)
    assert after.logprobs == pytest.approx(expected.tolist(), abs=2e-2)


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_warmup_never_answering_is_logged_not_raised(
    make_client, deploy_mgr, deployment_id, tokenizer, caplog
):
    mgr = DeploymentManager(
        registry_dir=deploy_mgr.registry.root,
        inference_url=f"http://127.0.0.1:{_closed_port()}",  # completions never answer
        retry=RetryPolicy(max_retries=0),
        stop_on_exit=False,
    )
    client = make_client()
    syncer = _syncer(client, mgr, deployment_id, warmup_max_retries=3)
    train_step(client, tokenizer)
    with caplog.at_level(logging.WARNING):
        identity = syncer.save_and_hotload("nowarm-00000")
    assert serving(deploy_mgr, deployment_id) == {identity}
    assert syncer.last_timing.warmed_up is False
    assert "did not answer HTTP 200 in 3 tries" in caplog.text
    mgr.close()


def test_hotload_timeout_names_the_identity_and_the_last_status(deploy_mgr, deployment_id):
    done = deploy_mgr.wait_for_hotload(
        deployment_id, "tiny", "never-sent", timeout_seconds=0.5, poll_interval=0.1
    )
    assert done is False  # the SDK's contract: False, and the reason kept on the manager
    error = deploy_mgr.last_hotload_error
    assert isinstance(error, HotloadTimeoutError) and isinstance(error, TimeoutError)
    assert "'never-sent'" in str(error) and "replica-0: serving" in str(error)
    assert deploy_mgr.last_hotload_error_message == str(error)


def test_deployment_down(make_client, start_deployment, deploy_mgr, tokenizer):
    deployment_id = start_deployment()
    url = deploy_mgr.get(deployment_id).url
    client = make_client()
    syncer = _syncer(client, deploy_mgr, deployment_id)
    train_step(client, tokenizer)
    syncer.save_and_hotload("down-00000")
    assert deploy_mgr.scale_to_zero(deployment_id) is True

    train_step(client, tokenizer)
    with pytest.raises(DeploymentError, match=f"{deployment_id}.*not running"):
        syncer.save_and_hotload("down-00001")
    assert syncer.hotload(syncer.last_saved_snapshot, "delta") is False

    # Addressed by URL, the same outage is a connection error, retried, then named.
    remote = DeploymentManager(
        base_url=url, retry=RetryPolicy(max_retries=1, backoff_s=0.01), stop_on_exit=False
    )
    fresh = _syncer(make_client(), remote, deployment_id)
    with pytest.raises(TimeoutError, match="not ready within 1s"):
        fresh.wait_for_hotload_ready(timeout_s=1, poll_interval_s=0.2)
    with pytest.raises(DeploymentError, match=r"failed after 2 attempt\(s\)"):
        remote.hotload(deployment_id, "tiny", "down-00000")
    remote.close()
