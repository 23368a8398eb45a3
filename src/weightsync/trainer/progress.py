"""Progress for long snapshot writes: a rich bar on a terminal, log lines otherwise.

The snapshot writer knows nothing of progress; it writes every file through
`Storage.write_bytes`, so counting the bytes that pass that seam is enough.
"""

from __future__ import annotations

import contextlib
import logging
import sys
from collections.abc import Callable, Iterator

from weightsync.storage import Storage, StorageWrapper

logger = logging.getLogger(__name__)

# Writes smaller than this finish too fast for a bar to help.
MIN_PROGRESS_BYTES = 256 * 1024 * 1024


class CountingStorage(StorageWrapper):
    """A `Storage` that forwards everything and reports each write's size."""

    def __init__(self, inner: Storage, on_write: Callable[[int], None]) -> None:
        super().__init__(inner)
        self._on_write = on_write

    def write_bytes(self, path: str, data: bytes | memoryview) -> None:
        self.inner.write_bytes(path, data)
        self._on_write(len(data))


@contextlib.contextmanager
def write_progress(storage: Storage, label: str, *, expected_bytes: int) -> Iterator[Storage]:
    """Yield the storage to write through, showing a bar when stderr is a terminal.

    `expected_bytes` sizes the bar (a delta usually writes much less; the bar then
    simply ends early). Short writes and non-terminal runs get the storage as is.
    """
    if expected_bytes < MIN_PROGRESS_BYTES or not _stderr_is_terminal():
        yield storage
        return
    from rich.console import Console
    from rich.progress import (
        BarColumn,
        DownloadColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TransferSpeedColumn,
    )

    columns = (
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        DownloadColumn(),
        TransferSpeedColumn(),
        TimeElapsedColumn(),
    )
    with Progress(*columns, console=Console(stderr=True), transient=True) as bar:
        task = bar.add_task(label, total=expected_bytes)
        yield CountingStorage(storage, lambda num_bytes: bar.advance(task, num_bytes))


def _stderr_is_terminal() -> bool:
    try:
        return sys.stderr.isatty()
    except (AttributeError, ValueError):
        return False
