"""What vLLM serves after a reload that moves a tied embedding: vLLM's own path and weightsync's.

Run in the vLLM venv (`scripts/install-vllm.sh`), about two minutes on 2 cores:

    .venv-vllm/bin/python benchmarks/vllm_tied_head.py

A `weightsync serve --engine vllm` deployment serves a small Qwen3-shaped model with
tied embeddings (`lm_head` shares `embed_tokens.weight`; on CPU vLLM packs the head
into its GEMM kernel's own copy). The embedding is then moved, and the same new
weights reach vLLM twice:

1. vLLM's own path: the full checkpoint directory, `/pause` → `/collective_rpc
   reload_weights(weights_path=<dir>)` → `/reset_prefix_cache` → `/resume`;
2. weightsync's: a base snapshot of the same weights, hot-loaded (the worker
   extension re-packs modules that share a reloaded weight).

After each, vLLM's greedy tokens are teacher-forced through three `transformers`
references: the new weights, the old ones, and the new embedding with the old head.
The largest logprob difference to each is printed; the one near zero (vLLM's bf16
kernels against fp32: < 0.01) is what vLLM serves.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path
from typing import Any

import openai
import torch

from weightsync.bench.vllm_reload import reload_full_directory
from weightsync.deployment import DeploymentConfig, DeploymentManager
from weightsync.snapshot import write_base
from weightsync.toymodel import build_model, build_tokenizer, save_model_dir

SIZE = "small"  # a head size vLLM's CPU attention takes
PROMPT = "hi there"


def reference(embed: torch.Tensor, head: torch.Tensor, weights: dict[str, torch.Tensor]) -> Any:
    """A transformers model (fp32) with `weights`, input embedding `embed` and head `head`."""
    model = build_model(SIZE, seed=0)
    model.load_state_dict({n: t.float() for n, t in weights.items()}, strict=False)
    model.config.tie_word_embeddings = False
    model.model.embed_tokens.weight = torch.nn.Parameter(embed.float().clone())
    model.lm_head.weight = torch.nn.Parameter(head.float().clone())
    return model.eval()


def served(client: openai.OpenAI) -> tuple[list[int], list[int], list[float]]:
    """vLLM's greedy answer to PROMPT: prompt ids, token ids, their logprobs."""
    answer = client.completions.create(
        model="small", prompt=PROMPT, max_tokens=8, temperature=0.0, logprobs=0,
        extra_body={"return_token_ids": True},
    )  # fmt: skip
    [choice] = answer.choices
    extra = choice.model_extra or {}
    prompt_ids = list(extra.get("prompt_token_ids") or [])
    assert prompt_ids and choice.logprobs is not None, "vLLM did not return token ids"
    return prompt_ids, list(extra["token_ids"]), list(choice.logprobs.token_logprobs or [])


def max_logprob_gap(
    model: Any, prompt: list[int], tokens: list[int], logprobs: list[float]
) -> float:
    """The largest |logprob| difference on `tokens`, teacher-forced through `model`."""
    with torch.no_grad():
        rows = torch.log_softmax(model(torch.tensor([prompt + tokens])).logits[0].float(), -1)
    want = [float(rows[len(prompt) - 1 + i, t]) for i, t in enumerate(tokens)]
    return max(abs(a - b) for a, b in zip(want, logprobs, strict=True))


def main() -> None:
    root = Path(tempfile.mkdtemp(prefix="vllm-tied-head-"))
    model = build_model(SIZE, seed=5, dtype=torch.bfloat16)
    assert model.config.tie_word_embeddings
    base_dir = save_model_dir(model, root / "base", tokenizer_dir=build_tokenizer(root / "tok"))
    old = {n: t.detach().clone() for n, t in model.state_dict().items() if n != "lm_head.weight"}
    embed = old["model.embed_tokens.weight"]
    gen = torch.Generator().manual_seed(3)
    new = dict(old)
    new["model.embed_tokens.weight"] = (
        embed.float() + torch.randn(embed.shape, generator=gen) * embed.float().std()
    ).to(embed.dtype)
    moved = new["model.embed_tokens.weight"]
    refs = {
        "new weights": reference(moved, moved, new),
        "old weights": reference(embed, embed, old),
        "new embedding, old head": reference(moved, embed, new),
    }
    storage = root / "snapshots"
    mgr = DeploymentManager(registry_dir=root / "registry")
    mgr.create_or_get(
        DeploymentConfig(
            deployment_id="tied", storage=str(storage), model_dir=str(base_dir),
            engine="vllm", model_name="small", startup_timeout_s=300.0,
        )
    )  # fmt: skip
    try:
        [replica] = mgr.hotload_check_status("tied")["replicas"]
        url = replica["inference_url"]
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", timeout=120, max_retries=0)

        reload_full_directory(url, new, base_dir, root / "full")
        report("vLLM's reload_weights(weights_path=)", refs, *served(client))

        # Back to the old weights through vLLM's own path, then weightsync's hot-load.
        reload_full_directory(url, old, base_dir, root / "old")
        config = model.config.to_dict()
        write_base(storage, "moved-0a0a0a0a", new, config=config)
        mgr.hotload_and_wait("tied", "small", "moved-0a0a0a0a")
        report("weightsync hot-load (base)", refs, *served(client))
    finally:
        mgr.delete("tied")
        mgr.close()
        shutil.rmtree(root, ignore_errors=True)


def report(
    path: str, refs: dict[str, Any], prompt: list[int], tokens: list[int], logprobs: list[float]
) -> None:
    print(f"\n{path}: vLLM's greedy tokens {tokens}")
    for name, ref in refs.items():
        print(f"  max |logprob - {name}|: {max_logprob_gap(ref, prompt, tokens, logprobs):.4f}")


if __name__ == "__main__":
    main()
