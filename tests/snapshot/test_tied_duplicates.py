"""tied_duplicates: ties are found by storage (same view of one memory), never by name."""

from __future__ import annotations

import pytest
import torch

from weightsync.errors import InvalidInputError
from weightsync.snapshot.tied_weights import tied_duplicates
from weightsync.toymodel import build_model


def test_identical_views_of_one_storage_are_ties_and_the_first_name_is_kept() -> None:
    fused = torch.randn(6, 4)
    named = [
        ("q", fused[:2]),
        ("k", fused[2:4]),  # the same storage, disjoint: a separate weight
        ("k_again", fused[2:4]),
        ("q_again", fused[:2]),
        ("copy_of_q", fused[:2].clone()),  # equal bits, other memory: not a tie
    ]
    assert tied_duplicates(named, what="test") == {"k_again": "k", "q_again": "q"}


def test_views_that_differ_in_dtype_shape_or_stride_are_not_ties_but_overlaps() -> None:
    whole = torch.randn(4, 4)
    for other in (whole.view(torch.int32), whole.reshape(16), whole.t()):
        with pytest.raises(InvalidInputError, match=r"'whole' and 'other' share memory"):
            tied_duplicates([("whole", whole), ("other", other)], what="test")


def test_a_partial_overlap_is_refused_naming_both_and_the_model() -> None:
    whole = torch.randn(8)
    with pytest.raises(InvalidInputError) as failure:
        tied_duplicates([("whole", whole), ("part", whole[2:5])], what="model M")
    assert str(failure.value).startswith("model M: tensors 'whole' and 'part' share memory")


def test_tensors_without_elements_never_tie() -> None:
    empty = torch.empty(0)
    assert tied_duplicates([("a", empty), ("b", empty), ("c", torch.empty(0))], what="t") == {}


def test_a_model_with_tied_embeddings_drops_its_head_on_every_device_kind() -> None:
    model = build_model("tiny")
    expected = {"lm_head.weight": "model.embed_tokens.weight"}
    assert tied_duplicates(model.state_dict().items(), what="t") == expected
    assert tied_duplicates(model.state_dict(keep_vars=True).items(), what="t") == expected
    # On the meta device nothing has an address; ties are still found by storage.
    with torch.device("meta"):
        skeleton = build_model("tiny")
    assert tied_duplicates(skeleton.state_dict(keep_vars=True).items(), what="t") == expected
    untied = build_model("tiny", tie_word_embeddings=False)
    assert tied_duplicates(untied.state_dict().items(), what="t") == {}
