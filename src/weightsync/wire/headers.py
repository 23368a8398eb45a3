"""HTTP header names of the wire contract (lower case, as ASGI and httpx carry them)."""

from __future__ import annotations

#: `Authorization: Bearer <key>`: the OpenAI clients' way to send the API key.
AUTHORIZATION_HEADER = "authorization"
#: `X-Api-Key: <key>`: the Fireworks SDK's way (it sends both on hot-load calls).
API_KEY_HEADER = "x-api-key"
#: `accounts/{account}/deployments/{deployment}`: which deployment a request is for.
DEPLOYMENT_HEADER = "fireworks-deployment"
#: The model a request is for; checked only when it names a deployment resource.
MODEL_HEADER = "fireworks-model"
#: Requests that share this id stick to one replica, so its prompt cache is reused.
SESSION_HEADER = "x-multi-turn-session-id"
#: `true`: answer 425 instead of waiting while a weight swap is in progress.
NO_WAIT_HEADER = "x-weightsync-no-wait"
