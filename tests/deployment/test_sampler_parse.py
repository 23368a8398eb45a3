"""DeploymentSampler reads the wire contract's completion answers: token ids, logprobs,
and which snapshot produced each token when an async swap landed mid-generation."""

from __future__ import annotations

import pytest

from weightsync.deployment import DeploymentSampler
from weightsync.errors import DeploymentError
from weightsync.wire.inference import (
    CompletionChoice,
    CompletionResponse,
    LegacyLogprobs,
    SnapshotChange,
)


def _answer(choices, identities):
    return CompletionResponse(
        id="c",
        created=0,
        model=f"tiny@{identities[-1]}",
        snapshot_identity=identities[-1],
        snapshot_identities=identities,
        choices=choices,
    ).model_dump(mode="json")


def _choice(index, tokens, changes=None):
    return CompletionChoice(
        index=index,
        text="".join(f"t{t}" for t in tokens),
        logprobs=LegacyLogprobs(
            tokens=[f"t{t}" for t in tokens],
            token_logprobs=[-0.5 * (i + 1) for i in range(len(tokens))],
            top_logprobs=None,
            text_offset=list(range(len(tokens))),
        ),
        finish_reason="length",
        token_ids=tokens,
        snapshot_changes=changes,
    )


def test_a_swap_mid_generation_names_each_tokens_snapshot():
    sampler = DeploymentSampler("http://127.0.0.1:1", model="tiny")
    changes = [
        SnapshotChange(token_index=0, snapshot_identity="a"),
        SnapshotChange(token_index=2, snapshot_identity="b"),
    ]
    answer = _answer([_choice(1, [7, 8, 9]), _choice(0, [4, 5, 6], changes)], ["a", "b"])
    first, second = sampler._parse(answer, [1, 2], chat=False)
    assert first.token_ids == [4, 5, 6] and first.snapshot_identities == ["a", "a", "b"]
    assert first.snapshot_identity == "b" and first.logprobs == [-0.5, -1.0, -1.5]
    assert first.full_tokens == [1, 2, 4, 5, 6] and first.prompt_len == 2
    assert first.completion_len == 3 and first.inference_logprobs == first.logprobs
    # A choice without changes: the answer spans two snapshots, the last is named.
    assert second.snapshot_identities is None and second.snapshot_identity == "b"


def test_one_snapshot_and_logprobs_off():
    sampler = DeploymentSampler("http://127.0.0.1:1", model="tiny")
    [only] = sampler._parse(_answer([_choice(0, [3])], ["a"]), [1], chat=False, logprobs=False)
    assert only.snapshot_identity == "a" and only.logprobs is None


def test_an_answer_outside_the_contract_is_named():
    sampler = DeploymentSampler("http://127.0.0.1:1", model="tiny")
    with pytest.raises(DeploymentError, match="not the wire contract's"):
        sampler._parse({"choices": [{"index": 0}]}, [1], chat=False)
