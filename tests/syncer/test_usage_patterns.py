"""The reference's usage patterns against a real local deployment (one `weightsync serve`)."""

from __future__ import annotations

import asyncio

import pytest
import torch

from _support.deployments import serving
from _support.training import (
    PROMPT,
    reference_greedy,
    reference_logprobs,
    reference_model,
    train_step,
)
from weightsync import DEFAULT_CHECKSUM, WeightSyncer
from weightsync.codec import checksum_tensor

pytestmark = pytest.mark.timeout(240)

MAX_TOKENS = 8
# bf16 weights, fp32 log-softmax; the deployment decodes with a KV cache, the
# reference runs one full forward pass, so the last bits of the logits may differ.
LOGPROB_ATOL = 2e-2


@pytest.fixture
def deployment_id(shared_deployment):
    return shared_deployment


def _syncer(client, deploy_mgr, deployment_id, **kwargs):
    kwargs.setdefault("warmup_retry_interval_s", 0.05)
    return WeightSyncer(
        policy_client=client, deploy_mgr=deploy_mgr, deployment_id=deployment_id, **kwargs
    )


def _check_serves_trainer_weights(syncer, client, tokenizer, identity):
    """Greedy tokens equal the trainer's own; logprobs equal its forward pass."""
    sampler = syncer.get_deployment_sampler(tokenizer=tokenizer)
    [greedy] = sampler.sample(messages=PROMPT, max_tokens=MAX_TOKENS, temperature=0.0)
    model = reference_model(client)
    assert greedy.snapshot_identity == identity
    assert greedy.prompt_token_ids == sampler.render(PROMPT)
    assert greedy.token_ids == reference_greedy(model, greedy.prompt_token_ids, MAX_TOKENS)
    samples = asyncio.run(
        sampler.sample_with_tokens(messages=PROMPT, n=2, max_tokens=MAX_TOKENS, seed=1)
    )
    assert len(samples) == 2
    for sample in [greedy, *samples]:
        assert sample.snapshot_identity == identity
        assert len(sample.logprobs) == len(sample.token_ids) > 0
        expected = reference_logprobs(model, sample.prompt_token_ids, sample.token_ids)
        torch.testing.assert_close(
            torch.tensor(sample.logprobs), expected, atol=LOGPROB_ATOL, rtol=0
        )
    return greedy


def test_on_policy_sync_every_step(make_client, deploy_mgr, deployment_id, tokenizer):
    client = make_client()
    syncer = _syncer(client, deploy_mgr, deployment_id, base_model="tiny")
    previous = None
    for step in range(3):
        train_step(client, tokenizer)
        identity = syncer.save_and_hotload(f"step-{step:05d}")
        assert identity == f"step-{step:05d}-{client.session_id}"
        timing = syncer.last_timing
        # The SDK's dict: its four keys (seconds), ours beside them.
        assert isinstance(timing, dict)
        assert {"save_time_s", "hotload_time_s", "warmup_time_s", "total_time_s"} <= set(timing)
        assert timing.checkpoint_type == ("base" if step == 0 else "delta")
        assert syncer.deployed_snapshot == identity
        assert serving(deploy_mgr, deployment_id) == {identity}
        assert timing["save_time_s"] > 0 and timing["hotload_time_s"] > 0
        assert timing["total_time_s"] >= (
            timing["save_time_s"] + timing["hotload_time_s"] + timing["warmup_time_s"]
        )
        assert timing.warmed_up is True and timing.pause_s is not None
        assert timing.payload_bytes > 0 and timing.full_bytes > 0
        # Lossless: every served tensor's checksum is the trainer's bf16 export's.
        expected = {
            name: checksum_tensor(DEFAULT_CHECKSUM, t)
            for name, t in client.exported_weights().items()
        }
        served = deploy_mgr.weights_checksums(deployment_id, checksum_format=DEFAULT_CHECKSUM)
        assert served and all(checksums == expected for checksums in served.values())
        greedy = _check_serves_trainer_weights(syncer, client, tokenizer, identity)
        if previous is not None:
            assert greedy.logprobs != previous.logprobs  # the new weights really serve
        previous = greedy
    assert syncer.has_base
    ledger = deploy_mgr.ledger(deployment_id)
    loaded = [e["identity"] for e in ledger]
    assert loaded[-3:] == [f"step-{s:05d}-{client.session_id}" for s in range(3)]


def test_interval_sync_every_n_steps(make_client, deploy_mgr, deployment_id, tokenizer):
    client = make_client(seed=0)
    syncer = _syncer(client, deploy_mgr, deployment_id)
    synced = []
    for step in range(4):
        train_step(client, tokenizer)
        if (step + 1) % 2 == 0:
            synced.append(syncer.save_and_hotload(f"step-{step:05d}"))
            assert syncer.last_timing.checkpoint_type == ("base" if len(synced) == 1 else "delta")
    assert synced == [f"step-00001-{client.session_id}", f"step-00003-{client.session_id}"]
    # get_sampling_client(name) syncs the current weights first.
    train_step(client, tokenizer)
    sampler = syncer.get_sampling_client(tokenizer, name="final")
    final = f"final-{client.session_id}"
    assert syncer.deployed_snapshot == final
    assert sampler.sample(prompt_token_ids=[5, 6, 7], max_tokens=2)[0].snapshot_identity == final
    synced.append(final)
    manifest = client.store.read_manifest(synced[1])
    assert manifest.kind == "delta" and manifest.parent == synced[0]
    _check_serves_trainer_weights(syncer, client, tokenizer, synced[2])


