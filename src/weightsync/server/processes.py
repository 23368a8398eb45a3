"""Processes weightsync starts: start one with its log, wait until it is ready, stop it.

One rule for every child process (a local deployment's `weightsync serve`, the
replica processes of a gateway): waiting for readiness is bounded and fails as
soon as the process exits, naming it and quoting its log; stopping sends SIGTERM
(a graceful shutdown), waits a bounded time, then SIGKILL. A process started in
its own process group (`own_group=True`) is signalled as a group, so the
processes it started go with it.

A process announces its address in a ready file, `{"url", "pid"}`, written
atomically once it serves (`write_ready_file`, `ready_file_url`). `watch_parent`
is a child's side of the rule: it stops itself when the process that started it
is gone.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import TypeVar

import psutil

from weightsync.errors import DeploymentError, HotloadTimeoutError

logger = logging.getLogger(__name__)

T = TypeVar("T")

#: The environment variable that carries an API key to a child (never its argv, which
#: `ps` shows, nor a file).
API_KEY_ENV = "WEIGHTSYNC_API_KEY"
#: Characters of a child's log quoted in an error.
LOG_TAIL_CHARS = 4000
#: Seconds to wait for a process to go after SIGKILL.
KILL_WAIT_S = 5.0
#: Seconds between a child's checks that its parent still runs.
PARENT_POLL_S = 0.5
#: A recorded start time within this many seconds is the same process (not a reused pid).
SAME_PROCESS_S = 1.0


class ManagedProcess:
    """A process started here (`start`), or one another process started and recorded (`attach`).

    `name` is how errors and logs call it ("deployment 'main'", "replica-1").
    """

    def __init__(
        self,
        *,
        name: str,
        pid: int,
        create_time: float | None,
        own_group: bool,
        log_file: Path | None = None,
        popen: subprocess.Popen[bytes] | None = None,
    ) -> None:
        self.name = name
        self.pid = pid
        self.create_time = create_time
        self.own_group = own_group
        self.log_file = log_file
        self._popen = popen

    @classmethod
    def start(
        cls,
        name: str,
        command: Sequence[str],
        *,
        env: Mapping[str, str],
        log_file: Path | None = None,
        own_group: bool = False,
    ) -> ManagedProcess:
        """Start `command`; its output goes to `log_file` (appended), or to this process's."""
        logger.info("%s: starting %s", name, " ".join(command))
        log = log_file.open("ab") if log_file is not None else None
        try:
            popen = subprocess.Popen(
                list(command),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT if log is not None else None,
                env=dict(env),
                start_new_session=own_group,
            )
        finally:
            if log is not None:
                log.close()  # the child holds its own descriptor
        return cls(
            name=name,
            pid=popen.pid,
            create_time=process_create_time(popen.pid),
            own_group=own_group,
            log_file=log_file,
            popen=popen,
        )

    @classmethod
    def attach(
        cls,
        name: str,
        pid: int,
        *,
        create_time: float | None,
        own_group: bool = True,
        log_file: Path | None = None,
    ) -> ManagedProcess:
        """The process recorded as `pid` (started at `create_time`), to check on or stop."""
        return cls(
            name=name, pid=pid, create_time=create_time, own_group=own_group, log_file=log_file
        )

    def alive(self) -> bool:
        """True while it runs (and, when attached, is the recorded process, not a reused pid)."""
        if self._popen is not None:
            return self._popen.poll() is None
        try:
            proc = psutil.Process(self.pid)
            if proc.status() == psutil.STATUS_ZOMBIE:
                return False
            created = proc.create_time()
        except psutil.Error:
            return False
        return self.create_time is None or abs(created - self.create_time) < SAME_PROCESS_S

    def exit_code(self) -> int | None:
        """Its exit code once it has exited (a process started here); None while it runs."""
        return self._popen.poll() if self._popen is not None else None

    def wait_ready(
        self, ready: Callable[[], T | None], *, timeout_s: float, advice: str, poll_s: float = 0.05
    ) -> T:
        """Poll `ready()` until it returns a value; fail when the process exits or time is up.

        Raises `DeploymentError` (it exited; its log's tail) or `HotloadTimeoutError`
        (not ready within `timeout_s`; `advice` says what to raise or check).
        """
        deadline = time.monotonic() + timeout_s
        while True:
            if not self.alive():
                code = self.exit_code()
                raise DeploymentError(
                    f"{self.name} exited with code {code} before it was ready. {self.log_hint()}"
                )
            value = ready()
            if value is not None:
                return value
            if time.monotonic() >= deadline:
                raise HotloadTimeoutError(
                    f"{self.name} was not ready within {timeout_s:.0f}s ({advice}). "
                    f"{self.log_hint()}"
                )
            time.sleep(poll_s)

    def log_hint(self) -> str:
        """Where its output is: its log file's tail, or this process's own log."""
        if self.log_file is None:
            return "Its output is in this process's log, above."
        return f"Its log ({self.log_file}) ends with:\n{log_tail(self.log_file)}"

    def stop(self, *, timeout_s: float) -> bool:
        """SIGTERM, SIGKILL after `timeout_s`; True if it was running."""
        return stop_all([self], timeout_s=timeout_s)

    def send_signal(self, sig: signal.Signals) -> None:
        """Signal it (its whole group when it has its own); a process already gone is no error."""
        with contextlib.suppress(ProcessLookupError, PermissionError):
            if self.own_group:
                os.killpg(self.pid, sig)  # a session leader: its group id is its pid
            elif self._popen is not None:
                self._popen.send_signal(sig)
            else:
                os.kill(self.pid, sig)

    def wait_exit(self, timeout_s: float) -> bool:
        """Wait up to `timeout_s` for it to exit; True once it has (reaped, if started here)."""
        if self._popen is not None:
            try:
                self._popen.wait(timeout_s)
            except subprocess.TimeoutExpired:
                return False
            return True
        try:
            psutil.Process(self.pid).wait(timeout=timeout_s)
        except psutil.TimeoutExpired:
            return False
        except psutil.Error:
            return True
        return True


