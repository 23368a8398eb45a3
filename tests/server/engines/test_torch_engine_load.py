"""TorchEngine.load_base / named_weights: strict loading, tied weights, in-place reloads."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from _support.models import snapshot_tensors, toy_model
from weightsync.codec import checksum_tensor
from weightsync.errors import DeploymentError, InvalidInputError
from weightsync.server.engines.torch_engine import TorchEngine
from weightsync.snapshot import SnapshotStore
from weightsync.snapshot.writer import write_base
from weightsync.toymodel import model_config


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view(torch.int16)


def test_named_weights_are_the_snapshot_tensors_bit_for_bit(model: Any) -> None:
    tensors = snapshot_tensors(model)
    engine = TorchEngine()
    engine.load_base(model.config.to_dict(), tensors)
    live = engine.named_weights()
    assert set(live) == set(tensors)  # tied lm_head.weight absent on both sides
    assert "lm_head.weight" not in live
    for name, tensor in tensors.items():
        assert live[name].dtype == torch.bfloat16
        assert live[name].is_contiguous()
        assert torch.equal(_bits(live[name]), _bits(tensor)), name
    # The engine copied the tensors: they are not the caller's buffers.
    assert all(live[n].data_ptr() != tensors[n].data_ptr() for n in tensors)


def test_named_weights_are_what_the_model_computes_with(model: Any) -> None:
    engine = TorchEngine()
    engine.load_base(model.config.to_dict(), snapshot_tensors(model))
    loaded_model = engine._require_loaded().model
    live = engine.named_weights()
    assert live["model.embed_tokens.weight"].data_ptr() == loaded_model.lm_head.weight.data_ptr()
    assert (
        live["model.layers.1.mlp.down_proj.weight"].data_ptr()
        == loaded_model.model.layers[1].mlp.down_proj.weight.data_ptr()
    )
    assert not loaded_model.training


def test_missing_tensor_is_named(model: Any) -> None:
    tensors = snapshot_tensors(model)
    del tensors["model.layers.0.mlp.up_proj.weight"]
    with pytest.raises(InvalidInputError, match=r"missing \['model.layers.0.mlp.up_proj.weight'\]"):
        TorchEngine().load_base(model.config.to_dict(), tensors)


def test_unexpected_tensor_is_named(model: Any) -> None:
    tensors = snapshot_tensors(model)
    tensors["model.layers.9.extra.weight"] = torch.zeros(3, dtype=torch.bfloat16)
    with pytest.raises(InvalidInputError, match=r"unexpected \['model.layers.9.extra.weight'\]"):
        TorchEngine().load_base(model.config.to_dict(), tensors)


def test_shape_mismatch_is_named(model: Any) -> None:
    tensors = snapshot_tensors(model)
    tensors["model.norm.weight"] = torch.ones(31, dtype=torch.bfloat16)
    with pytest.raises(InvalidInputError, match=r"'model.norm.weight' has shape \(31,\)"):
        TorchEngine().load_base(model.config.to_dict(), tensors)


def test_tied_duplicate_is_accepted_only_when_identical(model: Any) -> None:
    tensors = snapshot_tensors(model)
    tensors["lm_head.weight"] = tensors["model.embed_tokens.weight"].clone()
    engine = TorchEngine()
    engine.load_base(model.config.to_dict(), tensors)
    assert "lm_head.weight" not in engine.named_weights()
    tensors["lm_head.weight"] = tensors["lm_head.weight"] + 1
    with pytest.raises(InvalidInputError, match=r"unexpected \['lm_head\.weight'\]"):
        TorchEngine().load_base(model.config.to_dict(), tensors)


def test_config_without_model_type_is_refused(model: Any) -> None:
    config = model.config.to_dict()
    del config["model_type"]
    with pytest.raises(InvalidInputError, match="model_type"):
        TorchEngine().load_base(config, snapshot_tensors(model))


def test_engine_without_a_model_says_to_load_one() -> None:
    with pytest.raises(DeploymentError, match="load_base first"):
        TorchEngine().named_weights()


def test_same_architecture_reloads_in_place(model: Any) -> None:
    engine = TorchEngine()
    engine.load_base(model.config.to_dict(), snapshot_tensors(model))
    pointers = {n: t.data_ptr() for n, t in engine.named_weights().items()}
    other = snapshot_tensors(toy_model(seed=7))
    engine.load_base(model.config.to_dict(), other)
    live = engine.named_weights()
    assert {n: t.data_ptr() for n, t in live.items()} == pointers
    for name, tensor in other.items():
        assert torch.equal(_bits(live[name]), _bits(tensor)), name


def test_new_architecture_rebuilds_the_model(model: Any) -> None:
    engine = TorchEngine()
    engine.load_base(model.config.to_dict(), snapshot_tensors(model))
    config = model_config("tiny", num_hidden_layers=3, initializer_range=0.2)
    torch.manual_seed(3)
    from transformers import AutoModelForCausalLM

    bigger = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    engine.load_base(config.to_dict(), snapshot_tensors(bigger))
    assert "model.layers.2.mlp.up_proj.weight" in engine.named_weights()


def test_tokenizer_is_loaded_when_given(model: Any, tokenizer_dir: Path) -> None:
    engine = TorchEngine()
    engine.load_base(model.config.to_dict(), snapshot_tensors(model), tokenizer_dir=tokenizer_dir)
    assert engine.tokenizer is not None
    assert engine.tokenizer.decode(engine.tokenizer.encode("hi")) == "hi"
    with pytest.raises(InvalidInputError, match="cannot load the tokenizer"):
        engine.load_base(
            model.config.to_dict(), snapshot_tensors(model), tokenizer_dir=tokenizer_dir / "nope"
        )


def test_weights_checksums_match_a_snapshot_manifest(model: Any, tmp_path: Path) -> None:
    tensors = snapshot_tensors(model)
    manifest = write_base(tmp_path, "base-0000abcd", tensors, config=model.config)
    store = SnapshotStore(tmp_path)
    engine = TorchEngine()
    engine.load_base(store.read_config("base-0000abcd"), store.materialize("base-0000abcd"))
    checksums = engine.weights_checksums(manifest.checksum_format)
    assert checksums == {n: e.checksum for n, e in manifest.tensors.items()}
    assert checksums["model.norm.weight"] == checksum_tensor(
        manifest.checksum_format, tensors["model.norm.weight"]
    )


def test_a_failed_load_keeps_the_served_model(model: Any) -> None:
    engine = TorchEngine()
    tensors = snapshot_tensors(model)
    engine.load_base(model.config.to_dict(), tensors)
    bigger = model_config("tiny", num_hidden_layers=3).to_dict()
    with pytest.raises(InvalidInputError, match="missing"):
        engine.load_base(bigger, tensors)
    live = engine.named_weights()
    assert set(live) == set(tensors)
    assert all(torch.equal(_bits(live[n]), _bits(t)) for n, t in tensors.items())


def test_mixed_dtypes_keep_the_snapshot_bits(model: Any) -> None:
    tensors = snapshot_tensors(model)
    tensors["model.norm.weight"] = (tensors["model.norm.weight"].float() + 1e-4).contiguous()
    engine = TorchEngine()
    engine.load_base(model.config.to_dict(), tensors)
    live = engine.named_weights()
    assert live["model.norm.weight"].dtype == torch.float32  # not rounded to bf16
    assert torch.equal(live["model.norm.weight"], tensors["model.norm.weight"])
    assert live["model.norm.weight"].data_ptr() == (
        engine._require_loaded().model.model.norm.weight.data_ptr()
    )
    assert live["model.layers.0.mlp.up_proj.weight"].dtype == torch.bfloat16
