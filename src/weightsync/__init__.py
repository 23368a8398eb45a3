"""weightsync: fast, lossless, verified weight sync from an RL trainer into a deployment."""

__version__ = "0.1.0"
