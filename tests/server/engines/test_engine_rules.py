"""The rules every engine shares (engines/base.py): same model or not, and the model dtype."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from engine_helpers import reference_model, snapshot_tensors

from weightsync.errors import InvalidInputError
from weightsync.server.engines.base import model_dtype, same_model
from weightsync.server.engines.torch_engine import TorchEngine


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


def test_tensor_names_shapes_and_dtypes_count(model: Any) -> None:
    config, tensors = _base(model)
    fewer = {n: t for n, t in tensors.items() if n != "model.norm.weight"}
    assert not same_model(config, tensors, config, fewer)
    wider = {**tensors, "model.norm.weight": torch.ones(33, dtype=torch.bfloat16)}
    assert not same_model(config, tensors, config, wider)
    fp32 = {**tensors, "model.norm.weight": tensors["model.norm.weight"].float()}
    assert not same_model(config, tensors, config, fp32)
    other_bits = snapshot_tensors(reference_model(seed=5))
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