def test_split_save_then_warmup_then_hotload(make_client, deploy_mgr, deployment_id, tokenizer):
    client = make_client()
    syncer = _syncer(client, deploy_mgr, deployment_id)
    train_step(client, tokenizer)
    snapshot = syncer.save_only("split-00000", checkpoint_type="BASE")  # any case, as the SDK
    assert snapshot == f"split-00000-{client.session_id}"
    assert syncer.last_timing.checkpoint_type == "base"
    assert "save_time_s" in syncer.last_timing and "hotload_time_s" not in syncer.last_timing
    assert syncer.deployed_snapshot is None and snapshot not in serving(deploy_mgr, deployment_id)
    assert deploy_mgr.warmup(deployment_id, max_retries=3, retry_interval_s=0.05) is True
    assert syncer.hotload(snapshot, checkpoint_type="base") is True
    assert serving(deploy_mgr, deployment_id) == {snapshot}
    assert syncer.deployed_snapshot == snapshot
    # A delta, split the same way: its manifest's parent is what the deployment serves.
    train_step(client, tokenizer)
    delta = syncer.save_only("split-00001", checkpoint_type="delta")
    assert syncer.hotload(delta, checkpoint_type="delta") is True
    assert syncer.last_timing.pause_s is not None
    greedy = _check_serves_trainer_weights(syncer, client, tokenizer, delta)
    # Without a tokenizer, messages go to the chat endpoint: same tokens, same snapshot.
    [chat] = syncer.get_deployment_sampler().sample(
        messages=PROMPT, max_tokens=MAX_TOKENS, temperature=0.0
    )
    assert chat.snapshot_identity == delta
    assert chat.token_ids == greedy.token_ids
    assert chat.logprobs == pytest.approx(greedy.logprobs, abs=1e-4)
    assert chat.text == tokenizer.decode(chat.token_ids, skip_special_tokens=True)


def test_dcp_resume_first_load_is_a_base(make_client, deploy_mgr, deployment_id, tokenizer):
    first = make_client()
    syncer = _syncer(first, deploy_mgr, deployment_id)
    train_step(first, tokenizer)
    syncer.save_and_hotload("run-00000")
    train_step(first, tokenizer)
    syncer.save_and_hotload("run-00001")
    state = first.save_state("run-00001")

    resumed = make_client(seed=1)  # different init: the state must overwrite it
    resumed.load_state_with_optimizer(state)
    assert resumed.session_id != first.session_id
    syncer2 = _syncer(resumed, deploy_mgr, deployment_id, first_checkpoint_type="delta")
    # The deployment serves a snapshot this session did not write: a base, automatically.
    identity = syncer2.save_and_hotload("resumed-00000")
    assert syncer2.last_timing.checkpoint_type == "base"
    _check_serves_trainer_weights(syncer2, resumed, tokenizer, identity)
    # The resumed weights are the first client's, bit for bit.
    for name, tensor in first.exported_weights().items():
        assert torch.equal(
            tensor.view(torch.int16), resumed.exported_weights()[name].view(torch.int16)
        )
    train_step(resumed, tokenizer)
    identity = syncer2.save_and_hotload("resumed-00001")
    assert syncer2.last_timing.checkpoint_type == "delta"
    # reset_delta_chain() makes the next one a base again.
    syncer2.reset_delta_chain()
    train_step(resumed, tokenizer)
    identity = syncer2.save_and_hotload("resumed-00002")
    assert syncer2.last_timing.checkpoint_type == "base"
    _check_serves_trainer_weights(syncer2, resumed, tokenizer, identity)


def test_full_snapshot_interval_saves_a_base_every_n(
    make_client, deploy_mgr, deployment_id, tokenizer
):
    client = make_client()
    syncer = _syncer(
        client, deploy_mgr, deployment_id, full_snapshot_interval=2, warmup_after_hotload=False
    )
    kinds = []
    for step in range(5):
        train_step(client, tokenizer)
        syncer.save_and_hotload(f"interval-{step:05d}")
        kinds.append(syncer.last_timing.checkpoint_type)
        assert syncer.last_timing.warmed_up is None
    assert kinds == ["base", "delta", "base", "delta", "base"]


def test_without_a_deployment_the_syncer_only_saves(make_client, tokenizer):
    client = make_client()
    syncer = WeightSyncer(client)
    assert not syncer.weight_sync_enabled
    identity = syncer.save_and_hotload("offline")
    assert identity == f"offline-{client.session_id}" and client.store.exists(identity)
    assert syncer.hotload(identity, "base") is False
    assert syncer.deployed_snapshot is None
