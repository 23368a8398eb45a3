"""The syncer propagates the deployment manager's own error, with its context added to the
message (never a new error rebuilt from the class), and takes only weightsync's client."""

from __future__ import annotations

import httpx
import pytest

from _support.deployments import serving
from weightsync import WeightSyncer
from weightsync.deployment import DeploymentManager
from weightsync.errors import DeploymentHTTPError, InvalidInputError
from weightsync.wire.paths import HOT_LOAD_PATH

pytestmark = pytest.mark.timeout(240)


class HotloadUnavailable(httpx.HTTPTransport):
    """The real network, except that the hot-load POST answers 503 (a fault at the seam)."""

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        if request.method == "POST" and request.url.path.endswith(HOT_LOAD_PATH):
            return httpx.Response(
                503, json={"error": {"message": "injected: overloaded", "code": 503}}
            )
        return super().handle_request(request)


def test_an_http_error_keeps_its_type_status_and_gains_the_syncers_context(
    make_client, deploy_mgr, shared_deployment
):
    info = deploy_mgr.get(shared_deployment)
    assert info is not None and info.url
    mgr = DeploymentManager(base_url=info.url, stop_on_exit=False, transport=HotloadUnavailable())
    client = make_client()
    syncer = WeightSyncer(client, mgr, shared_deployment, "tiny", warmup_max_retries=0)
    before = serving(deploy_mgr, shared_deployment)
    with pytest.raises(DeploymentHTTPError) as raised:
        syncer.save_and_hotload("http-00000")
    error = raised.value
    assert error.status_code == 503 and error.method == "POST"  # the manager's own error
    message = str(error)
    identity = f"http-00000-{client.session_id}"
    assert message.startswith(f"deployment {shared_deployment!r} did not load {identity!r}: ")
    assert "HTTP 503: injected: overloaded" in message
    assert "Deployment reports: replica-0: serving" in message and "What to do:" in message
    assert serving(deploy_mgr, shared_deployment) == before  # nothing was loaded
    mgr.close()


def test_the_policy_client_must_be_a_training_client() -> None:
    with pytest.raises(InvalidInputError, match="needs a weightsync TrainingClient, got dict"):
        WeightSyncer(policy_client={"compression_format": "arc_v2"})  # type: ignore[arg-type]
