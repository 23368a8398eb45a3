"""Local writes: temp name in the same directory, then rename; temp files never listed."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from weightsync.errors import StorageError
from weightsync.storage import LocalStorage

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
