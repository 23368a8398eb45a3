"""Local-directory storage: temp file in the same directory, fsync, `os.replace`."""

from __future__ import annotations

import contextlib
import os
import pathlib
import secrets
import shutil

from weightsync.errors import StorageError, StorageFileNotFoundError
from weightsync.storage.base import split_path

_TMP_SUFFIX = ".tmp"


def is_temp_name(name: str) -> bool:
    """True for the names `write_bytes` gives files before renaming them."""
    return name.startswith(".") and name.endswith(_TMP_SUFFIX)


class LocalStorage:
    """A directory on local disk (created on first write)."""

    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = pathlib.Path(root).expanduser().absolute()
        self.url = self.root.as_posix()

    def __repr__(self) -> str:
        return f"LocalStorage({self.url!r})"

    def _path(self, path: str) -> pathlib.Path:
        return self.root.joinpath(*split_path(path, url=self.url))

    def child_url(self, *parts: str) -> str:
        return self._path("/".join(parts)).as_posix()

    def exists(self, path: str) -> bool:
        return self._path(path).exists()

    def read_bytes(self, path: str) -> bytes:
        target = self._path(path)
        try:
            return target.read_bytes()
        except FileNotFoundError as e:
            raise StorageFileNotFoundError(f"{target} does not exist") from e
        except OSError as e:
            raise StorageError(f"cannot read {target}: {e}") from e

    def write_bytes(self, path: str, data: bytes | memoryview) -> None:
        target = self._path(path)
        tmp = target.with_name(f".{target.name}.{secrets.token_hex(4)}{_TMP_SUFFIX}")
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
            with tmp.open("wb") as f:
                f.write(data)
                f.flush()
                # The rename below must never publish a file whose bytes are not on disk.
                os.fsync(f.fileno())
            tmp.replace(target)
            _fsync_dir(target.parent)
        except OSError as e:
            with contextlib.suppress(FileNotFoundError):
                tmp.unlink()
            raise StorageError(f"cannot write {target}: {e}") from e

    def list_dir(self, path: str = "") -> list[str]:
        target = self._path(path)
        try:
            names = [p.name for p in target.iterdir()]
        except FileNotFoundError as e:
            raise StorageFileNotFoundError(f"{target} does not exist") from e
        except OSError as e:
            raise StorageError(f"cannot list {target}: {e}") from e
        return sorted(n for n in names if not is_temp_name(n))

    def size_bytes(self, path: str) -> int:
        target = self._path(path)
        try:
            return target.stat().st_size
        except FileNotFoundError as e:
            raise StorageFileNotFoundError(f"{target} does not exist") from e
        except OSError as e:
            raise StorageError(f"cannot stat {target}: {e}") from e

    def remove(self, path: str, *, recursive: bool = False) -> None:
        target = self._path(path)
        try:
            if target.is_dir() and not target.is_symlink():
                if recursive:
                    shutil.rmtree(target)
                else:
                    target.rmdir()
            else:
                target.unlink()
        except FileNotFoundError as e:
            raise StorageFileNotFoundError(f"{target} does not exist") from e
        except OSError as e:
            raise StorageError(f"cannot remove {target}: {e}") from e

    def local_path(self, path: str) -> pathlib.Path | None:
        return self._path(path)


def _fsync_dir(directory: pathlib.Path) -> None:
    # Makes the rename itself durable; not every platform can open a directory.
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
