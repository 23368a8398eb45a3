"""The SDK's `DeploymentSampler` and warmup against a real `weightsync serve`: the token ids
and logprobs it parses are what the trainer's own weights give (transformers reference).

The sampler retries 404/425 for about 50 s and streams (SSE): bounded by the test timeout.
"""

from __future__ import annotations

import asyncio

import pytest
from fireworks.training.sdk import DeploymentSampler as SdkDeploymentSampler
from fireworks.training.sdk import WeightSyncer as SdkWeightSyncer

from _support.fireworks_sdk import API_KEY, sdk_manager
from _support.training import (
    PROMPT,
    reference_greedy,
    reference_logprobs,
    reference_model,
    train_step,
)

pytestmark = pytest.mark.timeout(180)

MAX_TOKENS = 6
# bf16 weights, fp32 log-softmax; the deployment decodes with a KV cache, the
# reference runs one full forward pass, so the last bits of the logits may differ.
LOGPROB_ATOL = 2e-2


def test_sample_with_tokens_returns_the_trainers_tokens_and_logprobs(
    one_replica, make_client, tokenizer
):
    deployment_id, url = one_replica
    mgr = sdk_manager(url)
    client = make_client()
    syncer = SdkWeightSyncer(
        policy_client=client, deploy_mgr=mgr, deployment_id=deployment_id, base_model="tiny"
    )
    train_step(client, tokenizer)
    syncer.save_and_hotload("sampled-00000")
    model_name = f"accounts/{mgr.account_id}/deployments/{deployment_id}"
    assert mgr.warmup(model_name, max_retries=1, retry_interval_s=0.1) is True  # first try

    sampler = SdkDeploymentSampler(url, model_name, API_KEY, tokenizer=tokenizer)
    completions = asyncio.run(
        sampler.sample_with_tokens(
            PROMPT, n=2, max_tokens=MAX_TOKENS, temperature=0.0, logprobs=True
        )
    )
    assert len(completions) == 2
    reference = reference_model(client)
    prompt_ids = tokenizer.apply_chat_template(
        PROMPT, tokenize=True, add_generation_prompt=True, return_dict=False
    )
    for completion in completions:
        assert completion.full_tokens[: completion.prompt_len] == list(prompt_ids)
        tokens = completion.full_tokens[completion.prompt_len :]
        assert len(tokens) == completion.completion_len > 0
        assert tokens == reference_greedy(reference, list(prompt_ids), len(tokens))
        expected = reference_logprobs(reference, list(prompt_ids), tokens).tolist()
        assert completion.inference_logprobs == pytest.approx(expected, abs=LOGPROB_ATOL)
    sampler.close()
    mgr.close()
