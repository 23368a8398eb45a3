"""Every HTTP path of a deployment, in one place (the replica, the gateway and the clients).

Paths with a `{...}` part are templates for the server's routes; the `*_path()`
functions build the concrete path a client sends.
"""

from __future__ import annotations

# --- hot-load API -----------------------------------------------------------

HOT_LOAD_PATH = "/hot_load/v1/models/hot_load"
HINT_PATH = "/hot_load/v1/models/hot_load/hint"
LEDGER_PATH = "/hot_load/v1/ledger"
LEDGER_RESET_PATH = "/hot_load/v1/ledger/reset"
WEIGHTS_PATH = "/hot_load/v1/weights"
#: An elastic (Ray) deployment's replica count (POST; the gateway of a fixed pool has none).
SCALE_PATH = "/hot_load/v1/deployment/scale"

# --- operations -------------------------------------------------------------

HEALTH_PATH = "/health"
METRICS_PATH = "/metrics"

# --- inference (OpenAI wire format; the Fireworks SDK uses the /inference aliases) ---

COMPLETIONS_PATH = "/v1/completions"
CHAT_COMPLETIONS_PATH = "/v1/chat/completions"
MODELS_PATH = "/v1/models"
INFERENCE_PREFIX = "/inference"
INFERENCE_COMPLETIONS_PATH = INFERENCE_PREFIX + COMPLETIONS_PATH
INFERENCE_CHAT_COMPLETIONS_PATH = INFERENCE_PREFIX + CHAT_COMPLETIONS_PATH
INFERENCE_MODELS_PATH = INFERENCE_PREFIX + MODELS_PATH

# --- control plane (the subset the Fireworks SDK's DeploymentManager calls) ---

ACCOUNTS_PATH = "/v1/accounts"
DEPLOYMENTS_PATH = ACCOUNTS_PATH + "/{account_id}/deployments"
DEPLOYMENT_PATH = DEPLOYMENTS_PATH + "/{deployment_id}"


def deployments_path(account_id: str) -> str:
    """`/v1/accounts/{account_id}/deployments` (create a deployment: POST)."""
    return DEPLOYMENTS_PATH.format(account_id=account_id)


def deployment_path(account_id: str, deployment_id: str) -> str:
    """`/v1/accounts/{account_id}/deployments/{deployment_id}` (GET, PATCH, DELETE)."""
    return DEPLOYMENT_PATH.format(account_id=account_id, deployment_id=deployment_id)