def stop_all(processes: Iterable[ManagedProcess], *, timeout_s: float) -> bool:
    """Stop every running process: SIGTERM to all, then SIGKILL to what is left after `timeout_s`.

    Processes of their own group are signalled as a group, and the group gets a last
    SIGKILL for members that outlived their leader. True if any was running.
    """
    running = [p for p in processes if p.alive()]
    for process in running:
        logger.info("%s: stopping (pid %d)", process.name, process.pid)
        process.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + timeout_s
    for process in running:
        if not process.wait_exit(max(0.1, deadline - time.monotonic())):
            logger.warning(
                "%s (pid %d) ignored SIGTERM for %.1fs; killing it",
                process.name,
                process.pid,
                timeout_s,
            )
            process.send_signal(signal.SIGKILL)
            if not process.wait_exit(KILL_WAIT_S):
                logger.error("%s (pid %d) survived SIGKILL", process.name, process.pid)
    for process in running:
        if process.own_group:
            process.send_signal(signal.SIGKILL)
    return bool(running)


def process_create_time(pid: int) -> float | None:
    """When `pid` started (to tell it from a later process given the same pid)."""
    try:
        return float(psutil.Process(pid).create_time())
    except psutil.Error:
        return None


def log_tail(log_file: str | Path, num_chars: int = LOG_TAIL_CHARS) -> str:
    """The last `num_chars` characters of a log, or "(no log)"."""
    try:
        text = Path(log_file).read_text(errors="replace")
    except OSError:
        return "(no log)"
    return text[-num_chars:]


def write_ready_file(path: Path, url: str) -> None:
    """Atomically write `{"url", "pid"}` (temp file + rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps({"url": url, "pid": os.getpid()}) + "\n")
    tmp.replace(path)


def ready_file_url(path: Path) -> str | None:
    """The URL a ready file announces (no trailing slash), or None while there is none."""
    try:
        return str(json.loads(Path(path).read_text())["url"]).rstrip("/")
    except (OSError, ValueError, KeyError, TypeError):
        return None


def watch_parent(parent_pid: int) -> None:
    """SIGTERM this process (a graceful shutdown) once `parent_pid` is no longer its parent."""

    def watch() -> None:
        while os.getppid() == parent_pid:
            time.sleep(PARENT_POLL_S)
        logger.warning("parent process %d is gone; shutting down", parent_pid)
        os.kill(os.getpid(), signal.SIGTERM)

    threading.Thread(target=watch, name="parent-watch", daemon=True).start()
