"""The wire contract: every hot-load answer a replica and a gateway send is its model, exactly.

"Exactly": parsing the JSON into the model leaves no undeclared field anywhere,
and dumping the model gives the same JSON back (so the model neither drops nor
invents anything). The replica's own status and ledger records are held to
the same rule before any HTTP serialisation, so a field added on the server
side without a wire model fails here.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi import FastAPI
from pydantic import BaseModel

from _support.chain import Chain
from _support.serving import hot_load, running_gateway, wait_loaded
from weightsync.server.config import ServedDeployment
from weightsync.server.gateway import create_gateway_app
from weightsync.server.runner import ServerThread
from weightsync.wire import (
    ACCOUNTS_PATH,
    HINT_PATH,
    HOT_LOAD_PATH,
    LEDGER_PATH,
    LEDGER_RESET_PATH,
    WEIGHTS_PATH,
    AccountList,
    Deployment,
    ErrorBody,
    HintAnswers,
    HotLoadAnswer,
    HotLoadAnswers,
    HotLoadRequest,
    HotLoadStatus,
    LedgerAnswers,
    LedgerEntry,
    LedgerResetAnswers,
    ReplicaStatus,
    WeightsAnswers,
    deployment_path,
)

pytestmark = pytest.mark.timeout(120)

BASE, D1, D2 = (f"{n}-0badcafe" for n in ("base", "step1", "step2"))


def undeclared(model: BaseModel, where: str = "") -> list[str]:
    """Paths of every field in `model` (recursively) that its class does not declare."""
    found = [f"{where}{name}" for name in (model.model_extra or {})]
    for name in type(model).model_fields:
        value = getattr(model, name)
        items = value if isinstance(value, list) else [value]
        for i, item in enumerate(items):
            if isinstance(item, BaseModel):
                suffix = f"[{i}]" if isinstance(value, list) else ""
                found += undeclared(item, f"{where}{name}{suffix}.")
    return found


def assert_exact(model_cls: type[BaseModel], doc: Any) -> BaseModel:
    """`doc` is an instance of `model_cls` with nothing undeclared, and survives a round trip."""
    parsed = model_cls.model_validate(doc)
    assert undeclared(parsed) == [], f"{model_cls.__name__} lacks fields sent: {undeclared(parsed)}"
    assert parsed.model_dump(mode="json", by_alias=True) == doc
    return parsed


def test_every_hot_load_answer_of_a_replica_is_its_wire_model(serve, chain: Chain) -> None:
    client, replica = serve()
    status = assert_exact(HotLoadStatus, client.get(HOT_LOAD_PATH).json())
    assert isinstance(status, HotLoadStatus)
    assert status.replicas[0].current_snapshot_identity == BASE

    accepted = hot_load(client, D1, BASE, reset_prompt_cache=True)
    assert accepted.status_code == 200, accepted.text
    answer = assert_exact(HotLoadAnswer, accepted.json())
    assert isinstance(answer, HotLoadAnswer) and answer.status in ("accepted", "loading")
    wait_loaded(client, D1)
    again = assert_exact(HotLoadAnswer, hot_load(client, D1, BASE).json())
    assert isinstance(again, HotLoadAnswer) and again.status == "already_serving"

    loaded = assert_exact(HotLoadStatus, client.get(HOT_LOAD_PATH).json())
    assert isinstance(loaded, HotLoadStatus)
    entry = loaded.replicas[0]
    assert entry.readiness and entry.current_snapshot_identity == D1
    assert entry.last_load is not None and entry.last_load.identity == D1
    assert entry.last_load.kind == "delta" and entry.last_load.result == "ok"
    assert "error" not in client.get(HOT_LOAD_PATH).json()["replicas"][0]["loading_state"]

    # The replica's own records, before FastAPI serialises them, hold nothing undeclared.
    assert_exact(ReplicaStatus, replica.status())
    for record in replica.ledger_entries():
        assert_exact(LedgerEntry, record)

    hint = client.post(HINT_PATH, json={"identity": D2})
    assert hint.status_code == 200, hint.text
    assert_exact(HintAnswers, hint.json())
    weights = assert_exact(WeightsAnswers, client.get(WEIGHTS_PATH).json())
    assert isinstance(weights, WeightsAnswers)
    assert weights.replicas[0].current_snapshot_identity == D1
    assert set(weights.replicas[0].checksums) == set(chain.manifests[D1].tensors)
    ledger = assert_exact(LedgerAnswers, client.get(LEDGER_PATH).json())
    assert isinstance(ledger, LedgerAnswers)
    assert [e.identity for e in ledger.replicas[0].entries] == [BASE, D1]
    reset = assert_exact(LedgerResetAnswers, client.post(LEDGER_RESET_PATH).json())
    assert isinstance(reset, LedgerResetAnswers) and reset.replicas[0].requires_base
    after = assert_exact(HotLoadStatus, client.get(HOT_LOAD_PATH).json())
    assert isinstance(after, HotLoadStatus) and after.replicas[0].requires_base


def test_a_failed_load_and_refusals_are_typed_too(serve, chain: Chain) -> None:
    client, _ = serve()
    # A delta whose parent is not served: refused with the error body.
    refused = hot_load(client, D2, D1)
    assert refused.status_code == 409
    body = assert_exact(ErrorBody, refused.json())
    assert isinstance(body, ErrorBody) and D1 in body.error.message and body.error.code == 409
    bad = client.post(HOT_LOAD_PATH, json={"identity": D1, "reset_prompt_cache": 7})
    assert bad.status_code == 400
    assert "reset_prompt_cache" in ErrorBody.model_validate(bad.json()).error.message
    # A load that fails verification leaves `stage: error` with the error named.
    shard = next(p for p in (chain.root / D1).iterdir() if p.suffix == ".safetensors")
    data = bytearray(shard.read_bytes())
    data[-1] ^= 0xFF
    shard.write_bytes(bytes(data))
    assert hot_load(client, D1, BASE).status_code == 200
    failed = wait_loaded(client, D1)
    status = assert_exact(ReplicaStatus, failed)
    assert isinstance(status, ReplicaStatus)
    assert status.loading_state.stage == "error" and status.loading_state.error
    assert status.current_snapshot_identity == BASE


def test_the_sdk_hot_load_body_parses_as_sent() -> None:
    """What `fireworks.training.sdk` DeploymentManager.hotload sends, field for field."""
    sdk_body = {
        "identity": D1,
        "reset_prompt_cache": True,
        "incremental_snapshot_metadata": {
            "previous_snapshot_identity": BASE,
            "compression_format": "arc_v2",
            "checksum_format": "alder32",
        },
    }
    request = HotLoadRequest.model_validate(sdk_body)
    assert request.reset_prompt_cache == "all"
    meta = request.incremental_snapshot_metadata
    assert meta is not None and meta.previous_snapshot_identity == BASE
    assert (meta.compression_format, meta.checksum_format) == ("arc_v2", "alder32")
    assert HotLoadRequest.model_validate({"identity": D1}).reset_prompt_cache == "all"
    for sent, policy in ((False, "none"), ("new_session", "new_session"), (None, "all")):
        parsed = HotLoadRequest.model_validate({"identity": D1, "reset_prompt_cache": sent})
        assert parsed.reset_prompt_cache == policy


@contextmanager
def gateway(
    chain: Chain, tmp_path: Path, *, num_replicas: int, dead_replicas: int = 0
) -> Iterator[httpx.Client]:
    served = ServedDeployment(deployment_id="dep", model_name="toy", storage=str(chain.root))
    with (
        running_gateway(
            chain, tmp_path, num_replicas=num_replicas, dead_replicas=dead_replicas, served=served
        ) as url,
        httpx.Client(base_url=url, timeout=60) as client,
    ):
        yield client


def test_gateway_answers_are_their_wire_models(chain: Chain, tmp_path: Path) -> None:
    with gateway(chain, tmp_path, num_replicas=2) as client:
        status = assert_exact(HotLoadStatus, client.get(HOT_LOAD_PATH).json())
        assert isinstance(status, HotLoadStatus)
        assert [r.replica_id for r in status.replicas] == ["replica-0", "replica-1"]
        assert all(r.url and r.url.startswith("http://127.0.0.1:") for r in status.replicas)
        accepted = hot_load(client, D1, BASE)
        assert accepted.status_code == 200, accepted.text
        answers = assert_exact(HotLoadAnswers, accepted.json())
        assert isinstance(answers, HotLoadAnswers) and len(answers.replicas) == 2
        assert_exact(LedgerAnswers, client.get(LEDGER_PATH).json())
        assert_exact(AccountList, client.get(ACCOUNTS_PATH).json())
        assert_exact(Deployment, client.get(deployment_path("weightsync", "dep")).json())


def test_gateway_status_of_an_unreachable_replica_is_typed(chain: Chain, tmp_path: Path) -> None:
    with gateway(chain, tmp_path, num_replicas=1, dead_replicas=1) as client:
        r = client.get(HOT_LOAD_PATH)
        assert r.status_code == 200
        status = assert_exact(HotLoadStatus, r.json())
        assert isinstance(status, HotLoadStatus)
        live, dead = status.replicas
        assert live.readiness and live.current_snapshot_identity == BASE
        assert not dead.readiness and dead.current_snapshot_identity is None
        assert dead.loading_state.stage == "error"
        assert dead.loading_state.error and "unreachable" in dead.loading_state.error
        refused = hot_load(client, D1, BASE)
        assert refused.status_code == 503
        body = assert_exact(ErrorBody, refused.json())
        assert isinstance(body, ErrorBody) and "replica-1" in body.error.message


def test_gateway_refuses_a_replica_answer_outside_the_contract() -> None:
    """A 'replica' (a real HTTP server) whose ledger answer is not `LedgerAnswers`: 502, named."""
    stray = FastAPI()

    @stray.get(LEDGER_PATH)
    def ledger() -> dict[str, Any]:
        return {"replicas": [{"replica_id": "replica-0", "entries": [{"identity": 7}]}]}

    with ServerThread(stray) as stray_url:
        app = create_gateway_app([stray_url], api_key=None, max_body_bytes=1 << 20)
        with ServerThread(app) as url:
            r = httpx.get(url + LEDGER_PATH, timeout=30)
    assert r.status_code == 502
    body = assert_exact(ErrorBody, r.json())
    assert isinstance(body, ErrorBody)
    assert "replica-0: answered outside the wire contract" in body.error.message


def test_wire_sits_at_the_bottom_of_the_import_graph() -> None:
    """wire imports only the standard library, pydantic and `weightsync.errors`."""
    import ast
    import sys

    import weightsync.wire

    package = Path(weightsync.wire.__file__).parent
    outside = []
    for source in sorted(package.glob("*.py")):
        for node in ast.walk(ast.parse(source.read_text())):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            else:
                continue
            for name in names:
                top = name.split(".")[0]
                allowed = (
                    top in sys.stdlib_module_names
                    or top in ("__future__", "pydantic", "pydantic_core")
                    or name == "weightsync.errors"
                    or name.startswith("weightsync.wire")
                )
                if not allowed:
                    outside.append(f"{source.name}: {name}")
    assert outside == []
    assert {"HotLoadStatus", "Deployment", "HOT_LOAD_PATH", "Stage"} <= set(weightsync.wire.__all__)
    assert all(hasattr(weightsync.wire, name) for name in weightsync.wire.__all__)
