"""One tied-weight rule: a trainer's export, a model directory and the torch engine name the
same tensors, whatever the tied weight is called."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import save_file

from weightsync.server.engines.torch_engine import TorchEngine
from weightsync.server.sources import read_model_dir
from weightsync.toymodel import build_model
from weightsync.trainer.export import hf_config, plan_export


def _gpt2() -> Any:
    """GPT-2 ties `lm_head.weight` to `transformer.wte.weight` (no `embed_tokens` name)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    config = GPT2Config(
        n_layer=1, n_embd=16, n_head=2, vocab_size=64, n_positions=32, bos_token_id=0,
        eos_token_id=1,
    )  # fmt: skip
    return GPT2LMHeadModel(config).eval()


MODELS = {
    "qwen3-tied": lambda: build_model("tiny"),
    "qwen3-untied": lambda: build_model("tiny", tie_word_embeddings=False),
    "gpt2-tied": _gpt2,
}


def _model_dir_with_every_name(model: Any, out: Path) -> Path:
    """A model directory whose safetensors file holds every state-dict name, tied ones too."""
    out.mkdir()
    state = {n: t.detach().to(torch.bfloat16).clone() for n, t in model.state_dict().items()}
    save_file(state, str(out / "model.safetensors"), metadata={"format": "pt"})
    config = hf_config(model, torch.bfloat16)
    (out / "config.json").write_text(json.dumps(config))
    return out


@pytest.mark.parametrize("which", sorted(MODELS))
def test_export_model_dir_and_engine_hold_the_same_names(which: str, tmp_path: Path) -> None:
    model = MODELS[which]()
    exported = set(plan_export(model.state_dict().items(), what=which).names)
    weights = read_model_dir(_model_dir_with_every_name(model, tmp_path / "model"))
    assert set(weights.tensors) == exported
    engine = TorchEngine()
    engine.load_base(weights.config, weights.tensors)
    assert set(engine.named_weights()) == exported
    tied = "lm_head.weight" not in exported
    assert tied == (which != "qwen3-untied")
