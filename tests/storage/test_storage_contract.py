"""The Storage protocol, run against every backend: local path, memory://, s3:// (moto)."""

from __future__ import annotations

import secrets
from typing import Any

import pytest

from weightsync.errors import InvalidInputError, StorageError, StorageFileNotFoundError
from weightsync.storage import FsspecStorage, LocalStorage, Storage, open_storage

pytestmark = pytest.mark.timeout(60)


@pytest.fixture(params=["local", "memory", "s3"])
def storage(request: pytest.FixtureRequest, tmp_path: Any) -> Storage:
    if request.param == "local":
        return open_storage(tmp_path / "root")
    if request.param == "memory":
        return open_storage(f"memory://ws-test-{secrets.token_hex(4)}/root")
    url = request.getfixturevalue("s3_bucket_url")
    return open_storage(url, **request.getfixturevalue("s3_storage_options"))


def test_round_trip(storage: Storage) -> None:
    storage.write_bytes("snap/a.bin", b"hello")
    storage.write_bytes("snap/b.bin", memoryview(b"world!"))
    assert storage.read_bytes("snap/a.bin") == b"hello"
    assert storage.read_bytes("snap/b.bin") == b"world!"
    assert storage.size_bytes("snap/b.bin") == 6
    assert storage.exists("snap/a.bin")
    assert storage.exists("snap")
    assert not storage.exists("snap/c.bin")
    assert storage.list_dir("") == ["snap"]
    assert storage.list_dir("snap") == ["a.bin", "b.bin"]


def test_overwrite_replaces_whole_file(storage: Storage) -> None:
    storage.write_bytes("f", b"x" * 100)
    storage.write_bytes("f", b"yz")
    assert storage.read_bytes("f") == b"yz"
    assert storage.list_dir("") == ["f"]


def test_missing_paths_raise_not_found(storage: Storage) -> None:
    with pytest.raises(StorageFileNotFoundError, match="nope"):
        storage.read_bytes("nope/x")
    with pytest.raises(FileNotFoundError):
        storage.size_bytes("nope")
    with pytest.raises(StorageFileNotFoundError):
        storage.list_dir("nope")


def test_remove(storage: Storage) -> None:
    storage.write_bytes("d/one", b"1")
    storage.write_bytes("d/two", b"2")
    storage.remove("d/one")
    assert storage.list_dir("d") == ["two"]
    storage.remove("d", recursive=True)
    assert not storage.exists("d/two")
    with pytest.raises(StorageFileNotFoundError):
        storage.remove("d/two")


@pytest.mark.parametrize("bad", ["../x", "/abs", "a//b", "a/./b", "a\\b", "a/.."])
def test_paths_cannot_leave_the_root(storage: Storage, bad: str) -> None:
    with pytest.raises(InvalidInputError, match="storage path"):
        storage.write_bytes(bad, b"x")
    with pytest.raises(InvalidInputError):
        storage.read_bytes(bad)


def test_child_url_names_the_path(storage: Storage) -> None:
    assert storage.child_url("snap", "x.json") == f"{storage.url}/snap/x.json"
    assert not storage.url.endswith("/")


def test_local_path_only_on_local_disk(storage: Storage) -> None:
    local = storage.local_path("snap")
    if isinstance(storage, LocalStorage):
        assert local is not None and local == storage.root / "snap"
    else:
        assert local is None


def test_open_storage_picks_the_backend(tmp_path: Any) -> None:
    assert isinstance(open_storage(tmp_path), LocalStorage)
    assert isinstance(open_storage(str(tmp_path)), LocalStorage)
    file_url = open_storage(f"file://{tmp_path}")
    assert isinstance(file_url, LocalStorage) and file_url.root == tmp_path
    mem = open_storage("memory://bucket/x/")
    assert isinstance(mem, FsspecStorage) and mem.url == "memory://bucket/x"
    assert open_storage(mem) is mem
    with pytest.raises(InvalidInputError):
        open_storage(42)  # type: ignore[arg-type]


def test_unknown_protocol_is_a_storage_error() -> None:
    with pytest.raises(StorageError, match="nosuchproto"):
        open_storage("nosuchproto://bucket/x")
