"""Every answer names the snapshot whose weights produced it, at every moment of a load."""

from __future__ import annotations

import threading
from pathlib import Path

import httpx
import pytest

from _support.chain import Chain
from _support.serving import PROMPT_IDS, greedy, hot_load, reference_greedy, wait_loaded
from weightsync.server.app import create_app
from weightsync.server.config import ReplicaConfig
from weightsync.server.replica import Replica
from weightsync.server.runner import ServerThread

BASE, D1 = "base-0badcafe", "step1-0badcafe"
pytestmark = pytest.mark.timeout(120)


def test_an_answer_during_the_post_swap_check_names_the_weights_it_used(
    chain: Chain, tmp_path: Path
) -> None:
    reached = threading.Event()
    release = threading.Event()

    def hold_at_checking(stage: str, identity: str) -> None:
        if stage == "checking" and identity == D1:
            reached.set()
            assert release.wait(60)

    config = ReplicaConfig(storage=str(chain.root), snapshot=BASE, state_dir=tmp_path / "s")
    replica = Replica(config, on_stage=hold_at_checking)
    replica.start()
    with ServerThread(create_app(replica)) as url, httpx.Client(base_url=url, timeout=60) as c:
        references = {
            i: reference_greedy(chain.config, chain.weights[i], PROMPT_IDS, 8)[0]
            for i in (BASE, D1)
        }
        assert references[BASE] != references[D1]
        assert hot_load(c, D1, BASE).status_code == 200
        assert reached.wait(60)  # the new weights are live; the check runs
        try:
            answer = greedy(c, PROMPT_IDS, max_tokens=8)
        finally:
            release.set()
        wait_loaded(c, D1)
    named = answer["snapshot_identity"]
    assert answer["choices"][0]["token_ids"] == references[named], (
        f"labelled {named!r} but computed with the other snapshot's weights"
    )
