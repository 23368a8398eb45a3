"""Serving while loading: async/sync transitions, 425, one load at a time, prompt cache, hints."""

from __future__ import annotations

import threading
import time
from typing import Any

import pytest

from _support.chain import Chain
from _support.serving import PROMPT_IDS, greedy, hot_load, reference_greedy, wait_loaded
from weightsync.storage import StorageWrapper, open_storage

BASE, D1, D2, D3 = (f"{n}-0badcafe" for n in ("base", "step1", "step2", "step3"))
LONG = 500  # tokens: long enough that a hot-load lands while the generation runs
pytestmark = pytest.mark.timeout(120)


class GatedStorage(StorageWrapper):
    """Storage whose payload reads of one snapshot block until `gate` is set (a fault seam)."""

    def __init__(self, inner: Any, identity: str) -> None:
        super().__init__(inner)
        self.identity = identity
        self.gate = threading.Event()
        self.waiting = threading.Event()

    def read_bytes(self, path: str) -> bytes:
        if path.startswith(f"{self.identity}/") and path.endswith(".safetensors"):
            self.waiting.set()
            assert self.gate.wait(60)
        return bytes(self.inner.read_bytes(path))


def _stage(client) -> str:
    return str(
        client.get("/hot_load/v1/models/hot_load").json()["replicas"][0]["loading_state"]["stage"]
    )


def _long_generation(client, out: dict[str, Any]) -> threading.Thread:
    def run() -> None:
        r = client.post(
            "/v1/completions",
            json={
                "prompt": PROMPT_IDS,
                "max_tokens": LONG,
                "temperature": 0,
                "return_token_ids": True,
                "stop_token_ids": [],
            },
        )
        out["response"] = r

    t = threading.Thread(target=run)
    t.start()
    return t


def test_one_load_at_a_time(serve, chain: Chain) -> None:
    gated = GatedStorage(open_storage(chain.root), D1)
    client, _ = serve(storage=gated)
    assert hot_load(client, D1, BASE).json()["status"] == "accepted"
    assert gated.waiting.wait(30)
    status = client.get("/hot_load/v1/models/hot_load").json()["replicas"][0]
    assert status["loading_state"] == {
        "stage": "fetching",
        "target_snapshot_identity": D1,
        "progress": {"total_bytes": sum(f.size_bytes for f in chain.manifests[D1].files.values())},
    }
    # Still serving the base, and ready on it, while the load fetches.
    assert status["current_snapshot_identity"] == BASE and status["readiness"] is True
    assert greedy(client, PROMPT_IDS)["snapshot_identity"] == BASE
    assert hot_load(client, D1, BASE).json()["status"] == "loading"
    other = hot_load(client, "base2-0badcafe")
    assert other.status_code == 409 and D1 in other.json()["error"]["message"]
    gated.gate.set()
    assert wait_loaded(client, D1)["loading_state"]["stage"] == "ready"


def test_async_transition_swaps_at_a_token_boundary(serve, chain: Chain) -> None:
    client, _ = serve(transition="async")
    # The same request on the base alone: what every token before the swap must be.
    # (The engine itself is the reference over hundreds of tokens; a full-recompute
    # transformers loop can flip a bf16 near-tie that far out, so it checks a prefix.)
    unswapped: dict[str, Any] = {}
    _long_generation(client, unswapped).join(60)
    base_tokens = unswapped["response"].json()["choices"][0]["token_ids"]
    reference, _ = reference_greedy(chain.config, chain.weights[BASE], PROMPT_IDS, 16)
    assert base_tokens[:16] == reference
    out: dict[str, Any] = {}
    thread = _long_generation(client, out)
    time.sleep(0.3)
    assert hot_load(client, D1, BASE).status_code == 200
    wait_loaded(client, D1)
    thread.join(60)
    body = out["response"].json()
    choice = body["choices"][0]
    assert body["snapshot_identities"] == [BASE, D1], "the swap must land mid-generation"
    assert body["snapshot_identity"] == D1 and body["model"] == f"weightsync@{D1}"
    change = choice["snapshot_changes"]
    assert change[0] == {"token_index": 0, "snapshot_identity": BASE}
    assert change[1]["snapshot_identity"] == D1
    switch = change[1]["token_index"]
    assert 0 < switch < len(choice["token_ids"])
    assert choice["token_ids"][:switch] == base_tokens[:switch]


