"""The process rule (`server.processes`) on real child processes: readiness, exit, stop, kill."""

from __future__ import annotations

import functools
import logging
import os
import signal
import sys
import textwrap
import time
from pathlib import Path

import psutil
import pytest

from weightsync.errors import DeploymentError, HotloadTimeoutError
from weightsync.server.processes import (
    ManagedProcess,
    ready_file_url,
    stop_all,
    write_ready_file,
)

pytestmark = pytest.mark.timeout(60)


def _python(tmp_path: Path, name: str, code: str) -> list[str]:
    script = tmp_path / f"{name}.py"
    script.write_text(textwrap.dedent(code))
    return [sys.executable, str(script)]


def _wait_for(path: Path, timeout_s: float = 30.0) -> str:
    deadline = time.monotonic() + timeout_s
    while not path.exists() or not path.read_text():
        assert time.monotonic() < deadline, f"{path} never written"
        time.sleep(0.02)
    return path.read_text()


def _gone(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def test_ready_file_round_trip_and_absent_or_damaged_files(tmp_path: Path) -> None:
    ready = tmp_path / "sub" / "ready.json"
    assert ready_file_url(ready) is None
    write_ready_file(ready, "http://127.0.0.1:1234/")
    assert ready_file_url(ready) == "http://127.0.0.1:1234"
    ready.write_text('{"pid": 1}')
    assert ready_file_url(ready) is None
    ready.write_text("{not json")
    assert ready_file_url(ready) is None


def test_wait_ready_returns_what_the_child_announces_then_stop_terminates(tmp_path: Path) -> None:
    ready = tmp_path / "ready.json"
    command = _python(
        tmp_path,
        "announcer",
        f"""
        import time
        from weightsync.server.processes import write_ready_file
        time.sleep(0.2)
        write_ready_file({str(ready)!r}, "http://127.0.0.1:9/")
        time.sleep(120)
        """,
    )
    child = ManagedProcess.start("announcer", command, env=os.environ)
    try:
        url = child.wait_ready(
            functools.partial(ready_file_url, ready), timeout_s=30, advice="unused"
        )
        assert url == "http://127.0.0.1:9"
        assert child.alive() and child.exit_code() is None
    finally:
        assert child.stop(timeout_s=10) is True
    assert not child.alive()
    assert child.exit_code() == -signal.SIGTERM
    assert child.stop(timeout_s=10) is False  # nothing left to stop


def test_a_child_that_exits_before_ready_is_named_with_its_log(tmp_path: Path) -> None:
    log = tmp_path / "child.log"
    command = _python(
        tmp_path, "crasher", "import sys\nprint('boom: no such model', flush=True)\nsys.exit(3)\n"
    )
    child = ManagedProcess.start("replica-7", command, env=os.environ, log_file=log)
    with pytest.raises(DeploymentError, match=r"replica-7 exited with code 3 before it was ready"):
        try:
            child.wait_ready(lambda: None, timeout_s=30, advice="unused")
        except DeploymentError as e:
            assert str(log) in str(e) and "boom: no such model" in str(e)
            raise


def test_a_child_never_ready_times_out_with_the_advice(tmp_path: Path) -> None:
    command = _python(tmp_path, "sleeper", "import time\ntime.sleep(120)\n")
    child = ManagedProcess.start("sleeper", command, env=os.environ)
    try:
        with pytest.raises(HotloadTimeoutError, match=r"sleeper was not ready within 0s"):
            try:
                child.wait_ready(lambda: None, timeout_s=0.3, advice="raise the limit")
            except HotloadTimeoutError as e:
                assert "raise the limit" in str(e) and "this process's log" in str(e)
                raise
        assert child.alive()  # a timeout does not stop it: the caller decides
    finally:
        child.stop(timeout_s=10)


def test_sigterm_ignored_means_sigkill_after_the_timeout(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    marker = tmp_path / "stubborn.ready"
    stubborn = _python(
        tmp_path,
        "stubborn",
        f"""
        import pathlib, signal, time
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        pathlib.Path({str(marker)!r}).write_text("ignoring")
        time.sleep(120)
        """,
    )
    polite = _python(tmp_path, "polite", "import time\ntime.sleep(120)\n")
    children = [
        ManagedProcess.start("stubborn", stubborn, env=os.environ),
        ManagedProcess.start("polite", polite, env=os.environ),
    ]
    _wait_for(marker)
    with caplog.at_level(logging.WARNING, logger="weightsync.server.processes"):
        # 2 s: the polite one, signalled at the same moment, has long exited when the
        # stubborn one's wait ends, even on a loaded machine.
        assert stop_all(children, timeout_s=2.0) is True
    assert [c.exit_code() for c in children] == [-signal.SIGKILL, -signal.SIGTERM]
    # Warnings only: the root logger's level may let the INFO "starting" lines in too.
    warned = " ".join(r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING)
    assert "stubborn" in warned and "ignored SIGTERM" in warned
    assert "polite" not in warned


def test_a_child_in_its_own_group_takes_its_children_along(tmp_path: Path) -> None:
    pid_file = tmp_path / "grandchild.pid"
    command = _python(
        tmp_path,
        "parent",
        f"""
        import pathlib, subprocess, sys, time
        grandchild = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
        pathlib.Path({str(pid_file)!r}).write_text(str(grandchild.pid))
        time.sleep(120)
        """,
    )
    child = ManagedProcess.start("group", command, env=os.environ, own_group=True)
    grandchild = int(_wait_for(pid_file))
    assert psutil.Process(grandchild).ppid() == child.pid
    assert child.stop(timeout_s=10) is True
    deadline = time.monotonic() + 10
    while not _gone(grandchild):
        assert time.monotonic() < deadline, "the grandchild outlived its group's stop"
        time.sleep(0.05)


def test_attach_knows_the_recorded_process_from_a_reused_pid(tmp_path: Path) -> None:
    command = _python(tmp_path, "recorded", "import time\ntime.sleep(120)\n")
    child = ManagedProcess.start("recorded", command, env=os.environ, own_group=True)
    try:
        same = ManagedProcess.attach("recorded", child.pid, create_time=child.create_time)
        assert child.create_time is not None and same.alive()
        other = ManagedProcess.attach("recorded", child.pid, create_time=child.create_time - 60)
        assert not other.alive() and other.stop(timeout_s=1) is False
        assert child.alive()  # a process that is not the recorded one is never signalled
        assert same.stop(timeout_s=10) is True
        assert not same.alive()
    finally:
        child.stop(timeout_s=10)
    assert not child.alive()  # (the attached handle reaped it, so its exit code is lost here)


def test_watch_parent_stops_an_orphaned_child(tmp_path: Path) -> None:
    pid_file = tmp_path / "orphan.pid"
    orphan_code = (
        "import os, time\n"
        "from weightsync.server.processes import watch_parent\n"
        "watch_parent(os.getppid())\n"
        f"open({str(pid_file)!r}, 'w').write(str(os.getpid()))\n"
        "time.sleep(120)\n"
    )
    command = _python(
        tmp_path,
        "short_lived_parent",
        f"""
        import pathlib, subprocess, sys, time
        subprocess.Popen([sys.executable, "-c", {orphan_code!r}])
        while not pathlib.Path({str(pid_file)!r}).exists():
            time.sleep(0.02)
        """,
    )
    parent = ManagedProcess.start("short-lived parent", command, env=os.environ)
    orphan = int(_wait_for(pid_file))
    assert parent.wait_exit(30) and parent.exit_code() == 0
    deadline = time.monotonic() + 15
    while not _gone(orphan):
        assert time.monotonic() < deadline, "the orphan did not notice its parent was gone"
        time.sleep(0.05)
