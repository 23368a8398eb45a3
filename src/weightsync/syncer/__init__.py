"""`WeightSyncer`: chain state, metadata, timing, warmup and recovery of weight sync."""

from weightsync.syncer.timing import SyncTiming
from weightsync.syncer.weight_syncer import WeightSyncer

__all__ = ["SyncTiming", "WeightSyncer"]
