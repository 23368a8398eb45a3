"""Identities are validated wherever they enter: nothing can leave the storage root."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from weightsync.errors import InvalidIdentityError
from weightsync.snapshot import SnapshotStore, write_base

pytestmark = pytest.mark.timeout(30)

BAD = ["..", ".", "", "a/b", "../escape", "a\\b", "x" * 201, "bad\x00name", "tab\tname", " pad"]
WEIGHTS = {"w": torch.ones(2, dtype=torch.float32)}


@pytest.mark.parametrize("identity", BAD)
def test_bad_identity_is_refused_everywhere(tmp_path: Path, identity: str) -> None:
    store = SnapshotStore(tmp_path / "root")
    with pytest.raises(InvalidIdentityError):
        write_base(store.storage, identity, WEIGHTS, config={})
    for call in (
        store.read_manifest,
        store.fetch,
        store.exists,
        store.chain,
        store.verify,
        store.materialize,
        store.snapshot_url,
    ):
        with pytest.raises(InvalidIdentityError):
            call(identity)
    assert not (tmp_path / "escape").exists()
    assert list(tmp_path.iterdir()) == [] or store.list_snapshots() == []


def test_non_string_identity(tmp_path: Path) -> None:
    with pytest.raises(InvalidIdentityError, match="must be a string"):
        SnapshotStore(tmp_path).read_manifest(42)  # type: ignore[arg-type]


def test_listing_skips_names_that_are_not_identities(tmp_path: Path) -> None:
    write_base(tmp_path, "ok-1", WEIGHTS, config={})
    (tmp_path / " spaced ").mkdir()
    (tmp_path / " spaced " / "weightsync.json").write_text("{}")
    assert SnapshotStore(tmp_path).list_snapshots() == ["ok-1"]
