"""Progress: a bar for long writes on a terminal only; every written byte is counted."""

from __future__ import annotations

import io
import sys
from pathlib import Path
from typing import Any

import pytest

from weightsync.storage import LocalStorage
from weightsync.trainer import TrainingClient
from weightsync.trainer.progress import MIN_PROGRESS_BYTES, CountingStorage, write_progress

pytestmark = pytest.mark.timeout(60)


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_counting_storage_sees_every_byte_of_a_snapshot(tmp_path: Path, model: Any) -> None:
    counted: list[int] = []
    client = TrainingClient(model, storage=CountingStorage(LocalStorage(tmp_path), counted.append))
    result = client.save_weights_for_sampler_ext("counted")

    on_disk = sum(p.stat().st_size for p in Path(result.path).iterdir())
    assert sum(counted) == on_disk
    assert len(counted) == len(list(Path(result.path).iterdir()))


def test_a_bar_is_drawn_on_a_terminal_and_nothing_when_piped(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    storage = LocalStorage(tmp_path)
    terminal = _Terminal()
    monkeypatch.setattr(sys, "stderr", terminal)
    with write_progress(storage, "snap-1", expected_bytes=MIN_PROGRESS_BYTES) as out:
        assert isinstance(out, CountingStorage)
        out.write_bytes("snap-1/file.bin", b"x" * 1024)
    assert "snap-1" in terminal.getvalue()
    assert (tmp_path / "snap-1" / "file.bin").stat().st_size == 1024

    piped = io.StringIO()
    monkeypatch.setattr(sys, "stderr", piped)
    with write_progress(storage, "snap-2", expected_bytes=MIN_PROGRESS_BYTES) as out:
        assert out is storage
    with write_progress(storage, "small", expected_bytes=10) as out:
        assert out is storage
    assert piped.getvalue() == ""
