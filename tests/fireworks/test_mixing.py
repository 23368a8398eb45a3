"""The SDK's and weightsync's objects mix: the SDK's `WeightSyncer` drives weightsync's
`DeploymentManager`, and weightsync's `WeightSyncer` drives the SDK's `DeploymentManager`,
both against a real `weightsync serve`, the served weights equal to the trainer's bit for bit.
"""

from __future__ import annotations

import pytest
from fireworks.training.sdk import WeightSyncer as SdkWeightSyncer

from _support.fireworks_sdk import (
    API_KEY,
    SDK_TIMING_KEYS,
    assert_serves_trainer_bits,
    sdk_manager,
    serving,
)
from _support.training import train_step
from weightsync import DeploymentManager, WeightSyncer
from weightsync.errors import HotloadRefusedError

pytestmark = pytest.mark.timeout(300)


def test_the_sdks_weight_syncer_drives_weightsyncs_deployment_manager(
    two_replicas, make_client, tokenizer
):
    deployment_id, url = two_replicas
    mgr = DeploymentManager(API_KEY, base_url=url, stop_on_exit=False)
    client = make_client()
    syncer = SdkWeightSyncer(
        policy_client=client,
        deploy_mgr=mgr,
        deployment_id=deployment_id,
        base_model="tiny",
        hotload_timeout=60,
    )
    for step in range(2):
        train_step(client, tokenizer)
        identity = syncer.save_and_hotload(f"sdk-on-ours-{step:05d}")
        assert set(syncer.last_timing) >= SDK_TIMING_KEYS
        assert syncer.check_deployment_state() == identity
        assert serving(url) == {identity}
        assert_serves_trainer_bits(url, client, 2)
    # The SDK's syncer names the deployment from the account weightsync reports.
    assert mgr.account_id
    assert syncer.get_deployment_sampler(tokenizer).model == (
        f"accounts/{mgr.account_id}/deployments/{deployment_id}"
    )
    mgr.close()


def test_weightsyncs_weight_syncer_drives_the_sdks_deployment_manager(
    one_replica, make_client, tokenizer
):
    deployment_id, url = one_replica
    mgr = sdk_manager(url)
    client = make_client()
    syncer = WeightSyncer(
        client, mgr, deployment_id, "tiny", hotload_timeout=60, warmup_retry_interval_s=0.1
    )
    for step in range(2):
        train_step(client, tokenizer)
        identity = syncer.save_and_hotload(f"ours-on-sdk-{step:05d}")
        timing = syncer.last_timing
        assert timing.checkpoint_type == ("base" if step == 0 else "delta")
        assert set(timing) >= SDK_TIMING_KEYS and timing.warmed_up is True
        assert syncer.check_deployment_state() == identity
        assert serving(url) == {identity}
        assert_serves_trainer_bits(url, client, 1)

    # A delta the deployment refuses is raised as weightsync's error, naming both snapshots.
    other = make_client(seed=5)
    train_step(other, tokenizer)
    theirs = WeightSyncer(other, mgr, deployment_id, "tiny").save_and_hotload("theirs-00000")
    train_step(client, tokenizer)
    with pytest.raises(HotloadRefusedError) as info:
        syncer.save_and_hotload("ours-on-sdk-00002")
    assert f"ours-on-sdk-00002-{client.session_id}" in str(info.value)
    assert theirs in str(info.value)
    assert serving(url) == {theirs}
    mgr.close()
