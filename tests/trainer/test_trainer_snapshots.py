"""Sampler snapshots from a live model: base then deltas, bit for bit."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest
import torch

from _support.bits import assert_bits_equal, int_bits
from _support.training import model_step
from weightsync.snapshot import SnapshotStore
from weightsync.trainer import SaveSamplerResult, TrainingClient

pytestmark = pytest.mark.timeout(120)


def test_base_then_deltas_reproduce_the_live_weights_bit_for_bit(
    tmp_path: Path, model: Any, optimizer: torch.optim.Optimizer
) -> None:
    client = TrainingClient(model, storage=tmp_path / "snaps", optimizer=optimizer)
    results: list[SaveSamplerResult] = []
    expected: list[dict[str, torch.Tensor]] = []
    for step in range(4):
        if step:
            model_step(model, optimizer, seed=step)
        expected.append(client.exported_weights())
        results.append(client.save_weights_for_sampler_ext(f"step-{step}"))

    assert [r.checkpoint_type for r in results] == ["base", "delta", "delta", "delta"]
    assert [r.parent for r in results] == [None, *(r.snapshot_name for r in results[:-1])]
    store = SnapshotStore(tmp_path / "snaps")
    for result, weights in zip(results, expected, strict=True):
        assert result.snapshot_name == f"{result.path.rsplit('/', 1)[1]}"
        assert_bits_equal(store.materialize(result.snapshot_name), weights)
        manifest = store.read_manifest(result.snapshot_name)
        assert manifest.parent == result.parent
        assert manifest.session_id == client.session_id
    # The chain head is what the live model holds now.
    assert_bits_equal(store.materialize(results[-1].snapshot_name), client.exported_weights())
    # Training changed the weights, so the deltas were not empty.
    assert all(r.num_changed > 0 for r in results[1:])


def test_export_casts_fp32_master_weights_to_bf16_and_drops_tied_lm_head(
    tmp_path: Path, model: Any
) -> None:
    client = TrainingClient(model, storage=tmp_path)
    exported = client.exported_weights()

    assert "lm_head.weight" not in exported
    assert "model.embed_tokens.weight" in exported
    live = dict(model.named_parameters())
    for name, tensor in exported.items():
        assert tensor.dtype == torch.bfloat16
        assert torch.equal(int_bits(tensor), int_bits(live[name].detach().to(torch.bfloat16)))
    result = client.save_weights_for_sampler_ext("tied")
    manifest = SnapshotStore(tmp_path).read_manifest(result.snapshot_name)
    assert set(manifest.tensors) == set(exported)
    assert result.full_bytes == sum(t.numel() * 2 for t in exported.values())


def test_session_ids_are_fresh_8_hex_and_qualify_every_name(tmp_path: Path, model: Any) -> None:
    first = TrainingClient(model, storage=tmp_path)
    second = TrainingClient(model, storage=tmp_path)

    assert re.fullmatch(r"[0-9a-f]{8}", first.session_id)
    assert first.session_id != second.session_id
    a = first.save_weights_for_sampler_ext("same-name")
    b = second.save_weights_for_sampler_ext("same-name")
    assert a.snapshot_name == f"same-name-{first.session_id}"
    assert b.snapshot_name == f"same-name-{second.session_id}"
    assert Path(a.path) == tmp_path / a.snapshot_name
    assert sorted(SnapshotStore(tmp_path).list_snapshots()) == sorted(
        [a.snapshot_name, b.snapshot_name]
    )


def test_explicit_types_and_reset_start_a_new_chain(
    tmp_path: Path, model: Any, optimizer: torch.optim.Optimizer
) -> None:
    client = TrainingClient(model, storage=tmp_path, optimizer=optimizer)
    base = client.save_weights_for_sampler_ext("a", checkpoint_type="base")
    model_step(model, optimizer, seed=1)
    delta = client.save_weights_for_sampler_ext("b", checkpoint_type="delta")
    model_step(model, optimizer, seed=2)
    rebased = client.save_weights_for_sampler_ext("c", checkpoint_type="base")
    model_step(model, optimizer, seed=3)
    after = client.save_weights_for_sampler_ext("d")
    client.reset_delta_chain()
    fresh = client.save_weights_for_sampler_ext("e")

    assert (base.kind, delta.kind, rebased.kind, after.kind, fresh.kind) == (
        "base",
        "delta",
        "base",
        "delta",
        "base",
    )
    assert delta.parent == base.snapshot_name
    assert after.parent == rebased.snapshot_name
    assert client.last_snapshot == fresh.snapshot_name
    store = SnapshotStore(tmp_path)
    assert [m.identity for m in store.chain(after.snapshot_name)] == [
        rebased.snapshot_name,
        after.snapshot_name,
    ]
    assert_bits_equal(store.materialize(after.snapshot_name), client.exported_weights())


def test_reusing_a_name_warns_and_an_existing_snapshot_is_never_overwritten(
    tmp_path: Path, model: Any
) -> None:
    client = TrainingClient(model, storage=tmp_path)
    first = client.save_weights_for_sampler_ext("again")
    before = (tmp_path / first.snapshot_name / "weightsync.json").read_bytes()

    with (
        pytest.warns(UserWarning, match="already saved in session"),
        pytest.raises(ValueError, match="already exists"),
    ):
        client.save_weights_for_sampler_ext("again")
    assert (tmp_path / first.snapshot_name / "weightsync.json").read_bytes() == before
    assert client.last_snapshot == first.snapshot_name


def test_config_and_tokenizer_are_recorded(tmp_path: Path, model: Any, tokenizer_dir: Path) -> None:
    client = TrainingClient(model, storage=tmp_path, tokenizer_dir=tokenizer_dir)
    result = client.save_weights_for_sampler_ext("cfg")

    config = json.loads((tmp_path / result.snapshot_name / "config.json").read_text())
    assert config["model_type"] == "qwen3"
    assert config["dtype"] == "bfloat16"
    assert config["architectures"] == ["Qwen3ForCausalLM"]
    assert config["tie_word_embeddings"] is True
    assert (tmp_path / result.snapshot_name / "tokenizer.json").is_file()


@pytest.mark.parametrize("export_dtype", ["float16", "float32", torch.float8_e4m3fn])
def test_other_export_dtypes_round_trip(
    tmp_path: Path, model: Any, optimizer: torch.optim.Optimizer, export_dtype: Any
) -> None:
    client = TrainingClient(model, storage=tmp_path, export_dtype=export_dtype)
    client.save_weights_for_sampler_ext("base")
    model_step(model, optimizer, seed=1)
    result = client.save_weights_for_sampler_ext("delta")

    weights = SnapshotStore(tmp_path).materialize(result.snapshot_name)
    assert_bits_equal(weights, client.exported_weights())
    assert {t.dtype for t in weights.values()} == {client.export_dtype}


class _PlainModule(torch.nn.Module):
    """Not a transformers model; one parameter is a non-contiguous view."""

    def __init__(self) -> None:
        super().__init__()
        self.proj = torch.nn.Linear(6, 4)
        self.transposed = torch.nn.Parameter(torch.randn(5, 3).t())
        self.register_buffer("scale", torch.ones(4))


def test_plain_module_and_non_contiguous_parameters_are_exported(tmp_path: Path) -> None:
    torch.manual_seed(0)
    module = _PlainModule()
    assert not module.transposed.is_contiguous()
    client = TrainingClient(module, storage=tmp_path)
    base = client.save_weights_for_sampler_ext("plain")
    with torch.no_grad():
        module.transposed.mul_(1.5)
    delta = client.save_weights_for_sampler_ext("plain-2")

    store = SnapshotStore(tmp_path)
    weights = store.materialize(delta.snapshot_name)
    assert set(weights) == {"proj.weight", "proj.bias", "transposed", "scale"}
    assert weights["transposed"].is_contiguous()
    assert torch.equal(
        int_bits(weights["transposed"]), int_bits(module.transposed.detach().to(torch.bfloat16))
    )
    config = store.read_config(base.snapshot_name)
    assert config["weightsync_plain_module"] is True
    assert config["module_class"].endswith("_PlainModule")


def test_s3_storage_paths_use_the_url_scheme(
    s3_bucket_url: str, s3_storage_options: dict[str, Any], model: Any
) -> None:
    client = TrainingClient(model, storage=s3_bucket_url, storage_options=s3_storage_options)
    base = client.save_weights_for_sampler_ext("s3")
    with torch.no_grad():
        model.model.norm.weight.add_(0.5)
    delta = client.save_weights_for_sampler_ext("s3-2")

    assert base.path == f"{s3_bucket_url}/{base.snapshot_name}"
    assert delta.path.startswith("s3://")
    assert_bits_equal(client.store.materialize(delta.snapshot_name), client.exported_weights())


def test_export_plan_ties_only_identical_views() -> None:
    from weightsync.trainer.export import plan_export

    fused = torch.randn(6, 4)
    plan = plan_export(
        [
            ("q", fused[:2]),
            ("k", fused[2:4]),  # same storage, disjoint: two weights
            ("q_again", fused[:2]),  # identical view: a tie, dropped
            ("empty_a", torch.empty(0)),
            ("empty_b", torch.empty(0)),  # no memory: never a tie
        ],
        what="test",
    )
    assert plan.names == ["q", "k", "empty_a", "empty_b"]
    assert plan.dropped_ties == {"q_again": "q"}


def test_after_a_first_base_the_next_save_fills_buffers_reserved_in_the_background(
    tmp_path: Path, model: Any, optimizer: torch.optim.Optimizer
) -> None:
    """The base had no parent, so no old buffers are left to reuse: the client reserves
    the next save's buffers, and the delta is written from those very buffers."""
    client = TrainingClient(model, storage=tmp_path / "snaps", optimizer=optimizer)
    client.save_weights_for_sampler_ext("base")
    spare = client._spare  # where the buffers are is the point of the test
    weights = client.exported_weights()
    reserved = {}
    for name, tensor in weights.items():
        buffer, fresh = spare.buffer(name, tensor, pin=False)
        assert not fresh, f"{name}: no buffer was reserved"
        reserved[name] = buffer.data_ptr()
    model_step(model, optimizer, seed=1)
    expected = client.exported_weights()
    result = client.save_weights_for_sampler_ext("delta")
    assert result.checkpoint_type == "delta"
    head = client._previous
    assert head is not None
    assert {n: t.data_ptr() for n, t in head.tensors.items()} == reserved
    store = SnapshotStore(tmp_path / "snaps")
    assert_bits_equal(store.materialize(result.snapshot_name), expected)


def test_a_failed_reservation_is_logged_and_the_next_fill_allocates(
    model: Any, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    from weightsync.trainer import export

    weights = export.export_copy(dict(model.state_dict()), torch.bfloat16)
    spare = export.ExportBuffers(torch.bfloat16)

    def no_memory(*args: Any, **kwargs: Any) -> torch.Tensor:
        raise RuntimeError("injected: out of memory")

    with monkeypatch.context() as patched:
        patched.setattr(export.torch, "empty", no_memory)
        spare.reserve(weights)
        spare.retain(weights)  # waits for the reservation; allocates nothing
    assert "reserving the export buffers failed" in caplog.text
    filled = spare.fill(weights)
    assert_bits_equal(filled, weights)
