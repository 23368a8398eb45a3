"""A write that fails midway leaves nothing that reads as a snapshot."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest

from _support.bits import assert_bits_equal
from _support.models import toy_weights
from _support.weights import perturb
from weightsync.errors import SnapshotNotFoundError, StorageError
from weightsync.snapshot import MANIFEST_FILE, SnapshotStore, write_base, write_delta
from weightsync.storage import LocalStorage, Storage, StorageWrapper

pytestmark = pytest.mark.timeout(60)


class FailingStorage(StorageWrapper):
    """A real local storage whose `write_bytes` fails after `ok_writes` writes (a seam fault)."""

    def __init__(self, inner: Storage, *, ok_writes: int, fail_remove: bool = False) -> None:
        super().__init__(inner)
        self.ok_writes = ok_writes
        self.fail_remove = fail_remove
        self.written: list[str] = []
        self.started = 0
        self._lock = threading.Lock()  # a base save writes its weight files on two threads

    def write_bytes(self, path: str, data: bytes | memoryview) -> None:
        with self._lock:
            self.started += 1
            fail = self.started > self.ok_writes
        if fail:
            raise StorageError(f"injected failure writing {path}")
        self.inner.write_bytes(path, data)
        with self._lock:
            self.written.append(path)

    def remove(self, path: str, *, recursive: bool = False) -> None:
        if self.fail_remove:
            raise StorageError(f"injected failure removing {path}")
        self.inner.remove(path, recursive=recursive)


@pytest.mark.parametrize("ok_writes", [0, 2, 4, 5])
def test_failed_base_write_is_cleaned_up(
    tmp_path: Path, tiny_config: object, ok_writes: int
) -> None:
    failing = FailingStorage(LocalStorage(tmp_path), ok_writes=ok_writes)
    with pytest.raises(StorageError, match="injected"):
        write_base(failing, "b", toy_weights(), config=tiny_config)
    assert MANIFEST_FILE not in " ".join(failing.written)
    assert not (tmp_path / "b").exists()
    assert SnapshotStore(tmp_path).list_snapshots() == []


def test_failed_write_whose_cleanup_fails_is_still_not_a_snapshot(
    tmp_path: Path, tiny_config: object
) -> None:
    weights = toy_weights()
    failing = FailingStorage(LocalStorage(tmp_path), ok_writes=4, fail_remove=True)
    with pytest.raises(StorageError, match="injected failure writing"):
        write_base(failing, "b", weights, config=tiny_config)
    assert len(list((tmp_path / "b").iterdir())) == 4  # the leftovers
    store = SnapshotStore(tmp_path)
    assert store.list_snapshots() == []
    with pytest.raises(SnapshotNotFoundError, match="incomplete"):
        store.fetch("b")
    # A retry under the same identity replaces the leftovers.
    write_base(tmp_path, "b", weights, config=tiny_config)
    assert_bits_equal(store.materialize("b"), weights)


def test_failed_delta_write_keeps_the_chain_intact(tmp_path: Path, tiny_config: object) -> None:
    w0 = toy_weights()
    w1 = perturb(w0, seed=1)
    base = write_base(tmp_path, "b", w0, config=tiny_config)
    failing = FailingStorage(LocalStorage(tmp_path), ok_writes=5)
    with pytest.raises(StorageError):
        write_delta(failing, "d", parent=base, old=w0, new=w1)
    store = SnapshotStore(tmp_path)
    assert store.list_snapshots() == ["b"]
    assert store.verify("b").ok


class OverlapStorage(StorageWrapper):
    """A real local storage that records how many weight-file writes run at once."""

    def __init__(self, inner: Storage) -> None:
        super().__init__(inner)
        self.running = 0
        self.most = 0
        self._lock = threading.Lock()

    def write_bytes(self, path: str, data: bytes | memoryview) -> None:
        weights = path.endswith(".safetensors")
        if weights:
            with self._lock:
                self.running += 1
                self.most = max(self.most, self.running)
            time.sleep(0.05)  # long enough for the next file's write to start
        try:
            self.inner.write_bytes(path, data)
        finally:
            if weights:
                with self._lock:
                    self.running -= 1


def test_base_weight_files_are_written_at_once_within_the_write_ahead_budget(
    tmp_path: Path, tiny_config: object, monkeypatch: pytest.MonkeyPatch
) -> None:
    from weightsync.snapshot import writer

    weights = toy_weights()
    overlapping = OverlapStorage(LocalStorage(tmp_path / "overlap"))
    write_base(overlapping, "b", weights, config=tiny_config)
    assert 1 < overlapping.most <= writer._WEIGHT_FILE_WRITERS
    assert_bits_equal(SnapshotStore(tmp_path / "overlap").materialize("b"), weights)
    # A budget smaller than any file: one file encoded and written at a time.
    monkeypatch.setattr(writer, "_WRITE_AHEAD_BYTES", 1)
    alone = OverlapStorage(LocalStorage(tmp_path / "alone"))
    write_base(alone, "b", weights, config=tiny_config)
    assert alone.most == 1
    assert SnapshotStore(tmp_path / "alone").verify("b").ok
    files = sorted(p.name for p in (tmp_path / "alone" / "b").glob("*.safetensors"))
    assert len(files) > 1
    for name in files:  # writing at once changes no byte
        alone_bytes = (tmp_path / "alone" / "b" / name).read_bytes()
        assert alone_bytes == (tmp_path / "overlap" / "b" / name).read_bytes()
