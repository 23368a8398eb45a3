"""A recorded run of optimizer steps that every method replays identically.

The end-to-end section syncs the *same* updates with every method. Training
again per method would cost minutes each at the 0.6B shape, so the benchmark
trains once, records each step as the bf16 elements it changed (a few percent
of them: small), and replays the steps into a model whose fp32 parameters hold
exactly those bf16 values. A `TrainingClient` exporting bf16 from that model
then sees bit for bit the snapshots the training produced.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np
import torch

from weightsync.codec.bits import bits
from weightsync.errors import InvalidInputError

# name -> (sorted flat positions, new bf16 bits there)
StepChanges = dict[str, tuple[np.ndarray, np.ndarray]]


def step_changes(old: Mapping[str, torch.Tensor], new: Mapping[str, torch.Tensor]) -> StepChanges:
    """The bf16 elements that differ between two snapshots (same names, shapes)."""
    if old.keys() != new.keys():
        raise InvalidInputError(
            "snapshots to diff must hold the same tensor names; differing: "
            f"{sorted(set(old) ^ set(new))[:5]}"
        )
    out: StepChanges = {}
    for name, before in old.items():
        a, b = bits(before), bits(new[name])
        positions = np.flatnonzero(a != b)
        if positions.size:
            out[name] = (positions, b[positions].copy())
    return out


@dataclass
class Trajectory:
    """Initial bf16 weights of one training run plus the changes of each step."""

    lr: float
    initial: dict[str, torch.Tensor]
    steps: list[StepChanges] = field(default_factory=list)

    @property
    def num_elements(self) -> int:
        return sum(t.numel() for t in self.initial.values())

    def changed_fraction(self, step: int) -> float:
        """Fraction of elements step `step` (1-based) changed."""
        changed = sum(int(pos.size) for pos, _ in self.steps[step - 1].values())
        return changed / max(self.num_elements, 1)

    def load_initial(self, model: torch.nn.Module) -> None:
        """Set `model`'s parameters to the initial bf16 weights (held exactly in fp32)."""
        state = _named_tensors(model, self.initial)
        with torch.no_grad():
            for name, target in state.items():
                target.copy_(self.initial[name].to(target.dtype))

    def apply_step(self, model: torch.nn.Module, step: int) -> None:
        """Write step `step`'s (1-based) changed bf16 values into `model` in place."""
        state = _named_tensors(model, self.initial)
        for name, (positions, new_bits) in self.steps[step - 1].items():
            target = state[name]
            if target.dtype == torch.float32:
                # bf16 -> fp32 is exact: the bf16 bits are the fp32 word's high half.
                bits(target)[positions] = new_bits.astype(np.uint32) << 16
            elif target.dtype == torch.bfloat16:
                bits(target)[positions] = new_bits
            else:
                raise InvalidInputError(
                    f"cannot replay bf16 changes into {name} of dtype {target.dtype}; "
                    "use an fp32 or bf16 model"
                )


def _named_tensors(
    model: torch.nn.Module, expected: Mapping[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    state = model.state_dict(keep_vars=False)
    missing = [name for name in expected if name not in state]
    if missing:
        raise InvalidInputError(
            f"the replay model lacks tensors of the recorded run: {missing[:5]}; build it from "
            "the same config as the trained model"
        )
    out = {name: state[name] for name in expected}
    for name, tensor in out.items():
        if not tensor.is_contiguous() or tuple(tensor.shape) != tuple(expected[name].shape):
            raise InvalidInputError(
                f"replay tensor {name} has shape {tuple(tensor.shape)} (contiguous: "
                f"{tensor.is_contiguous()}), expected {tuple(expected[name].shape)}"
            )
    return out
