"""A replica or gateway of a snapshot chain on 127.0.0.1 (in threads), the HTTP calls the
server tests make to it, and the greedy reference its answers are checked against.

The chain is `_support.chain`; the toy model and its snapshot tensors are `_support.models`.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

import torch

from _support.bits import same_bits
from _support.chain import Chain
from _support.models import model_holding
from weightsync.server.app import create_app
from weightsync.server.config import ReplicaConfig, ServedDeployment
from weightsync.server.replica import Replica
from weightsync.server.runner import ServerThread

PROMPT_IDS = [5, 17, 33, 8, 90, 41, 12, 77, 64, 3, 99, 21, 40, 41, 42, 43, 44, 45]


def reference_greedy(
    config: dict[str, Any], weights: dict[str, torch.Tensor], prompt: list[int], max_tokens: int
) -> tuple[list[int], list[float]]:
    """Greedy tokens and their logprobs from `transformers`' own `generate` (KV-cached, as
    the engine decodes) on a plain model holding `weights`.

    Not a full forward pass per token: bf16 logits of a cached step and of a full pass
    differ in their last bits on CPUs whose matmul kernels block them differently (seen
    on AVX2-only machines), and these tests compare logprobs exactly.
    """
    model = model_holding(config, weights)
    eos = config.get("eos_token_id")
    with torch.inference_mode():
        out = model.generate(
            torch.tensor([prompt]),
            max_new_tokens=max_tokens,
            do_sample=False,
            eos_token_id=eos,
            pad_token_id=eos if eos is not None else 0,
            output_logits=True,
            return_dict_in_generate=True,
        )
    tokens = out.sequences[0, len(prompt) :].tolist()
    logprobs = [
        float(torch.log_softmax(step[0].float(), -1)[token])
        for step, token in zip(out.logits, tokens, strict=True)
    ]
    return tokens, logprobs


def assert_serves(client: Any, replica: Replica, chain: Chain, identity: str) -> None:
    """Status, weights (bit for bit) and greedy completions all say `identity`."""
    status = client.get("/hot_load/v1/models/hot_load").json()["replicas"][0]
    assert status["current_snapshot_identity"] == identity
    assert status["readiness"] is True
    live = replica.engine.named_weights()
    assert all(same_bits(live[n], t) for n, t in chain.weights[identity].items())
    out = greedy(client, PROMPT_IDS)
    tokens, logprobs = reference_greedy(chain.config, chain.weights[identity], PROMPT_IDS, 8)
    assert out["choices"][0]["token_ids"] == tokens
    assert out["choices"][0]["logprobs"]["token_logprobs"] == logprobs
    assert out["snapshot_identity"] == identity
    assert out["model"] == f"weightsync@{identity}"


@contextmanager
def running_replica(config: ReplicaConfig, *, storage: Any = None) -> Iterator[tuple[str, Replica]]:
    """A started replica served by uvicorn in a thread on 127.0.0.1 (a free port)."""
    replica = Replica(config, storage=storage)
    replica.start()
    server = ServerThread(create_app(replica))
    url = server.start()
    try:
        yield url, replica
    finally:
        server.stop()


def wait_loaded(client: Any, identity: str, timeout_s: float = 60.0) -> dict[str, Any]:
    """Poll the hot-load status until the load of `identity` ended; return the replica entry."""
    import time

    deadline = time.monotonic() + timeout_s
    while True:
        status = client.get("/hot_load/v1/models/hot_load").json()["replicas"][0]
        state = status["loading_state"]
        if state["target_snapshot_identity"] == identity and state["stage"] in ("ready", "error"):
            return status
        if time.monotonic() > deadline:
            raise AssertionError(f"load of {identity} did not finish: {status}")
        time.sleep(0.02)


def hot_load(client: Any, identity: str, parent: str | None = None, **extra: Any) -> Any:
    body: dict[str, Any] = {"identity": identity, **extra}
    if parent is not None:
        body["incremental_snapshot_metadata"] = {"previous_snapshot_identity": parent}
    return client.post("/hot_load/v1/models/hot_load", json=body)


def greedy(client: Any, prompt: list[int], max_tokens: int = 8, **headers: str) -> dict[str, Any]:
    r = client.post(
        "/v1/completions",
        json={
            "prompt": prompt,
            "max_tokens": max_tokens,
            "temperature": 0,
            "logprobs": 0,
            "return_token_ids": True,
        },
        headers=headers,
    )
    assert r.status_code == 200, r.text
    return dict(r.json())


@contextmanager
def running_gateway(
    chain: Chain,
    state_root: Path,
    *,
    num_replicas: int,
    dead_replicas: int = 0,
    api_key: str | None = None,
    served: ServedDeployment | None = None,
) -> Iterator[str]:
    """A gateway app on 127.0.0.1 over `num_replicas` replicas of `chain`'s base (in threads)
    and `dead_replicas` loopback ports nothing listens on; yields its URL.

    The replicas answer for the same deployment as the gateway (`served`) and take `api_key`.
    """
    from weightsync.server.gateway import create_gateway_app
    from weightsync.server.runner import bind_socket

    served = served if served is not None else ServedDeployment(storage=str(chain.root))
    with ExitStack() as stack:
        urls = []
        for i in range(num_replicas):
            config = ReplicaConfig(
                storage=str(chain.root),
                snapshot=next(iter(chain.manifests)),
                state_dir=state_root / f"replica-{i}",
                replica_id=f"replica-{i}",
                model_name=served.model_name,
                deployment_id=served.deployment_id,
                account_id=served.account_id,
                api_key=api_key,
            )
            url, _ = stack.enter_context(running_replica(config))
            urls.append(url)
        for _ in range(dead_replicas):
            sock = bind_socket("127.0.0.1", 0)
            urls.append(f"http://127.0.0.1:{sock.getsockname()[1]}")
            sock.close()  # nothing listens there any more
        app = create_gateway_app(urls, api_key=api_key, max_body_bytes=1 << 20, served=served)
        yield stack.enter_context(ServerThread(app))
