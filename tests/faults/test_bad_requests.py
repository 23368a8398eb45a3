"""Hostile and broken requests: bad identities, oversized or malformed bodies, wrong types,
missing or wrong API keys, unknown codec or checksum names. Each gets the documented 4xx,
nothing is loaded or recorded, and the replica keeps serving its verified weights."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from _support.fault_rig import START_IDENTITY, Rig, rig

pytestmark = pytest.mark.timeout(120)

KEY = "s3cret-key"
MAX_BODY = 4096
HOT_LOAD = "/hot_load/v1/models/hot_load"


def _meta(**fields):
    return {"identity": "step-1-0badcafe", "incremental_snapshot_metadata": fields}


# (case, path, body or raw bytes, headers override, expected status)
ON_START = dict(previous_snapshot_identity=START_IDENTITY)
CASES = [
    ("path traversal", HOT_LOAD, {"identity": "../etc"}, None, 400),
    ("path traversal in the parent", HOT_LOAD, _meta(previous_snapshot_identity="../x"), None, 400),
    ("separator /", HOT_LOAD, {"identity": "a/b"}, None, 400),
    ("separator \\", HOT_LOAD, {"identity": "a\\b"}, None, 400),
    ("dot segment", HOT_LOAD, {"identity": ".."}, None, 400),
    ("empty identity", HOT_LOAD, {"identity": ""}, None, 400),
    ("identity too long", HOT_LOAD, {"identity": "x" * 201}, None, 400),
    ("NUL in identity", HOT_LOAD, {"identity": "step\x00-1"}, None, 400),
    ("newline in identity", HOT_LOAD, {"identity": "step\n-1"}, None, 400),
    ("bidi override in identity", HOT_LOAD, {"identity": "step\u202e-1"}, None, 400),
    ("hinted file escapes", f"{HOT_LOAD}/hint", {"identity": "a-1", "files": ["../x"]}, None, 400),
    ("oversized body", HOT_LOAD, b'{"identity": "' + b"x" * MAX_BODY + b'"}', None, 413),
    ("malformed JSON", HOT_LOAD, b'{"identity": ', None, 400),
    ("body not an object", HOT_LOAD, b"[1, 2]", None, 400),
    ("identity of the wrong type", HOT_LOAD, {"identity": 42}, None, 400),
    ("identity missing", HOT_LOAD, {}, None, 400),
    ("metadata of the wrong type", HOT_LOAD, {"identity": "a-1", "incremental_snapshot_metadata": 1}, None, 400),  # noqa: E501
    ("bad reset_prompt_cache", HOT_LOAD, {"identity": "a-1", "reset_prompt_cache": 7}, None, 400),
    ("unknown codec", HOT_LOAD, _meta(**ON_START, compression_format="lz77"), None, 400),
    ("unknown checksum", HOT_LOAD, _meta(**ON_START, checksum_format="md5"), None, 400),
    ("unknown checksum on /weights", "/hot_load/v1/weights?checksum_format=md5", None, None, 400),
    ("no API key", HOT_LOAD, {"identity": "a-1"}, {}, 401),
    ("wrong API key", HOT_LOAD, {"identity": "a-1"}, {"Authorization": "Bearer nope"}, 401),
    ("wrong auth scheme", HOT_LOAD, {"identity": "a-1"}, {"Authorization": f"Basic {KEY}"}, 401),
    ("no API key on the ledger reset", "/hot_load/v1/ledger/reset", None, {}, 401),
    ("no API key on completions", "/v1/completions", {"prompt": [1], "max_tokens": 1}, {}, 401),
    ("unknown snapshot", HOT_LOAD, {"identity": "never-saved-0badcafe"}, None, 404),
]  # fmt: skip


@pytest.fixture(scope="module")
def guarded(tmp_path_factory: pytest.TempPathFactory, tokenizer_dir: Path) -> Iterator[Rig]:
    """One guarded replica for every case: none of them may change it."""
    with rig(tmp_path_factory.mktemp("guarded"), tokenizer_dir) as r:
        r.start_replica(api_key=KEY, max_body_bytes=MAX_BODY)
        yield r


def _send(rig: Rig, path: str, body, headers):
    import httpx

    auth = {"Authorization": f"Bearer {KEY}"} if headers is None else headers
    with httpx.Client(base_url=rig.url, timeout=30) as client:
        if body is None and "weights" in path:
            return client.get(path, headers=auth)
        if isinstance(body, bytes):
            auth = {**auth, "Content-Type": "application/json"}
            return client.post(path, content=body, headers=auth)
        return client.post(path, json=body, headers=auth)


@pytest.mark.parametrize(
    ("case", "path", "body", "headers", "code"), CASES, ids=[c[0] for c in CASES]
)
def test_bad_request_is_refused_and_changes_nothing(guarded, case, path, body, headers, code):
    before = guarded.ledger()
    r = _send(guarded, path, body, headers)
    assert r.status_code == code, r.text
    error = r.json()["error"]
    assert error["code"] == code and error["message"]  # the OpenAI error shape, with a reason
    obs = guarded.observe(case, f"HTTP {code}; nothing loaded", r, allowed={START_IDENTITY})
    assert guarded.ledger() == before and obs.stage == "ready"
