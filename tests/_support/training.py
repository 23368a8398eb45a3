"""A trainer's side of the tests: one training step, and what should be served.

Shared by the syncer and Fireworks SDK tests (and the vLLM deployment test): the
reference is the trainer's bf16 export in a fresh model, as a replica holds it. The
trainer tests step a bare model with `model_step`.
"""

from __future__ import annotations

import copy
from typing import Any

import torch

from weightsync.toymodel import build_model
from weightsync.trainer import TrainingClient

TRAIN_TEXT = "the quick brown fox jumps over the lazy dog. " * 2
PROMPT = [{"role": "user", "content": "hi there"}]


def train_step(client: TrainingClient, tokenizer: Any) -> float:
    """One optimizer step of next-token loss on a fixed text; the loss before it."""
    ids = torch.tensor([tokenizer(TRAIN_TEXT)["input_ids"]])
    client.optimizer.zero_grad()
    loss = client.model(input_ids=ids, labels=ids).loss
    loss.backward()
    client.optimizer.step()
    return float(loss.detach())


def model_step(model: Any, optimizer: torch.optim.Optimizer, *, seed: int) -> float:
    """One optimizer step on a fixed random batch of `seed`; returns the loss before the step."""
    generator = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(0, model.config.vocab_size, (2, 12), generator=generator)
    loss = model(input_ids=input_ids, labels=input_ids).loss
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return float(loss.detach())


def reference_model(client: TrainingClient) -> Any:
    """The trainer's weights as the deployment should hold them: its bf16 export.

    A LoRA client's reference is its adapted model in bf16.
    """
    if client.is_lora:
        model = copy.deepcopy(client.model).to(torch.bfloat16)
    else:
        model = build_model("tiny", dtype=torch.bfloat16)
        missing, unexpected = model.load_state_dict(client.exported_weights(), strict=False)
        assert not unexpected and set(missing) <= {"lm_head.weight"}
    model.eval()
    return model


@torch.no_grad()
def reference_greedy(model: Any, prompt_ids: list[int], num_tokens: int) -> list[int]:
    """The `num_tokens` tokens greedy decoding of `model` makes after `prompt_ids`."""
    ids = list(prompt_ids)
    for _ in range(num_tokens):
        ids.append(int(torch.argmax(model(input_ids=torch.tensor([ids])).logits[0, -1])))
    return ids[len(prompt_ids) :]


@torch.no_grad()
def reference_logprobs(model: Any, prompt_ids: list[int], token_ids: list[int]) -> torch.Tensor:
    """Log-probabilities the model gives `token_ids` after `prompt_ids` (fp32 log-softmax)."""
    ids = torch.tensor([prompt_ids + token_ids])
    logits = model(input_ids=ids).logits[0].float()
    logp = torch.log_softmax(logits[len(prompt_ids) - 1 : -1], dim=-1)
    return logp.gather(1, torch.tensor(token_ids).unsqueeze(1)).squeeze(1)
