"""A base and deltas in one storage root, written by the real snapshot writer (server tests)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from _support.weights import perturb
from weightsync.snapshot import Manifest, SnapshotStore, write_base, write_delta

#: The session every chain's identities end in (`<name>-<SESSION>`).
SESSION = "0badcafe"


@dataclass
class Chain:
    """A base and deltas in one storage root, remembering the weights each stands for."""

    root: Path
    config: dict[str, Any]
    tokenizer_dir: Path | None
    weights: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict)
    manifests: dict[str, Manifest] = field(default_factory=dict)

    @property
    def store(self) -> SnapshotStore:
        return SnapshotStore(self.root)

    def base(self, name: str, tensors: dict[str, torch.Tensor]) -> str:
        identity = f"{name}-{SESSION}"
        self.manifests[identity] = write_base(
            self.root, identity, tensors, config=self.config, tokenizer_dir=self.tokenizer_dir
        )
        self.weights[identity] = tensors
        return identity

    def delta(self, name: str, parent: str, seed: int, **kwargs: Any) -> str:
        identity = f"{name}-{SESSION}"
        # A training step's worth of change: a few elements of every tensor move a little.
        new = perturb(self.weights[parent], seed=seed, fraction=0.05)
        self.manifests[identity] = write_delta(
            self.root,
            identity,
            parent=self.manifests[parent],
            old=self.weights[parent],
            new=new,
            **kwargs,
        )
        self.weights[identity] = new
        return identity
