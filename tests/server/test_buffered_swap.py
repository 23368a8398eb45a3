"""A replica with the buffered swap: loads written into a spare copy, the pause a swap.

Every load is checked bit for bit and by greedy completions against a reference model;
where the model computes from is checked through its parameters' storage, which
alternates between the two copies (an in-place apply never moves it).
"""

from __future__ import annotations

from contextlib import ExitStack
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest

from _support.chain import Chain
from _support.serving import assert_serves, hot_load, wait_loaded
from _support.weights import perturb
from weightsync.codec.bits import bits
from weightsync.server.app import create_app
from weightsync.server.config import ReplicaConfig
from weightsync.server.engines.torch_engine import TorchEngine
from weightsync.server.replica import Replica
from weightsync.server.runner import ServerThread

BASE, D1, D2, D3 = (f"{n}-0badcafe" for n in ("base", "step1", "step2", "step3"))
pytestmark = pytest.mark.timeout(120)
BUFFERED = {"buffered_swap": True}


def _storage_of(replica: Replica) -> int:
    """Where the model's first parameter lives now."""
    engine = replica.engine
    assert isinstance(engine, TorchEngine)
    model = engine._require_loaded().model
    return int(next(model.parameters()).data_ptr())


def test_deltas_and_a_base_load_bit_exact_with_the_pause_a_swap(serve, chain: Chain) -> None:
    client, replica = serve(engine_options=BUFFERED)
    where = [_storage_of(replica)]
    base2 = chain.base("base2", perturb(chain.weights[D1], seed=11, fraction=1.0))
    d4 = chain.delta("step4", base2, seed=4)
    for parent, identity in ((BASE, D1), (D1, D2), (D2, D3), (None, base2), (base2, d4)):
        r = hot_load(client, identity, parent)
        assert r.status_code == 200, r.text
        status = wait_loaded(client, identity)
        assert status["loading_state"]["stage"] == "ready", status
        last = status["last_load"]
        assert last["result"] == "ok" and last["stage_s"] > 0
        assert_serves(client, replica, chain, identity)
        where.append(_storage_of(replica))
    # Each load moved the model onto the other copy, and back.
    assert where[0] != where[1] and where[::2] == [where[0]] * 3 and where[1::2] == [where[1]] * 3


def test_a_mismatch_after_the_swap_puts_the_previous_weights_back_then_loads_exact(
    chain: Chain, tmp_path: Path
) -> None:
    """The swapped-in copy is checked like an in-place apply: one wrong bit (once) is
    caught, the previous weights are read again and served, and the retry is exact."""

    class OneBitOffOnce(TorchEngine):
        broken = False

        def apply_patches(self, patches: Any, *, keep_undo: bool = True) -> Any:
            undo = super().apply_patches(patches, keep_undo=keep_undo)
            if not self.broken:
                self.broken = True
                view = bits(self.named_weights()[sorted(patches)[0]]).reshape(-1)
                view[0] = np.bitwise_xor(view[0], 1)
            return undo

    config = ReplicaConfig(
        storage=str(chain.root), snapshot=BASE, state_dir=tmp_path / "state"
    )  # the chain's base
    replica = Replica(config, engine=OneBitOffOnce(buffered_swap=True))
    replica.start()
    with ExitStack() as stack:
        server = ServerThread(create_app(replica))
        stack.callback(server.stop)
        client = stack.enter_context(httpx.Client(base_url=server.start(), timeout=60))
        hot_load(client, D1, BASE)
        status = wait_loaded(client, D1)
        assert status["loading_state"]["stage"] == "error"
        assert "do not match the manifest" in status["loading_state"]["error"]
        assert_serves(client, replica, chain, BASE)
        for parent, identity in ((BASE, D1), (D1, D2), (D2, D3)):
            hot_load(client, identity, parent)
            assert wait_loaded(client, identity)["loading_state"]["stage"] == "ready"
            assert_serves(client, replica, chain, identity)
