"""`weightsync --help` and every subcommand's help name what the command does."""

from __future__ import annotations

import subprocess
import sys

import pytest

COMMANDS = {
    "serve": [
        "--storage",
        "--snapshot",
        "--model-dir",
        "--replicas",
        "--transition",
        "--engine",
        "--device",
    ],
    "demo": [
        "--steps",
        "--model-size",
        "--lr",
        "--sync-interval",
        "--replicas",
        "--storage",
        "--keep",
    ],
    "bench": ["--size"],
    "snapshot": ["list", "inspect", "verify", "materialize"],
    "deploy": ["status", "ledger", "hotload"],
}


def _help(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "weightsync.cli", *args, "--help"],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        env={"COLUMNS": "200", "PATH": "/usr/bin:/bin"},
    )


def test_top_level_help_lists_every_command() -> None:
    out = _help()
    assert out.returncode == 0, out.stderr
    for command in COMMANDS:
        assert command in out.stdout


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_subcommand_help_lists_its_options(command: str) -> None:
    out = _help(command)
    assert out.returncode == 0, out.stderr
    for word in COMMANDS[command]:
        assert word in out.stdout, f"{command} --help does not mention {word}"


def test_usage_error_exits_2() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "weightsync.cli", "demo", "--steps", "not-a-number"],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert out.returncode == 2
