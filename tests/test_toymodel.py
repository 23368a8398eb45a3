"""Toy models and tokenizers are built locally and load through transformers."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from weightsync.toymodel import build_model, build_tokenizer, model_config, save_model_dir


def test_tokenizer_round_trips_text_and_has_chat_template(tmp_path: Path) -> None:
    tok = AutoTokenizer.from_pretrained(build_tokenizer(tmp_path / "tok"))
    text = "digits: 4\n123 Abc!"
    ids = tok(text)["input_ids"]
    assert len(ids) == len(text)  # one token per character
    assert tok.decode(ids) == text
    chat = tok.apply_chat_template(
        [{"role": "user", "content": "hi"}], add_generation_prompt=True, tokenize=False
    )
    assert chat == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    assert tok.eos_token == "<|im_end|>"


def test_same_seed_same_weights_and_saved_dir_loads(tmp_path: Path) -> None:
    a, b, c = build_model("tiny", seed=1), build_model("tiny", seed=1), build_model("tiny", seed=2)
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not all(torch.equal(sa[k], sc[k]) for k in sa)
    out = save_model_dir(a, tmp_path / "model", tokenizer_dir=build_tokenizer(tmp_path / "tok"))
    loaded = AutoModelForCausalLM.from_pretrained(out)
    assert loaded.config.tie_word_embeddings
    ref = a.state_dict()["model.embed_tokens.weight"]
    got = loaded.state_dict()["model.embed_tokens.weight"]
    assert torch.equal(ref.view(torch.int16), got.view(torch.int16))
    assert (out / "tokenizer.json").exists()


def test_unknown_size_lists_choices() -> None:
    with pytest.raises(ValueError, match="tiny"):
        model_config("huge")
