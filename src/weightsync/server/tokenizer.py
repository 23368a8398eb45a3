"""The replica's text side: a Hugging Face tokenizer read from a directory (JSON files only)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from weightsync.errors import InvalidInputError, SnapshotCorruptError


class TextTokenizer:
    """Encode prompts, decode completions, render chat messages."""

    def __init__(self, hf_tokenizer: Any, directory: Path) -> None:
        self._tok = hf_tokenizer
        self.directory = directory

    @property
    def eos_token_id(self) -> int | None:
        value = self._tok.eos_token_id
        return int(value) if value is not None else None

    def encode(self, text: str) -> list[int]:
        return [int(i) for i in self._tok.encode(text, add_special_tokens=False)]

    def decode(self, token_ids: list[int]) -> str:
        return str(self._tok.decode(token_ids, skip_special_tokens=True))

    def token_strings(self, token_ids: list[int]) -> list[str]:
        """Each token's text on its own (for logprobs); special tokens keep their names."""
        return [str(self._tok.decode([i], skip_special_tokens=False)) for i in token_ids]

    def render_chat(self, messages: list[dict[str, Any]]) -> str:
        if not getattr(self._tok, "chat_template", None):
            raise InvalidInputError(
                f"the tokenizer in {self.directory} has no chat template; use /v1/completions"
            )
        try:
            return str(
                self._tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
            )
        except Exception as e:  # template errors come from jinja2 with many types
            raise InvalidInputError(
                f"cannot render the chat messages with the template: {e}"
            ) from e


def load_tokenizer(directory: Path) -> TextTokenizer:
    """Load the tokenizer files in `directory` (tokenizer.json / tokenizer_config.json)."""
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(str(directory), local_files_only=True)
    except (OSError, ValueError) as e:
        raise SnapshotCorruptError(f"cannot load the tokenizer in {directory}: {e}") from e
    return TextTokenizer(tok, Path(directory))
