"""Resume state with torch DCP: a new client resumes training exactly."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist

from _support.training import model_step
from weightsync.errors import InvalidInputError, SnapshotNotFoundError, StorageError
from weightsync.toymodel import build_model
from weightsync.trainer import TrainingClient

pytestmark = pytest.mark.timeout(120)


def _trained(storage: Path, *, steps: int) -> tuple[TrainingClient, torch.optim.Optimizer]:
    model = build_model("tiny", seed=0)
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    for step in range(steps):
        model_step(model, optimizer, seed=step)
    return TrainingClient(model, storage=storage, optimizer=optimizer), optimizer


def _fresh(storage: Path) -> tuple[TrainingClient, torch.optim.Optimizer]:
    model = build_model("tiny", seed=123)  # different weights until the state is loaded
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    return TrainingClient(model, storage=storage, optimizer=optimizer), optimizer


def _resume_exactly(tmp_path: Path, *, by: str) -> None:
    client, optimizer = _trained(tmp_path, steps=3)
    location = client.save_state("resume")
    expected = [model_step(client.model, optimizer, seed=s) for s in (100, 101, 102)]
    expected_weights = {k: v.clone() for k, v in client.model.state_dict().items()}

    resumed, resumed_optimizer = _fresh(tmp_path)
    assert resumed.session_id != client.session_id
    resumed.load_state_with_optimizer(location if by == "path" else "resume")
    losses = [model_step(resumed.model, resumed_optimizer, seed=s) for s in (100, 101, 102)]

    assert losses == expected  # bit-identical floats, step after step
    for name, tensor in resumed.model.state_dict().items():
        assert torch.equal(tensor, expected_weights[name]), name


def test_a_new_client_resumes_exactly_from_the_returned_path(tmp_path: Path) -> None:
    _resume_exactly(tmp_path, by="path")


def test_a_new_client_finds_a_state_by_its_plain_name(tmp_path: Path) -> None:
    _resume_exactly(tmp_path, by="name")


def test_resume_inside_an_initialized_process_group(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("GLOO_SOCKET_IFNAME", "lo")
    dist.init_process_group(
        "gloo", init_method=f"file://{tmp_path / 'pg-rendezvous'}", rank=0, world_size=1
    )
    try:
        _resume_exactly(tmp_path / "states-root", by="path")
    finally:
        dist.destroy_process_group()


def test_load_state_restores_weights_only(tmp_path: Path) -> None:
    client, _ = _trained(tmp_path, steps=2)
    saved = {k: v.clone() for k, v in client.model.state_dict().items()}
    location = client.save_state("weights")

    resumed, resumed_optimizer = _fresh(tmp_path)
    assert resumed.load_state(location) == location
    for name, tensor in resumed.model.state_dict().items():
        assert torch.equal(tensor, saved[name]), name
    assert resumed_optimizer.state == {}


def test_a_name_saved_by_several_sessions_must_be_qualified(tmp_path: Path) -> None:
    first, _ = _trained(tmp_path, steps=1)
    second, _ = _trained(tmp_path, steps=1)
    first.save_state("shared")
    second.save_state("shared")

    third, _ = _fresh(tmp_path)
    with pytest.raises(InvalidInputError, match="several sessions"):
        third.load_state("shared")
    # A session finds its own state by the plain name.
    assert first.load_state("shared").endswith(f"shared-{first.session_id}")
    assert third.load_state(f"shared-{second.session_id}").endswith(second.session_id)


def test_missing_states_and_missing_optimizer_are_clear(tmp_path: Path, model: Any) -> None:
    client, _ = _trained(tmp_path, steps=1)
    with pytest.raises(SnapshotNotFoundError, match="no resume state named 'never-saved'"):
        client.load_state("never-saved")
    with pytest.raises(SnapshotNotFoundError, match="no complete resume state"):
        client.load_state(tmp_path / "nowhere")
    without_optimizer = TrainingClient(model, storage=tmp_path)
    with pytest.raises(InvalidInputError, match="no optimizer"):
        without_optimizer.load_state_with_optimizer("anything")


def test_a_state_from_another_architecture_is_refused(tmp_path: Path) -> None:
    client, _ = _trained(tmp_path, steps=1)
    location = client.save_state("tiny")
    other = build_model("tiny", seed=0, hidden_size=16, head_dim=4)
    other_client = TrainingClient(other, storage=tmp_path)
    with pytest.raises(InvalidInputError, match="same model architecture"):
        other_client.load_state(location)


def test_saving_state_to_storage_that_cannot_be_written(tmp_path: Path, model: Any) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    client = TrainingClient(model, storage=blocker / "root")
    with pytest.raises(StorageError) as failure:
        client.save_state("blocked")
    assert f"blocked-{client.session_id}" in str(failure.value)


def test_a_lora_client_resumes_its_adapter_and_optimizer_exactly(tmp_path: Path) -> None:
    def lora_client() -> tuple[TrainingClient, torch.optim.Optimizer]:
        client = TrainingClient(build_model("tiny", seed=0), storage=tmp_path, lora_rank=2)
        client.model.train()
        trainable = [p for p in client.model.parameters() if p.requires_grad]
        client.optimizer = torch.optim.AdamW(trainable, lr=1e-2)
        return client, client.optimizer

    client, optimizer = lora_client()
    for step in range(2):
        model_step(client.model, optimizer, seed=step)
    location = client.save_state("adapter")
    expected = [model_step(client.model, optimizer, seed=s) for s in (50, 51)]

    resumed, resumed_optimizer = lora_client()
    resumed.load_state_with_optimizer(location)
    assert [model_step(resumed.model, resumed_optimizer, seed=s) for s in (50, 51)] == expected
