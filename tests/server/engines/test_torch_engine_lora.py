"""TorchEngine LoRA adapters: PEFT parity, per-request switching, base untouched, errors."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors.torch import load_file

from _support.engine_steps import PROMPT, RecordingGuard
from _support.models import toy_model
from weightsync.errors import InvalidInputError, UnsupportedOperationError
from weightsync.server.engines.base import GenerateRequest, GenerateResult
from weightsync.server.engines.torch_engine import TorchEngine


def _export_adapter(out_dir: Path, *, seed: int, targets: list[str]) -> Path:
    """Train-free LoRA: random A and B on a fresh copy of the base, saved as PEFT saves it."""
    peft_model = get_peft_model(toy_model(), LoraConfig(r=4, lora_alpha=8, target_modules=targets))
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_" in name:
                param.copy_(0.3 * torch.randn(param.shape, generator=generator))
    peft_model.save_pretrained(out_dir)
    return out_dir


def _read_adapter(adapter_dir: Path) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    config = json.loads((adapter_dir / "adapter_config.json").read_text())
    return config, load_file(adapter_dir / "adapter_model.safetensors")


@pytest.fixture(scope="module")
def adapter_a(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _export_adapter(
        tmp_path_factory.mktemp("lora-a"), seed=1, targets=["q_proj", "v_proj", "down_proj"]
    )


@pytest.fixture(scope="module")
def adapter_b(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _export_adapter(tmp_path_factory.mktemp("lora-b"), seed=2, targets=["o_proj"])


def _run(engine: TorchEngine, adapter: str | None) -> GenerateResult:
    request = GenerateRequest(
        prompt_token_ids=PROMPT, max_tokens=8, temperature=0.0, logprobs=0, adapter=adapter
    )
    return engine.generate(request, step_guard=RecordingGuard())


def test_adapter_matches_a_peft_reference_and_base_stays_base(
    engine: TorchEngine, adapter_a: Path
) -> None:
    base = _run(engine, None)
    pointers = {n: t.data_ptr() for n, t in engine.named_weights().items()}
    engine.load_adapter("a", *_read_adapter(adapter_a))
    assert engine.loaded_adapters() == ["a"]

    reference = PeftModel.from_pretrained(toy_model(), adapter_a)
    expected = reference.generate(
        input_ids=torch.tensor([PROMPT]),
        max_new_tokens=8,
        do_sample=False,
        eos_token_id=None,
        output_logits=True,
        return_dict_in_generate=True,
    )
    expected_tokens = expected.sequences[0, len(PROMPT) :].tolist()
    with_adapter = _run(engine, "a")
    assert with_adapter.token_ids == expected_tokens
    assert with_adapter.token_ids != base.token_ids
    assert with_adapter.logprobs is not None
    for logprob, logits, token in zip(
        with_adapter.logprobs, expected.logits, expected_tokens, strict=True
    ):
        assert logprob == pytest.approx(
            torch.log_softmax(logits[0].float(), -1)[token].item(), abs=1e-3
        )

    again = _run(engine, "a")  # from the prompt cache, in the adapter's own blocks
    assert again.num_cached_prompt_tokens == 8
    assert (again.token_ids, again.logprobs) == (with_adapter.token_ids, with_adapter.logprobs)

    after = _run(engine, None)
    assert (after.token_ids, after.logprobs) == (base.token_ids, base.logprobs)
    # The base weights are still the same tensors under the same names.
    assert {n: t.data_ptr() for n, t in engine.named_weights().items()} == pointers


def test_two_adapters_switch_per_request_and_unload(
    engine: TorchEngine, adapter_a: Path, adapter_b: Path
) -> None:
    base = _run(engine, None).token_ids
    engine.load_adapter("a", *_read_adapter(adapter_a))
    only_a = _run(engine, "a").token_ids
    engine.load_adapter("b", *_read_adapter(adapter_b))
    assert sorted(engine.loaded_adapters()) == ["a", "b"]
    b = _run(engine, "b").token_ids
    assert b not in (base, only_a)
    assert _run(engine, "a").token_ids == only_a  # unaffected by b's layers
    assert _run(engine, None).token_ids == base

    engine.unload_adapter("a")
    assert engine.loaded_adapters() == ["b"]
    with pytest.raises(InvalidInputError, match="unknown LoRA adapter 'a'"):
        _run(engine, "a")
    assert _run(engine, "b").token_ids == b
    engine.unload_adapter("b")
    assert engine.loaded_adapters() == []
    assert _run(engine, None).token_ids == base
    with pytest.raises(InvalidInputError, match="no LoRA adapter named 'b'"):
        engine.unload_adapter("b")


def test_reloading_a_name_replaces_the_adapter(
    engine: TorchEngine, adapter_a: Path, adapter_b: Path
) -> None:
    engine.load_adapter("x", *_read_adapter(adapter_a))
    first = _run(engine, "x").token_ids
    engine.load_adapter("x", *_read_adapter(adapter_b))
    assert engine.loaded_adapters() == ["x"]
    replaced = _run(engine, "x")
    assert replaced.num_cached_prompt_tokens == 0  # the old adapter's KV was dropped
    engine.load_adapter("y", *_read_adapter(adapter_b))
    assert replaced.token_ids == _run(engine, "y").token_ids != first


def test_adapter_errors(engine: TorchEngine, adapter_a: Path) -> None:
    config, tensors = _read_adapter(adapter_a)
    missing = dict(tensors)
    del missing[next(k for k in missing if "lora_B" in k)]
    with pytest.raises(InvalidInputError, match="missing tensors"):
        engine.load_adapter("broken", config, missing)
    assert engine.loaded_adapters() == []

    with pytest.raises(InvalidInputError, match="does not fit the loaded base model"):
        engine.load_adapter("wrong", config | {"target_modules": ["no_such_proj"]}, tensors)
    assert engine.loaded_adapters() == []

    # Failing next to a loaded adapter leaves that adapter, and the name, usable.
    engine.load_adapter("a", config, tensors)
    with pytest.raises(InvalidInputError, match="does not fit the loaded base model"):
        engine.load_adapter("wrong", config | {"target_modules": ["no_such_proj"]}, tensors)
    assert engine.loaded_adapters() == ["a"]
    engine.load_adapter("wrong", config, tensors)
    assert _run(engine, "wrong").token_ids == _run(engine, "a").token_ids

    with pytest.raises(UnsupportedOperationError, match="LORA only"):
        engine.load_adapter("ia3", config | {"peft_type": "IA3"}, tensors)
    with pytest.raises(InvalidInputError, match="unknown LoRA adapter"):
        _run(engine, "broken")
