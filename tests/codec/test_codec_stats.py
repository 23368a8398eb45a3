"""Change statistics: counts, key steps across ±0 and signs, entropy bound."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from _support.bit_patterns import tensor_from_bits
from weightsync.codec.stats import change_stats, key_steps, order_keys
from weightsync.errors import InvalidInputError


def _bf16(values: list[int]) -> torch.Tensor:
    return tensor_from_bits(np.array(values, dtype=np.uint64), torch.bfloat16, (len(values),))


def test_key_order_matches_float_order() -> None:
    floats = torch.tensor([-float("inf"), -2.0, -1e-40, -0.0, 0.0, 1e-40, 1.0, float("inf")])
    keys = order_keys(floats.view(torch.int32).numpy().view(np.uint32))
    assert all(np.diff(keys) > 0)


def test_one_ulp_moves_are_one_key_step_across_signs_and_zero() -> None:
    old = _bf16([0x3F80, 0x0000, 0x8000, 0x4000, 0xBF80, 0, 0, 0])
    # 1.0 up one ulp, +0 -> -0, -0 -> smallest negative subnormal, -1.0 toward zero.
    new = _bf16([0x3F81, 0x8000, 0x8001, 0x4000, 0xBF7F, 0, 0, 0])
    steps = key_steps(
        old.view(torch.int16).numpy().view(np.uint16), new.view(torch.int16).numpy().view(np.uint16)
    )
    assert list(steps) == [1, -1, -1, 1]
    stats = change_stats(old, new)
    assert stats.num_elements == 8
    assert stats.num_changed == 4
    assert stats.changed_fraction == 0.5
    assert stats.one_step_fraction == 1.0
    assert stats.step_entropy_bits == pytest.approx(1.0)
    assert stats.bound_bits == pytest.approx(8 * 1.0 + 4 * 1.0)
    assert stats.step_histogram["1"] == 1.0


def test_tensor_sets_are_pooled() -> None:
    a_old = _bf16([0x3F80] * 10)
    a_new = _bf16([0x3F82] + [0x3F80] * 9)
    b_old = _bf16([0x4000] * 6)
    b_new = _bf16([0x4001, 0x3FFF, 0x4000, 0x4000, 0x4000, 0x4000])
    stats = change_stats({"a": a_old, "b": b_old}, {"a": a_new, "b": b_new})
    p = 3 / 16
    h_p = -(p * math.log2(p) + (1 - p) * math.log2(1 - p))
    h_steps = -(3 * (1 / 3) * math.log2(1 / 3))  # steps {+2, +1, -1}
    assert stats.num_changed == 3
    assert stats.one_step_fraction == pytest.approx(2 / 3)
    assert stats.step_histogram["2"] == pytest.approx(1 / 3)
    assert stats.bound_bits == pytest.approx(16 * h_p + 3 * h_steps)


def test_no_change_and_empty() -> None:
    t = _bf16([0x3F80, 0x7FC1])  # NaN payloads compare by bits
    stats = change_stats(t, t.clone())
    assert stats.num_changed == 0 and stats.bound_bits == 0.0
    empty = torch.empty(0, dtype=torch.float32)
    assert change_stats(empty, empty).num_elements == 0


def test_mismatches_raise() -> None:
    with pytest.raises(InvalidInputError):
        change_stats(torch.zeros(3), torch.zeros(4))
    with pytest.raises(InvalidInputError):
        change_stats({"a": torch.zeros(3)}, {"b": torch.zeros(3)})
