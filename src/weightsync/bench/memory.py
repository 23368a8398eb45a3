"""Peak resident memory of the trainer and the replica, sampled while they sync.

`ru_maxrss` only ever grows over a process's life, so it cannot tell one
method's sync from the model build before it; a sampler thread polling RSS (of
this process, and of the server process tree) during one method's window can.
Short peaks between two polls are missed, so the numbers are lower bounds at
the poll interval's resolution.
"""

from __future__ import annotations

import os
import threading
from types import TracebackType

import psutil


def tree_rss_bytes(pid: int) -> int:
    """Resident bytes of process `pid` and all its descendants (0 if it is gone)."""
    try:
        root = psutil.Process(pid)
        procs = [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return 0
    total = 0
    for proc in procs:
        try:
            total += int(proc.memory_info().rss)
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue  # exited between listing and reading: it holds no memory now
    return total


class PeakRssSampler:
    """Context manager: peak RSS of this process and of `server_pid`'s tree.

    `trainer_peak_bytes` is this process's peak during the window and
    `trainer_start_bytes` its RSS when the window opened, so their difference is
    what the syncs added on top of what the trainer already held.
    """

    def __init__(self, *, server_pid: int | None = None, interval_s: float = 0.02) -> None:
        self.server_pid = server_pid
        self.interval_s = interval_s
        self.trainer_start_bytes = 0
        self.trainer_peak_bytes = 0
        self.replica_peak_bytes = 0
        self._self = psutil.Process(os.getpid())
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def sample(self) -> None:
        """Take one sample now (also called by the thread)."""
        rss = int(self._self.memory_info().rss)
        self.trainer_peak_bytes = max(self.trainer_peak_bytes, rss)
        if self.server_pid is not None:
            self.replica_peak_bytes = max(self.replica_peak_bytes, tree_rss_bytes(self.server_pid))

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            self.sample()

    def __enter__(self) -> PeakRssSampler:
        self.trainer_start_bytes = int(self._self.memory_info().rss)
        self.sample()
        self._thread = threading.Thread(target=self._run, name="bench-rss", daemon=True)
        self._thread.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        self.sample()

    @property
    def trainer_added_bytes(self) -> int:
        return max(0, self.trainer_peak_bytes - self.trainer_start_bytes)
