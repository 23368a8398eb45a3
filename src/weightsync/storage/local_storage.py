"""Local-directory storage: temp file in the same directory, fsync, `os.replace`.

Every path is resolved (symlinks followed) and must stay inside the root: a link
in the storage directory that points at `/etc` is refused like `..` is. Errors
are classified: a missing file is `StorageFileNotFoundError`, a name the
filesystem cannot hold (too long, a symlink loop) `StoragePathError` (bad input),
anything else `StorageError`.
"""

from __future__ import annotations

import contextlib
import logging
import os
import pathlib
import secrets
import shutil

from weightsync.errors import StoragePathError
from weightsync.storage.base import classify_os_error, split_path

logger = logging.getLogger(__name__)

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

    def _path(self, path: str, *, follow_last: bool = True) -> pathlib.Path:
        """The path under the root, refused if it resolves (through symlinks) outside it.

        With `follow_last=False` only its parent must (removing a link removes the link).
        """
        target = self.root.joinpath(*split_path(path, url=self.url))
        try:
            resolved = (target if follow_last else target.parent).resolve()
            root = self.root.resolve()
        except OSError as e:
            raise classify_os_error(e, "resolve", target) from e
        if resolved != root and not resolved.is_relative_to(root):
            # Where the link leads stays in the log: the error may travel to a client.
            logger.warning("refused %s: it resolves to %s, outside %s", target, resolved, root)
            raise StoragePathError(
                f"storage path {path!r} under {self.url} resolves outside the storage root "
                "(a symlink leads out); weightsync reads and writes only inside it"
            )
        return target

    def child_url(self, *parts: str) -> str:
        return self.root.joinpath(*split_path("/".join(parts), url=self.url)).as_posix()

    def exists(self, path: str) -> bool:
        target = self._path(path)
        try:
            target.stat()
        except FileNotFoundError:
            return False
        except NotADirectoryError:
            return False
        except OSError as e:
            raise classify_os_error(e, "check", target) from e
        return True

    def read_bytes(self, path: str) -> bytes:
        target = self._path(path)
        try:
            return target.read_bytes()
        except OSError as e:
            raise classify_os_error(e, "read", target) from e

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
            with contextlib.suppress(OSError):
                tmp.unlink()
            raise classify_os_error(e, "write", target) from e

    def list_dir(self, path: str = "") -> list[str]:
        target = self._path(path)
        try:
            names = [p.name for p in target.iterdir()]
        except OSError as e:
            raise classify_os_error(e, "list", target) from e
        return sorted(n for n in names if not is_temp_name(n))

    def size_bytes(self, path: str) -> int:
        target = self._path(path)
        try:
            return target.stat().st_size
        except OSError as e:
            raise classify_os_error(e, "stat", target) from e

    def remove(self, path: str, *, recursive: bool = False) -> None:
        target = self._path(path, follow_last=False)
        try:
            if target.is_dir() and not target.is_symlink():
                if recursive:
                    shutil.rmtree(target)
                else:
                    target.rmdir()
            else:
                target.unlink()
        except OSError as e:
            raise classify_os_error(e, "remove", target) from e

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
