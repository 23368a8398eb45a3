"""Plain helpers of the syncer tests (the training step and reference: `_support.training`)."""

from __future__ import annotations

from weightsync.deployment import DeploymentManager


def serving(deploy_mgr: DeploymentManager, deployment_id: str) -> set[str | None]:
    status = deploy_mgr.hotload_check_status(deployment_id)
    return {r["current_snapshot_identity"] for r in status["replicas"]}
