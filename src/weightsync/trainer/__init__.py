"""The trainer side: `TrainingClient` saves sampler snapshots, resume state and promotions."""

from weightsync.trainer.client import CHECKPOINT_TYPES, SaveSamplerResult, TrainingClient

__all__ = ["CHECKPOINT_TYPES", "SaveSamplerResult", "TrainingClient"]
