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


def test_adapters_are_recorded_beside_the_chain_newest_last_bounded() -> None:
    record = HeadRecord.starting_at("b0").accepted(*delta("d1", "b0"))
    record = record.adapter_loaded(*base("lora-a"), max_adapters=2)
    record = record.adapter_loaded(*base("lora-b"), max_adapters=2)
    assert record.adapter_identities == ["lora-a", "lora-b"]
    assert record.head == "d1"  # an adapter does not move the head
    assert record.adapter_loaded(*base("lora-b"), max_adapters=2) is record  # a retry
    # Loaded again, an adapter is the newest; past the limit the least recently loaded goes,
    # as a replica unloads its least recently used one.
    record = record.adapter_loaded(*base("lora-a"), max_adapters=2)
    assert record.adapter_identities == ["lora-b", "lora-a"]
    record = record.adapter_loaded(*base("lora-c"), max_adapters=2)
    assert record.adapter_identities == ["lora-a", "lora-c"]
    # The chain moves on under them; a new base (the same model) keeps them too.
    assert record.accepted(*delta("d2", "d1")).adapter_identities == ["lora-a", "lora-c"]
    assert record.accepted(*base("b1")).adapter_identities == ["lora-a", "lora-c"]


def test_next_load_is_the_chain_then_each_missing_adapter() -> None:
    record = HeadRecord.starting_at("b0").accepted(*delta("d1", "b0"))
    record = record.adapter_loaded(*base("lora-a"), max_adapters=8)
    record = record.adapter_loaded(*base("lora-b"), max_adapters=8)
    assert record.next_load("b0", []) == record.links[1]  # the chain first
    assert record.next_load("d1", []) == record.adapters[0]
    assert record.next_load("d1", ["lora-a"]) == record.adapters[1]
    assert record.next_load("d1", ["lora-b", "lora-a", "other"]) is None
    assert record.missing_adapters(["lora-b"]) == ["lora-a"]
    assert record.adapters[0].request == {"identity": "lora-a"}
    # An adapter no admitted replica serves any more is forgotten; the chain stays.
    kept = record.adapters_kept({"lora-b", "not-recorded"})
    assert kept.adapter_identities == ["lora-b"] and kept.links == record.links
    assert record.adapters_kept({"lora-a", "lora-b"}) is record


def test_adapters_survive_a_restart_and_a_version_1_record_still_loads(tmp_path: Path) -> None:
    path = tmp_path / "head.json"
    record = HeadRecord.starting_at("b0").adapter_loaded(*base("lora-a"), max_adapters=8)
    HeadRecordFile(path).save(record)
    assert HeadRecordFile(path).load(start_identity="b0") == record
    # Written before adapters were recorded: the chain, no adapters.
    path.write_text('{"version": 1, "links": [{"identity": "b0", "request": {"identity": "b0"}}]}')
    loaded = HeadRecordFile(path).load(start_identity="unused")
    assert loaded.head == "b0" and loaded.adapters == ()
    path.write_text('{"version": 3, "links": [{"identity": "b0", "request": {}}]}')
    with pytest.raises(DeploymentError, match="version 3"):
        HeadRecordFile(path).load(start_identity="b0")
