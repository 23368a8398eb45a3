"""The replica's text side: a Hugging Face tokenizer read from a directory (JSON files only)."""

from __future__ import annotations

from collections.abc import Sequence
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

    def single_token_id(self, text: str) -> int | None:
        """The id of the one token whose text is exactly `text` (e.g. `<|im_end|>`), if any."""
        ids = self._tok.encode(text, add_special_tokens=False)
        if len(ids) == 1 and self.token_strings([int(ids[0])])[0] == text:
            return int(ids[0])
        return None

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


class IncrementalText:
    """The text of a growing completion, decoded as tokens arrive, cut at the first stop string.

    Decoding a window of recent tokens (as vLLM does) keeps multi-byte characters
    and leading spaces right without re-decoding the whole sequence per token.
    Text that could still turn into a stop string is held back from `take()`.
    """

    def __init__(self, tokenizer: TextTokenizer | None, stops: Sequence[str] = ()) -> None:
        self._tok = tokenizer
        self._stops = [s for s in stops if s]
        self._hold = max((len(s) for s in self._stops), default=1) - 1
        self._prefix = 0
        self._read = 0
        self._taken = 0
        self.text = ""
        self.stopped = False

    def update(self, token_ids: Sequence[int]) -> bool:
        """Add the text of `token_ids` (the whole sequence so far); False once a stop matched."""
        if self._tok is None or self.stopped:
            return not self.stopped
        before = self._tok.decode(list(token_ids[self._prefix : self._read]))
        after = self._tok.decode(list(token_ids[self._prefix :]))
        if len(after) <= len(before) or after.endswith("\ufffd"):
            return True  # an incomplete character: wait for the next token
        start = max(0, len(self.text) - self._hold)
        self.text += after[len(before) :]
        self._prefix, self._read = self._read, len(token_ids)
        cut = min(
            (i for i in (self.text.find(s, start) for s in self._stops) if i >= 0), default=-1
        )
        if cut >= 0:
            self.text = self.text[:cut]
            self.stopped = True
            return False
        return True

    def take(self, *, final: bool) -> str:
        """Text not taken before; holds back a possible stop-string prefix unless `final`."""
        end = len(self.text) if final or self.stopped else max(0, len(self.text) - self._hold)
        end = max(end, self._taken)
        out = self.text[self._taken : end]
        self._taken = end
        return out
