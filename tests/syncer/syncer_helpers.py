"""Plain helpers of the syncer tests: a training step and the trainer-side reference."""

from __future__ import annotations

from typing import Any

import torch

from weightsync.deployment import DeploymentManager
from weightsync.toymodel import build_model
from weightsync.trainer import TrainingClient

TRAIN_TEXT = "the quick brown fox jumps over the lazy dog. " * 2
PROMPT = [{"role": "user", "content": "hi there"}]


def train_step(client: TrainingClient, tokenizer: Any) -> float:
    """One optimizer step of next-token loss on a fixed text."""
    ids = torch.tensor([tokenizer(TRAIN_TEXT)["input_ids"]])
    client.optimizer.zero_grad()
    loss = client.model(input_ids=ids, labels=ids).loss
    loss.backward()
    client.optimizer.step()
    return float(loss.detach())


def reference_model(client: TrainingClient) -> Any:
    """The trainer's weights as the deployment should hold them: the bf16 export."""
    if getattr(client, "is_lora", False):
        import copy

        model = copy.deepcopy(client.model).to(torch.bfloat16)
    else:
        model = build_model("tiny", dtype=torch.bfloat16)
        missing, unexpected = model.load_state_dict(client.exported_weights(), strict=False)
        assert not unexpected and set(missing) <= {"lm_head.weight"}
    model.eval()
    return model


@torch.no_grad()
def reference_logprobs(model: Any, prompt_ids: list[int], token_ids: list[int]) -> torch.Tensor:
    """Log-probabilities the model assigns to `token_ids` after `prompt_ids` (fp32)."""
    ids = torch.tensor([prompt_ids + token_ids])
    logits = model(input_ids=ids).logits[0].float()
    logp = torch.log_softmax(logits[len(prompt_ids) - 1 : -1], dim=-1)
    return logp.gather(1, torch.tensor(token_ids).unsqueeze(1)).squeeze(1)


@torch.no_grad()
def reference_greedy(model: Any, prompt_ids: list[int], num_tokens: int) -> list[int]:
    ids = list(prompt_ids)
    for _ in range(num_tokens):
        logits = model(input_ids=torch.tensor([ids])).logits[0, -1]
        ids.append(int(torch.argmax(logits)))
    return ids[len(prompt_ids) :]


def serving(deploy_mgr: DeploymentManager, deployment_id: str) -> set[str | None]:
    status = deploy_mgr.hotload_check_status(deployment_id)
    return {r["current_snapshot_identity"] for r in status["replicas"]}