def test_sync_transition_finishes_on_old_weights_and_425(serve, chain: Chain) -> None:
    client, replica = serve(transition="sync")
    out: dict[str, Any] = {}
    thread = _long_generation(client, out)
    time.sleep(0.3)
    # One more in-flight request, held open by the test through the replica's own
    # request context, so the swap stays pending however fast the machine runs.
    held = replica.generation()
    held.__enter__()
    assert hot_load(client, D1, BASE).status_code == 200
    deadline = time.monotonic() + 30
    while _stage(client) != "swapping":  # the swap waits for the generation to finish
        assert time.monotonic() < deadline
        time.sleep(0.01)
    assert client.get("/hot_load/v1/models/hot_load").json()["replicas"][0]["readiness"] is False
    refused = client.post(
        "/v1/completions",
        json={"prompt": PROMPT_IDS, "max_tokens": 2},
        headers={"x-weightsync-no-wait": "true"},
    )
    assert refused.status_code == 425, refused.text
    waited: dict[str, Any] = {}
    t2 = threading.Thread(target=lambda: waited.update(r=greedy(client, PROMPT_IDS)))
    t2.start()
    thread.join(60)
    held.__exit__(None, None, None)
    t2.join(60)
    body = out["response"].json()
    assert body["snapshot_identities"] == [BASE]
    assert len(body["choices"][0]["token_ids"]) == LONG
    # The request that arrived during the pending swap waited and ran on the new weights.
    assert waited["r"]["snapshot_identity"] == D1
    last = wait_loaded(client, D1)["last_load"]
    assert last["drain_s"] > 0 and last["pause_s"] > 0


def _cached(client, session: str | None = None) -> int:
    headers = {"x-multi-turn-session-id": session} if session else {}
    r = client.post(
        "/v1/completions", json={"prompt": PROMPT_IDS, "max_tokens": 1}, headers=headers
    )
    assert r.status_code == 200, r.text
    return int(r.json()["usage"]["prompt_tokens_details"]["cached_tokens"])


@pytest.mark.parametrize(
    ("policy", "keeps_shared", "keeps_session"),
    [
        (True, False, False),
        ("all", False, False),
        (False, True, True),
        ("none", True, True),
        ("new_session", False, True),
    ],
)
def test_prompt_cache_reset_modes(serve, chain: Chain, policy, keeps_shared, keeps_session):
    client, _ = serve()
    _cached(client), _cached(client, "chat-1")  # fill both entries
    assert _cached(client) > 0 and _cached(client, "chat-1") > 0
    assert hot_load(client, D1, BASE, reset_prompt_cache=policy).status_code == 200
    wait_loaded(client, D1)
    assert (_cached(client, "chat-1") > 0) is keeps_session
    assert (_cached(client) > 0) is keeps_shared


def test_hint_reads_ahead(serve, chain: Chain) -> None:
    client, replica = serve()
    r = client.post("/hot_load/v1/models/hot_load/hint", json={"identity": D1})
    assert r.status_code == 200
    queued = r.json()["replicas"][0]["queued_files"]
    assert sorted(queued) == sorted(chain.manifests[D1].files)
    assert replica.storage is not None and replica.storage.cached_paths()
    one = next(iter(chain.manifests[D2].files))
    r = client.post("/hot_load/v1/models/hot_load/hint", json={"identity": D2, "files": [one]})
    assert r.json()["replicas"][0]["queued_files"] == [one]
    bad = client.post(
        "/hot_load/v1/models/hot_load/hint", json={"identity": D2, "files": ["../../etc/passwd"]}
    )
    assert bad.status_code == 400
    hot_load(client, D1, BASE)
    assert wait_loaded(client, D1)["loading_state"]["stage"] == "ready"
    assert not any(p.startswith(f"{D1}/") for p in replica.storage.cached_paths())
