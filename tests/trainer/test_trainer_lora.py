"""LoRA: adapter snapshots that peft loads, merged bases, and promotion of adapters."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from peft import PeftModel, get_peft_model_state_dict
from transformers import AutoModelForCausalLM

from _support.bits import int_bits
from _support.training import model_step
from weightsync.errors import InvalidInputError
from weightsync.snapshot import SnapshotStore
from weightsync.toymodel import build_model
from weightsync.trainer import TrainingClient

pytestmark = pytest.mark.timeout(120)


def _lora_client(tmp_path: Path, **kwargs: Any) -> tuple[TrainingClient, torch.optim.Optimizer]:
    client = TrainingClient(build_model("tiny", seed=0), storage=tmp_path, lora_rank=4, **kwargs)
    client.model.train()
    optimizer = torch.optim.AdamW(
        [p for p in client.model.parameters() if p.requires_grad], lr=1e-2
    )
    client.optimizer = optimizer
    # lora_B starts at zero; a few steps make the adapter do something.
    for step in range(3):
        model_step(client.model, optimizer, seed=step)
    return client, optimizer


def _logits(model: Any) -> torch.Tensor:
    input_ids = torch.arange(3, 19).reshape(1, 16)
    with torch.no_grad():
        return model(input_ids=input_ids).logits.float()


def test_adapter_snapshots_load_in_peft_bit_for_bit(tmp_path: Path) -> None:
    client, optimizer = _lora_client(tmp_path)
    first = client.save_weights_for_sampler_ext("adapter-1")
    model_step(client.model, optimizer, seed=9)
    second = client.save_weights_for_sampler_ext("adapter-2", checkpoint_type="delta")

    assert (first.kind, second.kind) == ("lora", "lora")
    assert second.checkpoint_type == "base" and second.parent is None
    snapshot_dir = Path(second.path)
    assert (snapshot_dir / "adapter_config.json").is_file()
    assert (snapshot_dir / "adapter_model.safetensors").is_file()
    config = json.loads((snapshot_dir / "adapter_config.json").read_text())
    assert config["r"] == 4 and config["lora_alpha"] == 8 and config["peft_type"] == "LORA"

    loaded = PeftModel.from_pretrained(build_model("tiny", seed=0), snapshot_dir)
    loaded_adapter = get_peft_model_state_dict(loaded)
    exported = client.exported_weights()
    assert sorted(loaded_adapter) == sorted(exported)
    for name, tensor in exported.items():
        assert tensor.dtype == torch.bfloat16
        assert torch.equal(int_bits(loaded_adapter[name].to(torch.bfloat16)), int_bits(tensor))
    # The adapter changed between the two snapshots.
    assert second.num_changed > 0
    older = SnapshotStore(tmp_path).fetch(first.snapshot_name).tensors()
    assert any(not torch.equal(older[n], exported[n]) for n in exported)


def test_merged_base_folds_the_adapter_and_leaves_the_training_model_untouched(
    tmp_path: Path,
) -> None:
    client, _ = _lora_client(tmp_path)
    live_before = {k: v.clone() for k, v in client.model.state_dict().items()}
    result = client.save_weights_for_sampler_ext("merged", checkpoint_type="merged_base")

    assert (result.kind, result.checkpoint_type) == ("base", "base")
    for name, tensor in client.model.state_dict().items():
        assert torch.equal(tensor, live_before[name]), name
    merged = SnapshotStore(tmp_path).materialize(result.snapshot_name)
    # The reference: peft's own merge, on a copy of the trained model.
    client.model.save_pretrained(tmp_path / "peft-live")
    peft_copy = PeftModel.from_pretrained(build_model("tiny", seed=0), tmp_path / "peft-live")
    folded = peft_copy.merge_and_unload().state_dict()
    assert "lm_head.weight" not in merged
    assert set(merged) == set(folded) - {"lm_head.weight"}
    for name, tensor in merged.items():
        assert tensor.dtype == torch.bfloat16
        torch.testing.assert_close(tensor.float(), folded[name].to(torch.bfloat16).float())
    q_proj = "model.layers.0.self_attn.q_proj.weight"
    base_q = client.model.get_base_model().model.layers[0].self_attn.q_proj.base_layer.weight
    assert not torch.equal(merged[q_proj], base_q.detach().to(torch.bfloat16))


def test_promoting_an_adapter_gives_a_transformers_model_with_the_adapter_folded_in(
    tmp_path: Path,
) -> None:
    client, _ = _lora_client(tmp_path / "snaps")
    result = client.save_weights_for_sampler_ext("to-promote")

    out = client.promote_checkpoint(result.snapshot_name, tmp_path / "promoted")
    promoted = AutoModelForCausalLM.from_pretrained(out)
    assert promoted.dtype == torch.bfloat16
    client.model.eval()
    torch.testing.assert_close(_logits(promoted), _logits(client.model), atol=0.05, rtol=0.05)
    base_only = build_model("tiny", seed=0).eval()
    assert not torch.allclose(_logits(promoted), _logits(base_only), atol=0.05, rtol=0.05)


def test_an_optimizer_built_before_wrapping_is_refused(tmp_path: Path) -> None:
    model = build_model("tiny", seed=0)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    with pytest.raises(InvalidInputError, match="optimizer holds none of the LoRA"):
        TrainingClient(model, storage=tmp_path, lora_rank=4, optimizer=optimizer)


def test_a_peft_model_passed_in_keeps_its_own_config(tmp_path: Path) -> None:
    from peft import LoraConfig, get_peft_model

    peft_model = get_peft_model(
        build_model("tiny", seed=0),
        LoraConfig(r=2, lora_alpha=3, target_modules=["q_proj", "v_proj"]),
    )
    client = TrainingClient(peft_model, storage=tmp_path)
    assert client.is_lora and client.lora_rank == 2 and client.model is peft_model
    result = client.save_weights_for_sampler_ext("own")
    config = SnapshotStore(tmp_path).read_config(result.snapshot_name)
    assert config["r"] == 2 and config["lora_alpha"] == 3
    assert sorted(config["target_modules"]) == ["q_proj", "v_proj"]
