"""The buffered swap: a second copy of a model's weights, patched while serving goes on.

With `TorchEngine(buffered_swap=True)` the engine keeps a spare copy of every weight,
bit-equal to the live one between loads. A load writes its patches into the spare
(`stage`, before the swap lock: serving goes on), and the serving pause only points
the model's parameters at the spare (`swap`: a few microseconds a tensor), so the
pause no longer grows with the change. What was live becomes the spare, one load
behind; `catch_up` writes the same patches into it (or copies a dense one from the
live tensor) once the load has ended, on one background thread at the lowest CPU
priority, so that it takes only what serving and the trainer leave idle. The next
use of the spare stops it and writes what it left at full speed.

The cost is one more copy of the model for the replica's whole life. A spare that
may differ from the live weights (a write failed part way, or the live weights were
written without it: a base loaded in place, an apply that was not staged) is marked
stale and copied whole from the live weights before its next use.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Mapping

import torch

from weightsync.background import lowest_priority
from weightsync.codec import Patch, write_patches
from weightsync.codec.bits import bits
from weightsync.errors import DeploymentError

logger = logging.getLogger(__name__)


class _Slot:
    """Where the model holds one weight: its parameter objects and buffer entries."""

    def __init__(self) -> None:
        self.params: list[torch.nn.Parameter] = []
        self.buffers: list[tuple[torch.nn.Module, str]] = []

    def point_at(self, tensor: torch.Tensor) -> None:
        for param in self.params:
            param.data = tensor
        for module, attr in self.buffers:
            module._buffers[attr] = tensor


def _slots(model: torch.nn.Module, live: Mapping[str, torch.Tensor]) -> dict[str, _Slot]:
    """Each weight's holders in `model`, found by storage (a tied weight has one holder)."""
    by_ptr: dict[int, _Slot] = {}
    seen: set[int] = set()
    for module in model.modules():
        for param in module._parameters.values():
            if param is not None and param.numel() and id(param) not in seen:
                seen.add(id(param))
                by_ptr.setdefault(param.data_ptr(), _Slot()).params.append(param)
        for attr, buffer in module._buffers.items():
            if buffer is not None and buffer.numel():
                by_ptr.setdefault(buffer.data_ptr(), _Slot()).buffers.append((module, attr))
    # An empty weight has no storage to find it by, and nothing to patch: it stays put.
    slots = {n: by_ptr.get(t.data_ptr()) for n, t in live.items() if t.numel()}
    orphans = [name for name, slot in slots.items() if slot is None]
    if orphans:
        raise DeploymentError(
            f"the buffered swap cannot find the model's parameters for {orphans[:5]}; "
            "serve this model without --buffered-swap"
        )
    return {name: slot for name, slot in slots.items() if slot is not None}


class SpareWeights:
    """A spare copy of `live` (the model's weights by snapshot name) and the swap.

    Not thread-safe on its own: the engine calls `stage`, `swap` and `invalidate`
    from one load at a time (loads are serialized), `swap` inside its step lock.
    """

    def __init__(self, model: torch.nn.Module, live: Mapping[str, torch.Tensor]) -> None:
        self._slots = _slots(model, live)
        self.tensors: dict[str, torch.Tensor] = {n: t.clone() for n, t in live.items()}
        #: What the live weights have that the spare lacks: a sparse patch to write, or
        #: None to copy the live tensor whole.
        self._behind: dict[str, Patch | None] = {}
        self._staged: Mapping[str, Patch] | None = None
        self._stale = False
        self._catching_up: threading.Thread | None = None
        self._hurry = threading.Event()

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors.values())

    def stage(self, patches: Mapping[str, Patch], live: Mapping[str, torch.Tensor]) -> None:
        """Bring the spare level with `live`, then write `patches` into it.

        Raises what `write_patches` raises (`ValueError`, `IndexError`, ...), leaving
        the spare stale; the live weights are never written.
        """
        self.wait()
        self._staged = None
        try:
            self._level_with(live)
            write_patches((self.tensors[n], p) for n, p in patches.items())
        except BaseException:
            self._stale = True
            raise
        self._staged = patches

    def is_staged(self, patches: Mapping[str, Patch]) -> bool:
        return self._staged is patches

    def swap(self, live: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Point the model at the staged spare; return it as the new live weights.

        The old live tensors become the spare, behind by the staged patches.
        """
        staged = self._staged
        if staged is None:
            raise DeploymentError("the buffered swap was asked to swap before staging")
        for name, slot in self._slots.items():
            slot.point_at(self.tensors[name])
        new_live, self.tensors = self.tensors, live
        # A dense patch is the whole tensor again: copy it from the live one instead of
        # holding the patch (for a base, that frees the fetched bytes).
        self._behind = {n: (p if p.positions is not None else None) for n, p in staged.items()}
        self._staged = None
        return new_live

    def catch_up(self, live: Mapping[str, torch.Tensor]) -> None:
        """Start writing what the spare lacks, in the background (`wait` stops it)."""
        self.wait()
        if not self._behind or self._stale:
            return
        self._hurry.clear()
        self._catching_up = threading.Thread(
            target=self._catch_up_now, args=(dict(live),), name="spare-catch-up", daemon=True
        )
        self._catching_up.start()

    def _catch_up_now(self, live: Mapping[str, torch.Tensor]) -> None:
        """One tensor at a time on this thread, until done or told to stop (`wait`)."""
        lowest_priority("the spare catch-up")
        try:
            while self._behind and not self._hurry.is_set():
                name, patch = self._behind.popitem()
                if patch is None:
                    patch = Patch(None, bits(live[name]).reshape(-1))
                write_patches([(self.tensors[name], patch)], threads=1)
        except Exception:  # a bug: the spare is copied whole before its next use
            logger.exception("bringing the spare weights up to date failed; it is recopied")
            self._stale = True

    def _level_with(self, live: Mapping[str, torch.Tensor]) -> None:
        behind: Mapping[str, Patch | None] = (
            dict.fromkeys(live, None) if self._stale else self._behind
        )
        write_patches(
            (self.tensors[n], p if p is not None else Patch(None, bits(live[n]).reshape(-1)))
            for n, p in behind.items()
        )
        self._behind = {}
        self._stale = False

    def invalidate(self) -> None:
        """The live weights were written without the spare: copy them whole next time."""
        self.wait()
        self._staged = None
        self._behind = {}
        self._stale = True

    def wait(self) -> None:
        """Stop the background catch-up after its current tensor; what it left stays
        behind, for `stage` to write."""
        if self._catching_up is not None:
            self._hurry.set()
            self._catching_up.join()
            self._catching_up = None


__all__ = ["SpareWeights"]
