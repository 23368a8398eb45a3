"""Local writes: temp name in the same directory, then rename; temp files never listed."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from weightsync.errors import (
    InvalidInputError,
    StorageError,
    StorageFileNotFoundError,
    StoragePathError,
)
from weightsync.storage import LocalStorage, StorageWrapper

pytestmark = pytest.mark.timeout(30)


def test_write_leaves_no_temporary_files(tmp_path: Path) -> None:
    storage = LocalStorage(tmp_path)
    storage.write_bytes("a/b/c.bin", b"data")
    assert sorted(os.listdir(tmp_path / "a" / "b")) == ["c.bin"]


def test_temporary_names_are_hidden_from_listings(tmp_path: Path) -> None:
    storage = LocalStorage(tmp_path)
    storage.write_bytes("x", b"1")
    (tmp_path / ".x.deadbeef.tmp").write_bytes(b"partial")
    assert storage.list_dir("") == ["x"]


def test_failed_write_keeps_the_old_file_and_cleans_up(tmp_path: Path) -> None:
    storage = LocalStorage(tmp_path)
    storage.write_bytes("d/f", b"old")
    # A directory where the file should go makes the rename fail after the temp is written.
    storage.write_bytes("d/blocker/inner", b"x")
    with pytest.raises(StorageError, match="blocker"):
        storage.write_bytes("d/blocker", b"new")
    assert storage.read_bytes("d/f") == b"old"
    assert sorted(os.listdir(tmp_path / "d")) == ["blocker", "f"]


# --- containment and error classes ------------------------------------------------------


@pytest.fixture
def linked(tmp_path: Path) -> tuple[LocalStorage, Path]:
    """A storage root holding a symlink to a directory outside it, and one inside it."""
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret").write_bytes(b"not yours")
    root = tmp_path / "root"
    (root / "inner").mkdir(parents=True)
    (root / "inner" / "f").write_bytes(b"mine")
    (root / "out").symlink_to(outside, target_is_directory=True)
    (root / "in").symlink_to(root / "inner", target_is_directory=True)
    return LocalStorage(root), outside


def test_symlinks_out_of_the_root_are_refused_for_every_operation(linked) -> None:
    storage, outside = linked
    calls = {
        "read": lambda: storage.read_bytes("out/secret"),
        "exists": lambda: storage.exists("out/secret"),
        "size": lambda: storage.size_bytes("out/secret"),
        "list": lambda: storage.list_dir("out"),
        "write": lambda: storage.write_bytes("out/planted", b"x"),
        "local_path": lambda: storage.local_path("out/secret"),
    }
    for what, call in calls.items():
        with pytest.raises(StoragePathError, match="outside the storage root") as e:
            call()
        assert isinstance(e.value, InvalidInputError), what
    assert sorted(p.name for p in outside.iterdir()) == ["secret"]  # nothing planted


def test_symlinks_inside_the_root_work_and_a_link_out_can_be_removed(linked) -> None:
    storage, outside = linked
    assert storage.read_bytes("in/f") == b"mine"
    storage.remove("out")  # the link itself, not what it points at
    assert not (storage.root / "out").exists() and (outside / "secret").exists()


def test_a_name_the_filesystem_cannot_hold_is_bad_input_not_transient(tmp_path: Path) -> None:
    storage = LocalStorage(tmp_path)
    name = "n" * 300  # one segment over every common filesystem's 255-byte limit
    for call in (
        lambda: storage.read_bytes(name),
        lambda: storage.exists(name),
        lambda: storage.write_bytes(name, b"x"),
    ):
        with pytest.raises(StoragePathError, match="not a valid path"):
            call()
    with pytest.raises(StorageFileNotFoundError):
        storage.read_bytes("inner-missing/f")


class _Counting(StorageWrapper):
    """Counts reads through to a real storage (the retry policy's seam)."""

    def __init__(self, inner: LocalStorage) -> None:
        super().__init__(inner)
        self.reads = 0

    def read_bytes(self, path: str) -> bytes:
        self.reads += 1
        return self.inner.read_bytes(path)


def test_bad_paths_and_missing_files_are_not_retried(tmp_path: Path) -> None:
    from weightsync.server.fetch_policy import FetchPolicy, RetryingStorage

    counting = _Counting(LocalStorage(tmp_path))
    retrying = RetryingStorage(counting, FetchPolicy(attempts=5, backoff_s=0))
    with pytest.raises(StoragePathError):
        retrying.read_bytes("n" * 300)
    with pytest.raises(StorageFileNotFoundError):
        retrying.read_bytes("missing")
    assert counting.reads == 2
