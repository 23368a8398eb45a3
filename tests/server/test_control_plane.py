"""The wire the Fireworks SDK speaks, outside inference: API keys, the control plane, headers.

The SDK's own `DeploymentManager` (fireworks-ai 1.2.30, its defaults, no private
attribute touched) is pointed at a real replica and a real gateway on
127.0.0.1. Every SDK call here is answered with a status it does not retry
(2xx or a 4xx other than 408/429), so none waits; each test is bounded by its
timeout all the same.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from fireworks.training.sdk.deployment import DeploymentConfig, DeploymentManager

from _support.chain import Chain
from _support.serving import running_gateway
from weightsync.server.config import ServedDeployment
from weightsync.wire import (
    ACCOUNTS_PATH,
    COMPLETIONS_PATH,
    HEALTH_PATH,
    HOT_LOAD_PATH,
    LEDGER_PATH,
    Deployment,
    HotLoadStatus,
    deployment_path,
    deployments_path,
)

pytestmark = pytest.mark.timeout(120)

BASE, D1 = "base-0badcafe", "step1-0badcafe"
KEY = "s3cret-key"
ACCOUNT, DEPLOYMENT, MODEL = "acct", "dep", "toy"
SERVED = f"accounts/{ACCOUNT}/deployments/{DEPLOYMENT}"
SDK_LOGGER = "fireworks.training.sdk.deployment"


def _served(chain: Chain) -> ServedDeployment:
    return ServedDeployment(
        account_id=ACCOUNT, deployment_id=DEPLOYMENT, model_name=MODEL, storage=str(chain.root)
    )


@pytest.fixture
def deployment_url(request, serve, chain: Chain, tmp_path: Path):
    """The URL of a replica, or of a gateway over two replicas, serving `dep` with key `KEY`."""
    if request.param == "replica":
        client, _ = serve(
            api_key=KEY, account_id=ACCOUNT, deployment_id=DEPLOYMENT, model_name=MODEL
        )
        yield str(client.base_url).rstrip("/")
        return
    with running_gateway(
        chain, tmp_path / "gw", num_replicas=2, api_key=KEY, served=_served(chain)
    ) as url:
        yield url


both = pytest.mark.parametrize("deployment_url", ["replica", "gateway"], indirect=True)


def _sdk(url: str, api_key: str = KEY) -> DeploymentManager:
    return DeploymentManager(api_key, base_url=url, hotload_api_url=url, inference_url=url)


# --- API keys -------------------------------------------------------------------------


@both
def test_the_key_is_taken_as_bearer_or_x_api_key(deployment_url: str) -> None:
    def status(**headers: str) -> int:
        return httpx.get(deployment_url + HOT_LOAD_PATH, headers=headers, timeout=30).status_code

    assert status(authorization=f"Bearer {KEY}") == 200
    assert status(**{"x-api-key": KEY}) == 200
    assert status(authorization=f"bearer {KEY}") == 200  # the scheme is case-insensitive
    assert status(authorization="Bearer wrong") == 401
    assert status(**{"x-api-key": "wrong"}) == 401
    assert status(authorization=KEY) == 401  # a key without the Bearer scheme
    assert status() == 401
    # One matching key suffices (the SDK sends both headers on hot-load calls).
    assert status(authorization="Bearer wrong", **{"x-api-key": KEY}) == 200
    refused = httpx.get(deployment_url + ACCOUNTS_PATH, timeout=30)
    assert refused.status_code == 401
    assert "X-Api-Key" in refused.json()["error"]["message"]
    assert httpx.get(deployment_url + HEALTH_PATH, timeout=30).status_code == 200


@both
def test_a_wrong_key_fails_the_sdk_at_once(deployment_url: str) -> None:
    with _sdk(deployment_url, api_key="wrong") as mgr, pytest.raises(httpx.HTTPStatusError) as e:
        _ = mgr.account_id
    assert e.value.response.status_code == 401


# --- the SDK's DeploymentManager -----------------------------------------------------


@both
def test_sdk_resolves_the_account_and_reads_the_deployment(
    deployment_url: str, chain: Chain
) -> None:
    with _sdk(deployment_url) as mgr:
        assert mgr.account_id == ACCOUNT
        info = mgr.get(DEPLOYMENT)
        assert info is not None
        assert (info.deployment_id, info.name, info.state) == (DEPLOYMENT, SERVED, "READY")
        assert info.base_model == MODEL and info.inference_model == SERVED
        assert info.hot_load_transition_type == "ASYNC"
        assert info.hot_load_bucket_url == str(chain.root)
        assert mgr.get("another-deployment") is None  # 404: the SDK's "does not exist"
        ready = mgr.wait_for_ready(DEPLOYMENT, timeout_s=30, poll_interval_s=0.1)
        assert ready.state == "READY"

        status = HotLoadStatus.model_validate(mgr.hotload_check_status(DEPLOYMENT, MODEL))
        assert all(r.current_snapshot_identity == BASE and r.readiness for r in status.replicas)
        with pytest.raises(httpx.HTTPStatusError) as e:
            mgr.hotload_check_status("another-deployment", MODEL)
        assert e.value.response.status_code == 404
        assert SERVED in e.value.response.json()["error"]["message"]

    raw = httpx.get(
        deployment_url + deployment_path(ACCOUNT, DEPLOYMENT),
        headers={"x-api-key": KEY},
        timeout=30,
    ).json()
    resource = Deployment.model_validate(raw)
    replicas = len(status.replicas)
    assert resource.replica_count == resource.max_replica_count == replicas
    assert resource.replica_stats.ready_replica_count == replicas
    assert resource.status.code == "OK"


@both
def test_sdk_create_or_get_returns_the_running_deployment(
    deployment_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    config = DeploymentConfig(deployment_id=DEPLOYMENT, base_model=MODEL)
    with _sdk(deployment_url) as mgr:
        got = mgr.create_or_get(config)
        assert (got.name, got.state, got.base_model) == (SERVED, "READY", MODEL)
        # force_recreate: the delete is refused (logged), the create answers 409, the SDK
        # then fetches and returns the running deployment — nothing is recreated.
        with caplog.at_level(logging.WARNING, logger=SDK_LOGGER):
            again = mgr.create_or_get(config, force_recreate=True)
        assert (again.name, again.state) == (SERVED, "READY")
        assert "Failed to delete deployment dep" in caplog.text and "400" in caplog.text
        other = DeploymentConfig(deployment_id="another-deployment", base_model=MODEL)
        with pytest.raises(httpx.HTTPStatusError) as e:
            mgr.create_or_get(other)
        assert e.value.response.status_code == 400
        message = e.value.response.json()["error"]["message"]
        assert SERVED in message and "--deployment-id another-deployment" in message
        status = HotLoadStatus.model_validate(mgr.hotload_check_status(DEPLOYMENT, MODEL))
        assert all(r.current_snapshot_identity == BASE for r in status.replicas)


@both
def test_sdk_delete_scale_and_update_get_clear_answers(
    deployment_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    with _sdk(deployment_url) as mgr:
        with caplog.at_level(logging.WARNING, logger=SDK_LOGGER):
            mgr.delete(DEPLOYMENT)  # best effort in the SDK: it logs the 400 and returns
            mgr.scale_to_zero(DEPLOYMENT)
        assert "Failed to delete deployment dep" in caplog.text
        assert "Failed to scale deployment dep to zero" in caplog.text
        # The SDK logs only the status; the body says what to do instead.
        path = deployment_path(ACCOUNT, DEPLOYMENT)
        headers = {"x-api-key": KEY}
        deleted = httpx.delete(deployment_url + path, headers=headers, timeout=30)
        assert deleted.status_code == 400
        assert "stop that process" in deleted.json()["error"]["message"]
        body = {"maxReplicaCount": 0, "minReplicaCount": 0}
        scaled = httpx.patch(deployment_url + path, json=body, headers=headers, timeout=30)
        assert scaled.status_code == 400
        assert "cannot scale to zero" in scaled.json()["error"]["message"]
        # An update that changes nothing is answered with the deployment (a no-op) ...
        same = mgr.update(
            DEPLOYMENT, {"hotLoadTransitionType": "ASYNC"}, "hot_load_transition_type"
        )
        assert (same.state, same.hot_load_transition_type) == ("READY", "ASYNC")
        # ... one that would change it is refused, saying how to change it.
        with pytest.raises(httpx.HTTPStatusError) as e:
            mgr.update(DEPLOYMENT, {"hotLoadTransitionType": "SYNC"}, ["hot_load_transition_type"])
        assert e.value.response.status_code == 400
        assert "--transition sync" in e.value.response.json()["error"]["message"]
        with pytest.raises(httpx.HTTPStatusError) as e:
            mgr.update(DEPLOYMENT, {"maxReplicaCount": 5}, ["max_replica_count"])
        assert "--replicas 5" in e.value.response.json()["error"]["message"]
        # Still running and serving what it served.
        info = mgr.get(DEPLOYMENT)
        assert info is not None and info.state == "READY"


# --- requests for another deployment ---------------------------------------------------


@both
def test_another_deployment_gets_a_404_naming_the_served_one(deployment_url: str) -> None:
    client = httpx.Client(base_url=deployment_url, headers={"x-api-key": KEY}, timeout=60)
    other = f"accounts/{ACCOUNT}/deployments/another-deployment"
    completion = {"prompt": [1, 2], "max_tokens": 2, "temperature": 0}
    for headers in ({"fireworks-deployment": other}, {"fireworks-model": other}):
        for method, path, body in (
            ("GET", HOT_LOAD_PATH, None),
            ("POST", HOT_LOAD_PATH, {"identity": D1}),
            ("GET", LEDGER_PATH, None),
            ("POST", COMPLETIONS_PATH, completion),
        ):
            r = client.request(method, path, json=body, headers=headers)
            assert r.status_code == 404, (method, path, headers, r.text)
            message = r.json()["error"]["message"]
            assert SERVED in message and "another-deployment" in message
    # Another account in the name is another deployment too.
    r = client.get(HOT_LOAD_PATH, headers={"fireworks-deployment": "accounts/x/deployments/dep"})
    assert r.status_code == 404
    # What the SDK sends for the served deployment passes: the deployment header, and the
    # base model's name in fireworks-model (a model name, not a deployment: not checked).
    sdk_headers = {"fireworks-deployment": SERVED, "fireworks-model": "accounts/fireworks/models/x"}
    assert client.get(HOT_LOAD_PATH, headers=sdk_headers).status_code == 200
    assert client.post(COMPLETIONS_PATH, json=completion, headers=sdk_headers).status_code == 200
    # The body's model, as the SDK's sampler sends it: another deployment is a 404 too.
    for model in (other, f"{other}@{D1}"):
        r = client.post(COMPLETIONS_PATH, json={**completion, "model": model})
        assert r.status_code == 404, (model, r.text)
        message = r.json()["error"]["message"]
        assert SERVED in message and "another-deployment" in message
    r = client.post(COMPLETIONS_PATH, json={**completion, "model": SERVED})
    assert r.status_code == 200, r.text
    # The account list serves no deployment: the header does not apply to it.
    assert client.get(ACCOUNTS_PATH, headers={"fireworks-deployment": other}).status_code == 200
    # The resource paths of another account or deployment.
    for path in (
        deployment_path(ACCOUNT, "another-deployment"),
        deployment_path("another-account", DEPLOYMENT),
    ):
        assert client.get(path).status_code == 404
        assert client.delete(path).status_code == 404
        assert client.patch(path, json={"maxReplicaCount": 0}).status_code == 404
        assert SERVED in client.get(path).json()["error"]["message"]
    created = client.post(
        deployments_path("another-account") + "?deploymentId=dep", json={"baseModel": MODEL}
    )
    assert created.status_code == 404
    client.close()


# --- the deployment's state ---------------------------------------------------------------


def test_a_gateway_with_a_replica_down_reports_updating(chain: Chain, tmp_path: Path) -> None:
    with (
        running_gateway(
            chain,
            tmp_path,
            num_replicas=1,
            dead_replicas=1,
            api_key=KEY,
            served=_served(chain),
        ) as url,
        _sdk(url) as mgr,
    ):
        info = mgr.get(DEPLOYMENT)
        assert info is not None and info.state == "UPDATING"
        raw = httpx.get(
            url + deployment_path(ACCOUNT, DEPLOYMENT), headers={"x-api-key": KEY}, timeout=30
        )
        resource = Deployment.model_validate(raw.json())
        assert resource.replica_count == 2 and resource.replica_stats.ready_replica_count == 1
        assert resource.status.code == "UNAVAILABLE"
        assert "1 of 2" in resource.status.message and "replica-1" in resource.status.message


@pytest.mark.timeout(240)
def test_weightsync_serve_flags_name_the_deployment(chain: Chain, tmp_path: Path) -> None:
    """`weightsync serve --replicas 2 --deployment-id --account-id`: gateway and replicas agree."""
    ready = tmp_path / "ready.json"
    cmd = [
        sys.executable, "-m", "weightsync.cli", "serve",
        "--storage", str(chain.root), "--snapshot", BASE, "--replicas", "2",
        "--engine-threads", "1", "--state-dir", str(tmp_path / "state"),
        "--model-name", MODEL, "--deployment-id", DEPLOYMENT, "--account-id", ACCOUNT,
        "--ready-file", str(ready), "--log-level", "warning",
    ]  # fmt: skip
    proc = subprocess.Popen(cmd, env=dict(os.environ, WEIGHTSYNC_API_KEY=KEY))
    try:
        deadline = time.monotonic() + 180
        while not ready.exists():
            assert proc.poll() is None, "weightsync serve exited"
            assert time.monotonic() < deadline, "weightsync serve did not start in 180 s"
            time.sleep(0.1)
        url = json.loads(ready.read_text())["url"]
        with _sdk(url) as mgr:
            assert mgr.account_id == ACCOUNT
            info = mgr.wait_for_ready(DEPLOYMENT, timeout_s=60, poll_interval_s=0.2)
            assert (info.name, info.state) == (SERVED, "READY")
            status = HotLoadStatus.model_validate(mgr.hotload_check_status(DEPLOYMENT, MODEL))
            assert [r.replica_id for r in status.replicas] == ["replica-0", "replica-1"]
            assert mgr.get("weightsync") is None  # the default id is not what was asked for
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(60)
