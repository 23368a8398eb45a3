"""The deployment side of the client: hot-load API, local deployments, sampling."""

from weightsync.deployment.http import RetryPolicy
from weightsync.deployment.local import DeploymentConfig, DeploymentInfo
from weightsync.deployment.manager import DeploymentManager, HotloadResult
from weightsync.deployment.sampler import DeploymentSampler, SampledCompletion

__all__ = [
    "DeploymentConfig",
    "DeploymentInfo",
    "DeploymentManager",
    "DeploymentSampler",
    "HotloadResult",
    "RetryPolicy",
    "SampledCompletion",
]
