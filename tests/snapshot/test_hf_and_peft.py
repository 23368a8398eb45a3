"""Base and materialized directories load with transformers; LoRA snapshots with PEFT."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from _support.bits import assert_bits_equal
from _support.models import toy_weights
from _support.weights import perturb
from weightsync.errors import InvalidInputError
from weightsync.snapshot import (
    SnapshotStore,
    materialize_to,
    write_base,
    write_delta,
    write_lora,
)
from weightsync.toymodel import build_model, build_tokenizer

pytestmark = pytest.mark.timeout(120)


def _loaded_weights(directory: Path) -> dict[str, torch.Tensor]:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(directory, dtype=torch.bfloat16)
    return {k: v for k, v in model.state_dict().items() if k != "lm_head.weight"}


def test_base_directory_loads_with_from_pretrained(tmp_path: Path, tiny_config: object) -> None:
    weights = toy_weights()
    write_base(tmp_path, "b", weights, config=tiny_config)
    assert_bits_equal(_loaded_weights(tmp_path / "b"), weights)


def test_materialized_delta_loads_with_from_pretrained(tmp_path: Path, tiny_config: object) -> None:
    w0 = toy_weights()
    w1 = perturb(w0, seed=1)
    w2 = perturb(w1, seed=2)
    tok = build_tokenizer(tmp_path / "tok")
    store = SnapshotStore(tmp_path / "store")
    base = write_base(store.storage, "b", w0, config=tiny_config, tokenizer_dir=tok)
    d1 = write_delta(store.storage, "d1", parent=base, old=w0, new=w1)
    write_delta(store.storage, "d2", parent=d1, old=w1, new=w2)
    assert store.local_tokenizer_dir("d2") == tmp_path / "store" / "b"
    out = materialize_to(store, "d2", tmp_path / "out")
    assert_bits_equal(_loaded_weights(out), w2)
    assert (out / "tokenizer.json").read_bytes() == (tok / "tokenizer.json").read_bytes()
    assert not (out / "weightsync.json").exists()
    with pytest.raises(InvalidInputError, match="not an empty directory"):
        materialize_to(store, "d2", out)


def test_lora_snapshot_is_a_peft_adapter_directory(tmp_path: Path) -> None:
    from peft import LoraConfig, PeftModel, get_peft_model, get_peft_model_state_dict

    config = LoraConfig(
        r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False
    )
    peft_model = get_peft_model(build_model("tiny"), config)
    adapter = {k: v.detach().clone() for k, v in get_peft_model_state_dict(peft_model).items()}
    adapter_config = peft_model.peft_config["default"].to_dict()
    manifest = write_lora(
        tmp_path, "lora-1", adapter_tensors=adapter, adapter_config=adapter_config
    )
    assert manifest.kind == "lora" and manifest.parent is None and manifest.base is None
    store = SnapshotStore(tmp_path)
    assert store.read_config("lora-1")["r"] == 4
    assert [m.identity for m in store.chain("lora-1")] == ["lora-1"]
    assert_bits_equal(store.fetch("lora-1").tensors(), adapter)
    assert store.verify("lora-1").ok
    loaded = PeftModel.from_pretrained(build_model("tiny"), tmp_path / "lora-1")
    assert_bits_equal(get_peft_model_state_dict(loaded), adapter)
    with pytest.raises(InvalidInputError, match="LoRA"):
        materialize_to(store, "lora-1", tmp_path / "out")
