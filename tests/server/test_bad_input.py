"""Bad input gets a 4xx that says why; auth guards every route but /health."""

from __future__ import annotations

import pytest

from _support.chain import Chain
from _support.models import snapshot_tensors, toy_model
from _support.serving import hot_load
from weightsync.snapshot import write_base

BASE, D1 = "base-0badcafe", "step1-0badcafe"
pytestmark = pytest.mark.timeout(60)


def _message(r) -> str:
    return str(r.json()["error"]["message"])


def test_hot_load_validation(serve, chain: Chain) -> None:
    client, _ = serve()
    url = "/hot_load/v1/models/hot_load"
    cases = [
        ({"identity": "../escape"}, 400, "path"),
        ({"identity": "a/b"}, 400, "separator"),
        ({"identity": 5}, 400, "identity"),
        ({"identity": "nope-0badcafe"}, 404, "nope-0badcafe"),
        ({"identity": D1, "reset_prompt_cache": "sometimes"}, 400, "reset_prompt_cache"),
        (
            {
                "identity": D1,
                "incremental_snapshot_metadata": {
                    "previous_snapshot_identity": BASE,
                    "compression_format": "arc_v2",
                },
            },
            400,
            "arc_v2",
        ),
        (
            {
                "identity": D1,
                "incremental_snapshot_metadata": {
                    "previous_snapshot_identity": BASE,
                    "checksum_format": "md5",
                },
            },
            400,
            "md5",
        ),
        (
            {
                "identity": BASE,
                "incremental_snapshot_metadata": {"previous_snapshot_identity": BASE},
            },
            200,
            "",
        ),  # already served: a no-op
        ({}, 400, "identity"),
    ]
    for body, status, needle in cases:
        r = client.post(url, json=body)
        assert r.status_code == status, (body, r.text)
        if needle:
            assert needle in _message(r), (body, r.text)
    r = client.post(url, content=b"{not json", headers={"content-type": "application/json"})
    assert r.status_code == 400 and "invalid request" in _message(r)
    status = client.get(url).json()["replicas"][0]
    assert (
        status["current_snapshot_identity"] == BASE and status["loading_state"]["stage"] == "ready"
    )


def test_snapshot_of_another_model_is_refused(serve, chain: Chain) -> None:
    wide = dict(chain.config, intermediate_size=96)
    model = toy_model(intermediate_size=96)
    write_base(chain.root, "wide-0badcafe", snapshot_tensors(model), config=wide)
    client, _ = serve()
    r = hot_load(client, "wide-0badcafe")
    assert r.status_code == 409
    assert "intermediate_size" in _message(r) and "wide-0badcafe" in _message(r)
    assert (
        client.get("/hot_load/v1/models/hot_load").json()["replicas"][0][
            "current_snapshot_identity"
        ]
        == BASE
    )


def test_request_body_limit(serve) -> None:
    client, _ = serve(max_body_bytes=4096)
    r = client.post("/v1/completions", json={"prompt": "x" * 10_000, "max_tokens": 1})
    assert r.status_code == 413 and "4096" in _message(r)


def test_completion_validation(serve) -> None:
    client, _ = serve()
    cases = [
        ({"prompt": [1, 2], "max_tokens": 0}, "max_tokens"),
        ({"prompt": [1, 2], "temperature": "hot"}, "temperature"),
        ({"prompt": [1, 100000]}, "vocabulary"),
        ({"prompt": []}, "prompt"),
        ({"prompt": [1, 2], "stop": ["a"] * 17}, "stop strings"),
        ({"prompt": [1, 2], "logprobs": 21}, "logprobs"),
        ({"prompt": [1, 2], "top_k": -2}, "top_k"),
        ({"prompt": [1, 2], "n": 99}, "n"),
    ]
    for body, needle in cases:
        r = client.post("/v1/completions", json=body)
        assert r.status_code == 400, (body, r.text)
        assert needle in _message(r), (body, r.text)


def test_api_key_guards_every_route_but_health(serve) -> None:
    client, _ = serve(api_key="s3cret")
    assert client.get("/health").status_code == 200
    for method, path in [
        ("GET", "/hot_load/v1/models/hot_load"),
        ("GET", "/metrics"),
        ("GET", "/hot_load/v1/ledger"),
        ("POST", "/hot_load/v1/ledger/reset"),
        ("POST", "/v1/completions"),
        ("GET", "/v1/models"),
    ]:
        for headers in ({}, {"authorization": "Bearer wrong"}, {"authorization": "s3cret"}):
            r = client.request(method, path, headers=headers, json={})
            assert r.status_code == 401, (method, path, headers)
            assert "API key" in _message(r)
    ok = client.get("/hot_load/v1/models/hot_load", headers={"authorization": "Bearer s3cret"})
    assert ok.status_code == 200
    assert client.get("/hot_load/v1/ledger").json()["error"]["code"] == 401
    # The reset above was refused: the ledger still holds the base.
    entries = client.get("/hot_load/v1/ledger", headers={"authorization": "Bearer s3cret"})
    assert entries.json()["replicas"][0]["entries"][0]["identity"] == BASE
