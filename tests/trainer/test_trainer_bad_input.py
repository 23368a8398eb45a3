"""Bad input and failed writes: specific errors, nothing half-visible, chain state kept."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import pytest
import torch

from _support.bits import assert_bits_equal
from _support.training import model_step
from weightsync.errors import (
    ChainError,
    InvalidIdentityError,
    InvalidInputError,
    StorageError,
    UnknownChecksumError,
    UnknownCodecError,
    UnsupportedDtypeError,
)
from weightsync.snapshot import SnapshotStore
from weightsync.storage import LocalStorage, StorageWrapper
from weightsync.toymodel import build_model
from weightsync.trainer import TrainingClient

pytestmark = pytest.mark.timeout(120)


class FailingStorage(StorageWrapper):
    """Local storage that fails the `fail_at`-th write (1-based) from `arm()` on."""

    def __init__(self, root: Path) -> None:
        super().__init__(LocalStorage(root))
        self.writes = 0
        self.fail_at: int | None = None
        self._lock = threading.Lock()  # a base save writes its weight files on two threads

    def arm(self, fail_at: int) -> None:
        self.writes = 0
        self.fail_at = fail_at

    def write_bytes(self, path: str, data: bytes | memoryview) -> None:
        with self._lock:
            self.writes += 1
            fail = self.fail_at is not None and self.writes == self.fail_at
            if fail:
                self.fail_at = None
        if fail:
            raise StorageError(f"injected failure writing {self.inner.child_url(path)}")
        self.inner.write_bytes(path, data)


@pytest.mark.parametrize("fail_at", [1, 3, 5])
def test_a_failure_mid_write_publishes_nothing_and_keeps_the_chain(
    tmp_path: Path, model: Any, optimizer: torch.optim.Optimizer, fail_at: int
) -> None:
    storage = FailingStorage(tmp_path)
    client = TrainingClient(model, storage=storage, optimizer=optimizer)
    good = client.save_weights_for_sampler_ext("good")
    model_step(model, optimizer, seed=1)

    storage.arm(fail_at)
    with pytest.raises(StorageError) as failure:
        client.save_weights_for_sampler_ext("broken")
    message = str(failure.value)
    assert f"broken-{client.session_id}" in message
    assert "injected failure" in message
    assert f"still applies onto {good.snapshot_name}" in message

    store = SnapshotStore(tmp_path)
    assert store.list_snapshots() == [good.snapshot_name]
    assert not store.exists(f"broken-{client.session_id}")
    assert client.last_snapshot == good.snapshot_name
    # The next delta references the last good snapshot and is exact.
    retry = client.save_weights_for_sampler_ext("broken")
    assert retry.checkpoint_type == "delta"
    assert retry.parent == good.snapshot_name
    assert_bits_equal(store.materialize(retry.snapshot_name), client.exported_weights())


def test_a_failed_first_base_leaves_the_next_save_a_base(tmp_path: Path, model: Any) -> None:
    storage = FailingStorage(tmp_path)
    client = TrainingClient(model, storage=storage)
    storage.arm(2)
    with pytest.raises(StorageError, match="the next save is a base"):
        client.save_weights_for_sampler_ext("first")
    with pytest.raises(ChainError, match="no previous snapshot"):
        client.save_weights_for_sampler_ext("second", checkpoint_type="delta")
    assert client.save_weights_for_sampler_ext("second").checkpoint_type == "base"


def test_storage_that_cannot_be_written_names_the_snapshot(tmp_path: Path, model: Any) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    client = TrainingClient(model, storage=blocker / "snapshots")

    with pytest.raises(StorageError) as failure:
        client.save_weights_for_sampler_ext("step-1")
    assert f"step-1-{client.session_id}" in str(failure.value)
    assert "writable" in str(failure.value)
    assert client.last_snapshot is None


def test_unknown_checkpoint_type_and_invalid_names_fail_before_any_work(
    tmp_path: Path, model: Any
) -> None:
    client = TrainingClient(model, storage=tmp_path / "snaps")

    with pytest.raises(InvalidInputError, match=r"unknown checkpoint_type 'full'.*base, delta"):
        client.save_weights_for_sampler_ext("x", checkpoint_type="full")
    for bad in ["", "a/b", "..", "tab\there", " padded"]:
        with pytest.raises(InvalidIdentityError):
            client.save_weights_for_sampler_ext(bad)
    assert not (tmp_path / "snaps").exists()


def test_delta_before_any_base_and_merged_base_without_lora(tmp_path: Path, model: Any) -> None:
    client = TrainingClient(model, storage=tmp_path)

    with pytest.raises(ChainError, match="save a base first"):
        client.save_weights_for_sampler_ext("d", checkpoint_type="delta")
    with pytest.raises(InvalidInputError, match=r"merged_base.*lora_rank=0"):
        client.save_weights_for_sampler_ext("m", checkpoint_type="merged_base")
    assert SnapshotStore(tmp_path).list_snapshots() == []


@pytest.mark.parametrize("export_dtype", ["int8", torch.int32, "float64", "complex64", "nonsense"])
def test_dtypes_that_cannot_be_exported_are_refused(
    tmp_path: Path, model: Any, export_dtype: Any
) -> None:
    with pytest.raises(UnsupportedDtypeError, match=r"cannot be exported.*bfloat16"):
        TrainingClient(model, storage=tmp_path, export_dtype=export_dtype)


def test_unknown_codec_and_checksum_are_refused(tmp_path: Path, model: Any) -> None:
    with pytest.raises(UnknownCodecError, match="known"):
        TrainingClient(model, storage=tmp_path, compression_format="arc_v9")
    with pytest.raises(UnknownChecksumError, match="known"):
        TrainingClient(model, storage=tmp_path, checksum_format="md5")


class _Overlapping(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.whole = torch.nn.Parameter(torch.randn(4, 4))
        self.part = torch.nn.Parameter(self.whole.data[1:3])


class _Tied(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.first = torch.nn.Linear(4, 4, bias=False)
        self.second = torch.nn.Linear(4, 4, bias=False)
        self.second.weight = self.first.weight


class _IntegerBuffer(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.proj = torch.nn.Linear(4, 4)
        self.register_buffer("num_steps", torch.zeros(1, dtype=torch.long))


def test_partly_shared_tensors_are_refused_naming_both(tmp_path: Path) -> None:
    client = TrainingClient(_Overlapping(), storage=tmp_path)
    with pytest.raises(InvalidInputError) as failure:
        client.save_weights_for_sampler_ext("overlap")
    message = str(failure.value)
    assert "'whole'" in message and "'part'" in message
    assert f"overlap-{client.session_id}" in message
    assert SnapshotStore(tmp_path).list_snapshots() == []


def test_fully_tied_tensors_keep_the_first_name(tmp_path: Path) -> None:
    module = _Tied()
    client = TrainingClient(module, storage=tmp_path)
    result = client.save_weights_for_sampler_ext("tied")
    weights = SnapshotStore(tmp_path).materialize(result.snapshot_name)
    assert list(weights) == ["first.weight"]


def test_integer_tensors_and_meta_tensors_are_refused(tmp_path: Path) -> None:
    client = TrainingClient(_IntegerBuffer(), storage=tmp_path)
    with pytest.raises(UnsupportedDtypeError, match=r"'num_steps'.*torch.int64.*non-persistent"):
        client.save_weights_for_sampler_ext("ints")

    with torch.device("meta"):
        meta_model = build_model("tiny")
    meta_client = TrainingClient(meta_model, storage=tmp_path)
    with pytest.raises(InvalidInputError, match="meta device"):
        meta_client.save_weights_for_sampler_ext("meta")
    assert SnapshotStore(tmp_path).list_snapshots() == []


def test_constructor_refuses_what_is_not_a_model(tmp_path: Path, model: Any) -> None:
    with pytest.raises(InvalidInputError, match=r"torch\.nn\.Module"):
        TrainingClient({"w": torch.zeros(2)}, storage=tmp_path)  # type: ignore[arg-type]
    with pytest.raises(InvalidInputError, match="lora_rank"):
        TrainingClient(model, storage=tmp_path, lora_rank=-1)
    with pytest.raises(InvalidInputError, match="tokenizer_dir"):
        TrainingClient(model, storage=tmp_path, tokenizer_dir=tmp_path / "missing")
