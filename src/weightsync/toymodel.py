"""Small causal LMs and tokenizers built locally from a config (nothing is downloaded).

Used by the demo, the benchmarks and the tests. Models are Qwen3-architecture
`transformers` models with random weights; the tokenizer is a character-level
`tokenizers` tokenizer saved in Hugging Face layout, so `AutoTokenizer`,
the embedded engine and vLLM can all load it from a directory.
"""

from __future__ import annotations

import json
import string
from pathlib import Path
from typing import Any, Literal

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers

ModelSize = Literal["tiny", "small", "medium", "0.6b"]

SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
# Printable ASCII minus the form-feed/vertical-tab whitespace, plus newline.
_CHARS = [c for c in string.printable if c not in "\x0b\x0c\r\t"]
VOCAB: list[str] = [*SPECIAL_TOKENS, *_CHARS]
# A tiny ChatML template so chat completions work with the toy tokenizer.
CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

_SIZES: dict[str, dict[str, Any]] = {
    # ~23k parameters: unit tests.
    "tiny": dict(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        vocab_size=128,
    ),
    # ~0.8M parameters: the demo (learns a small task in tens of steps on 2 cores).
    "small": dict(
        hidden_size=128,
        intermediate_size=384,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=32,
        vocab_size=128,
    ),
    # ~10M parameters, 151936-token vocabulary like Qwen3's.
    "medium": dict(
        hidden_size=64,
        intermediate_size=256,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        vocab_size=151936,
    ),
    # The shape of Qwen3-0.6B (~0.6B parameters, tied embeddings).
    "0.6b": dict(
        hidden_size=1024,
        intermediate_size=3072,
        num_hidden_layers=28,
        num_attention_heads=16,
        num_key_value_heads=8,
        head_dim=128,
        vocab_size=151936,
    ),
}
MODEL_SIZES: tuple[str, ...] = tuple(_SIZES)


def model_config(size: str = "tiny", **overrides: Any) -> Any:
    """Return a `transformers.Qwen3Config` of a named size (see `MODEL_SIZES`)."""
    from transformers import Qwen3Config

    if size not in _SIZES:
        raise ValueError(f"unknown model size {size!r}; choose one of {', '.join(_SIZES)}")
    fields: dict[str, Any] = dict(
        max_position_embeddings=2048,
        rope_theta=10000.0,
        tie_word_embeddings=True,
        bos_token_id=0,
        eos_token_id=2,
        pad_token_id=0,
        torch_dtype="bfloat16",
    )
    fields.update(_SIZES[size])
    fields.update(overrides)
    return Qwen3Config(**fields)


def build_model(
    size: str = "tiny", *, seed: int = 0, dtype: torch.dtype = torch.float32, **overrides: Any
) -> Any:
    """Build a randomly initialised Qwen3 causal LM (fp32 master weights by default)."""
    from transformers import AutoModelForCausalLM

    config = model_config(size, **overrides)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    model.eval()
    return model


def build_tokenizer(out_dir: str | Path) -> Path:
    """Write a character-level tokenizer in Hugging Face layout to `out_dir`; return it."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    vocab = {tok: i for i, tok in enumerate(VOCAB)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<|endoftext|>"))
    tok.pre_tokenizer = pre_tokenizers.Split(pattern="", behavior="isolated")
    tok.decoder = decoders.Fuse()
    tok.add_special_tokens(list(SPECIAL_TOKENS))
    tok.save(str(out / "tokenizer.json"))
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": "<|endoftext|>",
        "eos_token": "<|im_end|>",
        "pad_token": "<|endoftext|>",
        "unk_token": "<|endoftext|>",
        "model_max_length": 2048,
        "chat_template": CHAT_TEMPLATE,
    }
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
    (out / "special_tokens_map.json").write_text(
        json.dumps({k: config[k] for k in ("bos_token", "eos_token", "pad_token", "unk_token")})
        + "\n"
    )
    return out


def save_model_dir(
    model: Any,
    out_dir: str | Path,
    *,
    tokenizer_dir: str | Path | None = None,
    dtype: torch.dtype = torch.bfloat16,
) -> Path:
    """Save `model` as a standalone Hugging Face directory (weights cast to `dtype`)."""
    out = Path(out_dir)
    model.to(dtype).save_pretrained(out)
    if tokenizer_dir is not None:
        for f in Path(tokenizer_dir).iterdir():
            if f.is_file():
                (out / f.name).write_bytes(f.read_bytes())
    return out


def perturbed(
    weights: dict[str, torch.Tensor], fraction: float, generator: torch.Generator
) -> dict[str, torch.Tensor]:
    """A copy of `weights` with about `fraction` of every tensor's elements moved (an RL-like
    step: each chosen element scaled by 1.01 and shifted by 1e-3, in its own dtype)."""
    new = {}
    for name, t in weights.items():
        mask = torch.rand(t.shape, generator=generator) < fraction
        new[name] = torch.where(mask, (t.float() * 1.01 + 1e-3).to(t.dtype), t).contiguous()
    return new
