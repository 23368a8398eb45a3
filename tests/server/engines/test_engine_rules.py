"""The rules every engine shares (engines/base.py: same model or not, the model dtype, EOS ids)
and what both vLLM engines share (engines/vllm_layout.py, importable without vLLM)."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from _support.models import snapshot_tensors, toy_model
from weightsync.errors import InvalidInputError
from weightsync.server.engines.base import (
    eos_token_ids,
    model_dtype,
    model_mismatches,
    same_model,
    tensor_specs,
)
from weightsync.server.engines.torch_engine import TorchEngine
from weightsync.server.engines.vllm_layout import checkpoint_layout_names, host_copy


def _base(model: Any) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    return model.config.to_dict(), snapshot_tensors(model)


def test_only_file_keys_are_ignored_architectures_count(model: Any) -> None:
    config, tensors = _base(model)
    assert same_model(config, tensors, config, tensors)
    resaved = {**config, "transformers_version": "0.0.1", "_name_or_path": "/elsewhere"}
    assert same_model(config, tensors, resaved, tensors)
    renamed = {**config, "architectures": ["LlamaForCausalLM"]}
    assert not same_model(config, tensors, renamed, tensors)
    assert not same_model(config, tensors, {**config, "rms_norm_eps": 1e-3}, tensors)


def test_the_rule_names_what_differs_as_admission_reports_it(model: Any) -> None:
    config, tensors = _base(model)
    specs = tensor_specs(tensors)
    # The dtype keys and use_cache describe the file: each tensor's dtype is compared itself.
    assert same_model(config, tensors, {**config, "dtype": "float32", "use_cache": False}, tensors)
    renamed = {**config, "architectures": ["LlamaForCausalLM"]}
    assert model_mismatches(config, specs, renamed, specs) == [
        "architectures: served ['Qwen3ForCausalLM'] != snapshot ['LlamaForCausalLM']"
    ]
    # No class named: the one AutoModelForCausalLM builds for the model type (a model
    # built from a config, never saved, against the directory save_pretrained wrote).
    saved = {**config, "architectures": ["Qwen3ForCausalLM"]}
    assert model_mismatches(saved, specs, {**config, "architectures": None}, specs) == []
    wider = {**specs, "model.norm.weight": ((33,), "BF16")}
    assert model_mismatches(config, specs, config, wider) == [
        "model.norm.weight: served (32,) BF16 != snapshot (33,) BF16"
    ]


def test_tensor_names_shapes_and_dtypes_count(model: Any) -> None:
    config, tensors = _base(model)
    fewer = {n: t for n, t in tensors.items() if n != "model.norm.weight"}
    assert not same_model(config, tensors, config, fewer)
    wider = {**tensors, "model.norm.weight": torch.ones(33, dtype=torch.bfloat16)}
    assert not same_model(config, tensors, config, wider)
    fp32 = {**tensors, "model.norm.weight": tensors["model.norm.weight"].float()}
    assert not same_model(config, tensors, config, fp32)
    other_bits = snapshot_tensors(toy_model(seed=5))
    assert same_model(config, tensors, config, other_bits)


def test_model_dtype_is_the_floating_dtype_of_most_elements() -> None:
    tensors = {
        "big": torch.zeros(10, dtype=torch.bfloat16),
        "norm": torch.zeros(4, dtype=torch.float32),
        "steps": torch.zeros(100, dtype=torch.int64),  # not a weight: never the model dtype
    }
    assert model_dtype(tensors) == torch.bfloat16
    with pytest.raises(InvalidInputError, match="no floating-point tensors"):
        model_dtype({"steps": torch.zeros(3, dtype=torch.int64)})


def test_the_torch_engine_rebuilds_for_another_architecture_name(model: Any) -> None:
    config, tensors = _base(model)
    engine = TorchEngine()
    engine.load_base(config, tensors)
    built = engine._require_loaded().model
    engine.load_base({**config, "transformers_version": "0.0.1"}, tensors)
    assert engine._require_loaded().model is built  # copied in place
    engine.load_base({**config, "architectures": ["Qwen3ForCausalLM", "Other"]}, tensors)
    assert engine._require_loaded().model is not built  # built anew


def test_the_torch_engine_refuses_a_base_without_floating_point_weights(model: Any) -> None:
    config, _ = _base(model)
    with pytest.raises(InvalidInputError, match="no floating-point tensors"):
        TorchEngine().load_base(config, {"steps": torch.zeros(3, dtype=torch.int64)})


def test_eos_token_ids_read_an_id_a_list_or_none() -> None:
    assert eos_token_ids(None) == frozenset()
    assert eos_token_ids(2) == {2}
    assert eos_token_ids([2, 7]) == {2, 7}
    assert eos_token_ids((4,)) == {4}


def test_the_vllm_host_copy_shares_nothing_and_needs_architectures(model: Any) -> None:
    config, tensors = _base(model)
    config = {**config, "architectures": ["Qwen3ForCausalLM"]}
    host = host_copy(config, tensors)
    assert set(host) == set(tensors)
    assert all(host[n].data_ptr() != t.data_ptr() and torch.equal(host[n], t)
               for n, t in tensors.items())  # fmt: skip
    with pytest.raises(InvalidInputError, match="no 'architectures'"):
        host_copy({**config, "architectures": None}, tensors)
    with pytest.raises(InvalidInputError, match="at least one tensor"):
        host_copy(config, {})


def test_only_tensors_vllm_keeps_as_checkpointed_are_read_back() -> None:
    host = {
        "norm": torch.zeros(4, dtype=torch.bfloat16),
        "q": torch.zeros(4, 4, dtype=torch.bfloat16),  # fused into qkv by vLLM
        "packed": torch.zeros(4, 4, dtype=torch.bfloat16),  # re-packed: another shape
        "cast": torch.zeros(4, dtype=torch.bfloat16),  # held in another dtype
    }
    parameters = {
        "norm": ([4], "torch.bfloat16"),
        "qkv": ([12, 4], "torch.bfloat16"),
        "packed": ([16], "torch.bfloat16"),
        "cast": ([4], "torch.float32"),
    }
    assert checkpoint_layout_names(host, parameters) == {"norm"}
