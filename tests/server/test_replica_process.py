"""A replica's launch (its typed config as JSON) and the pool that starts replica processes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from weightsync.errors import DeploymentError, InvalidInputError
from weightsync.server.config import ReplicaConfig
from weightsync.server.fetch_policy import FetchPolicy
from weightsync.server.inference_admission import InferenceLimits
from weightsync.server.replica_process import LAUNCH_FILE, ReplicaLaunch, ReplicaPool, main

pytestmark = pytest.mark.timeout(120)


def _config(tmp_path: Path, **overrides: object) -> ReplicaConfig:
    fields: dict[str, object] = {
        "storage": str(tmp_path / "store"),
        "snapshot": "base-0badcafe",
        "state_dir": tmp_path / "state",
        "replica_id": "replica-3",
        "model_name": "accounts/me/models/tiny",
        "deployment_id": "dep",
        "transition": "sync",
        "engine_options": {"num_threads": 1},
        "api_key": "sekret",
        "max_body_bytes": 4096,
        "fetch": FetchPolicy(attempts=5, backoff_s=0.25, timeout_s=30.0),
        "inference": InferenceLimits(workers=2, max_queued=3, max_request_tokens=99),
        "max_adapters": 2,
    }
    fields.update(overrides)
    return ReplicaConfig(**fields)  # type: ignore[arg-type]


def test_a_launch_round_trips_through_json_without_its_api_key(tmp_path: Path) -> None:
    launch = ReplicaLaunch(
        replica=_config(tmp_path),
        port=8123,
        ready_file=tmp_path / "ready.json",
        log_level="warning",
        log_format="json",
        parent_pid=4242,
    )
    text = launch.to_json()
    assert "sekret" not in text
    assert json.loads(text)["replica"]["fetch"] == {
        "attempts": 5,
        "backoff_s": 0.25,
        "timeout_s": 30.0,
    }
    assert ReplicaLaunch.from_json(text, api_key="sekret", where="x") == launch
    keyless = ReplicaLaunch.from_json(text, api_key=None, where="x")
    assert keyless.replica.api_key is None and keyless.replica.state_dir == tmp_path / "state"


@pytest.mark.parametrize(
    ("path", "value", "message"),
    [
        (("replica", "fetch", "attempts"), 0, "fetch attempts must be >= 1"),
        (("replica", "snapshot"), None, "give exactly one start source"),
        (("replica", "transition"), "eventually", "transition"),
        (("port",), 70000, "port must be in"),
    ],
)
def test_a_damaged_launch_is_refused_by_name(
    tmp_path: Path, path: tuple[str, ...], value: object, message: str
) -> None:
    doc = json.loads(ReplicaLaunch(replica=_config(tmp_path)).to_json())
    target = doc
    for key in path[:-1]:
        target = target[key]
    target[path[-1]] = value
    where = str(tmp_path / LAUNCH_FILE)
    with pytest.raises(InvalidInputError, match=message) as raised:
        ReplicaLaunch.from_json(json.dumps(doc), api_key=None, where=where)
    assert where in str(raised.value)


def test_the_replica_entry_point_refuses_a_bad_launch_file(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    bad = tmp_path / LAUNCH_FILE
    bad.write_text('{"replica": {"snapshot": "x"}, "port": "many"}')
    assert main([str(bad)], {}) == 1
    assert f"replica launch {bad} is not a valid launch" in capsys.readouterr().err
    assert main([str(tmp_path / "missing.json")], {}) == 1
    assert "cannot read replica launch" in capsys.readouterr().err
    assert main([], {}) == 2
    assert "usage: python -m weightsync.server LAUNCH_FILE" in capsys.readouterr().err


def test_the_pool_gives_each_replica_its_id_state_dir_and_parent(tmp_path: Path) -> None:
    pool = ReplicaPool(num_replicas=2, template=_config(tmp_path), state_dir=tmp_path / "gw")
    launches = [pool.launch(i) for i in range(2)]
    assert [x.replica.replica_id for x in launches] == ["replica-0", "replica-1"]
    assert [x.replica.state_dir for x in launches] == [
        tmp_path / "gw" / f"replica-{i}" for i in (0, 1)
    ]
    assert all(x.host == "127.0.0.1" and x.port == 0 and x.parent_pid for x in launches)
    assert launches[1].ready_file == tmp_path / "gw" / "replica-1" / "ready.json"
    # Everything else is the template's.
    assert launches[1].replica.fetch == pool.template.fetch
    assert launches[1].replica.engine_options == {"num_threads": 1}


def test_a_replica_that_cannot_start_fails_the_pool_and_stops_the_rest(tmp_path: Path) -> None:
    # The start snapshot is not in storage: each replica process exits with code 1.
    (tmp_path / "store").mkdir()
    pool = ReplicaPool(
        num_replicas=2,
        template=_config(tmp_path),
        state_dir=tmp_path / "gw",
        log_level="warning",
    )
    with pytest.raises(DeploymentError, match=r"replica-0 exited with code 1 before it was ready"):
        pool.start(timeout_s=90)
    assert len(pool.replicas) == 2 and pool.alive() == 0
    launch = json.loads((tmp_path / "gw" / "replica-1" / LAUNCH_FILE).read_text())
    assert launch["replica"]["replica_id"] == "replica-1" and launch["replica"]["api_key"] is None
