"""Incremental decoding of a completion: multi-byte characters, stop strings, held-back text."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from weightsync.server.tokenizer import IncrementalText, TextTokenizer

CORPUS = ["naïve café 日本語 テキスト", "stop here END of text", "über straße ok"] * 20


@pytest.fixture(scope="module")
def byte_level(tmp_path_factory: pytest.TempPathFactory) -> TextTokenizer:
    """A byte-level BPE (as GPT-2/Qwen use): one character may span several tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(CORPUS, trainer=trainer)
    directory = tmp_path_factory.mktemp("bpe")
    return TextTokenizer(PreTrainedTokenizerFast(tokenizer_object=tok), Path(directory))


def _feed(text: IncrementalText, ids: list[int]) -> tuple[list[str], int]:
    """Feed ids one at a time; return what `take` gave after each, and where it stopped."""
    pieces = []
    for n in range(1, len(ids) + 1):
        go_on = text.update(ids[:n])
        pieces.append(text.take(final=not go_on))
        if not go_on:
            return pieces, n
    pieces.append(text.take(final=True))
    return pieces, len(ids)


def test_multibyte_characters_come_out_whole(byte_level: Any) -> None:
    sample = "naïve café 日本語 über straße"
    ids = byte_level.encode(sample)
    # The byte-level tokens split some characters: decoding a prefix can end mid-character.
    prefixes = [byte_level.decode(ids[:n]) for n in range(1, len(ids))]
    assert any(p.endswith("\ufffd") for p in prefixes)
    text = IncrementalText(byte_level)
    pieces, _ = _feed(text, ids)
    assert "".join(pieces) == sample == text.text
    assert not any("\ufffd" in p for p in pieces)


def test_a_stop_string_across_tokens_cuts_the_text_and_is_never_emitted(byte_level) -> None:
    sample = "stop here END of text"
    ids = byte_level.encode(sample)
    text = IncrementalText(byte_level, ["END", "never"])
    pieces, used = _feed(text, ids)
    assert text.stopped and text.text == "stop here "
    assert "".join(pieces) == "stop here "
    # It stopped at the token that completed "END", not later.
    assert "END" in byte_level.decode(ids[:used]) and "END" not in byte_level.decode(
        ids[: used - 1]
    )
    # Before the stop, what could still begin a stop string was held back.
    assert all("E" not in p for p in pieces)


def test_without_a_tokenizer_nothing_is_decoded() -> None:
    text = IncrementalText(None, [])
    assert text.update([1, 2, 3]) is True
    assert text.take(final=True) == ""
