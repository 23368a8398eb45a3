"""Pattern 5: LoRA — every save a standalone adapter, loaded as an adapter, sampled by name."""

from __future__ import annotations

import pytest
import torch

from _support.training import PROMPT, reference_logprobs, reference_model, train_step
from weightsync import WeightSyncer

pytestmark = pytest.mark.timeout(240)


def test_lora_every_save_is_a_standalone_adapter(
    make_client, start_deployment, deploy_mgr, tokenizer
):
    deployment_id = start_deployment()
    client = make_client(lora_rank=4, lr=5e-2)
    syncer = WeightSyncer(
        policy_client=client,
        deploy_mgr=deploy_mgr,
        deployment_id=deployment_id,
        lora_rank=4,
        warmup_retry_interval_s=0.05,
    )
    base_sampler = syncer.get_deployment_sampler(tokenizer=tokenizer)
    [base] = base_sampler.sample(messages=PROMPT, max_tokens=6, temperature=0.0)
    for step in range(2):
        train_step(client, tokenizer)
        # An explicit delta is overridden: LoRA adapters are always standalone.
        identity = syncer.save_and_hotload(f"lora-{step:05d}", checkpoint_type="delta")
        assert syncer.last_timing.checkpoint_type == "base"
        manifest = client.store.read_manifest(identity)
        assert manifest.kind == "lora" and manifest.parent is None
        status = deploy_mgr.hotload_check_status(deployment_id)
        for replica in status["replicas"]:
            names = [
                a if isinstance(a, str) else a.get("identity") or a.get("name")
                for a in replica["loaded_adapters"]
            ]
            assert identity in names
        sampler = syncer.get_deployment_sampler(tokenizer=tokenizer)
        assert sampler.model == identity
        [sample] = sampler.sample(messages=PROMPT, max_tokens=6, temperature=0.0)
        expected = reference_logprobs(
            reference_model(client), sample.prompt_token_ids, sample.token_ids
        )
        torch.testing.assert_close(torch.tensor(sample.logprobs), expected, atol=3e-2, rtol=0)
    assert sample.logprobs != base.logprobs  # the adapter changes what is served
