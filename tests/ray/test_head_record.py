"""The head record: the chain a late or restarted replica replays (no Ray needed)."""

from __future__ import annotations

from pathlib import Path

import pytest

from weightsync.errors import DeploymentError
from weightsync.server.head_record import HeadRecord, HeadRecordFile
from weightsync.wire import HotLoadRequest


def delta(identity: str, parent: str) -> tuple[HotLoadRequest, dict[str, object]]:
    body: dict[str, object] = {
        "identity": identity,
        "incremental_snapshot_metadata": {"previous_snapshot_identity": parent},
    }
    return HotLoadRequest.model_validate(body), body


def base(identity: str) -> tuple[HotLoadRequest, dict[str, object]]:
    body: dict[str, object] = {"identity": identity}
    return HotLoadRequest.model_validate(body), body


def test_deltas_append_a_base_restarts_the_chain_a_retry_changes_nothing() -> None:
    record = HeadRecord.starting_at("b0")
    record = record.accepted(*delta("d1", "b0")).accepted(*delta("d2", "d1"))
    assert [link.identity for link in record.links] == ["b0", "d1", "d2"]
    assert record.head == "d2" and record.previous == "d1"
    assert record.accepted(*delta("d2", "d1")) is record  # the SDK retried the same load
    restarted = record.accepted(*base("b1"))
    assert [link.identity for link in restarted.links] == ["b1"]
    assert restarted.previous is None


def test_next_link_walks_a_replica_to_the_head() -> None:
    record = HeadRecord.starting_at("b0").accepted(*delta("d1", "b0")).accepted(*delta("d2", "d1"))
    assert record.next_link("b0") == record.links[1]
    assert record.next_link("d1") == record.links[2]
    assert record.next_link("d2") is None
    # What it serves is not in the chain (another run's snapshot): start over from the base.
    assert record.next_link("elsewhere") == record.links[0]
    assert record.links[2].request["incremental_snapshot_metadata"] == {
        "previous_snapshot_identity": "d1"
    }


def test_the_file_survives_a_restart_and_refuses_a_damaged_record(tmp_path: Path) -> None:
    path = tmp_path / "state" / "head.json"
    first = HeadRecordFile(path)
    record = first.load(start_identity="b0")
    assert path.is_file() and record.head == "b0"
    first.save(record.accepted(*delta("d1", "b0")))
    # A restarted gateway finds the head, not its start snapshot.
    assert HeadRecordFile(path).load(start_identity="b0").head == "d1"
    assert not list(path.parent.glob(".*.tmp"))
    path.write_text('{"version": 1, "links": []}')
    with pytest.raises(DeploymentError, match=r"head record .*head\.json is unreadable"):
        HeadRecordFile(path).load(start_identity="b0")
    path.write_text("{not json")
    with pytest.raises(DeploymentError, match="delete it"):
        HeadRecordFile(path).load(start_identity="b0")
