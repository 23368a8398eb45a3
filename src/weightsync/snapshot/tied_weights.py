"""Tied weights: the names of a state dict that share one tensor, found by storage.

A snapshot holds each tensor once. When several state-dict names are the same
view of one storage (tied embeddings: `lm_head.weight` is
`model.embed_tokens.weight`), the first name in state-dict order is kept, as
`save_pretrained` does, and the others are dropped. The rule looks at memory,
never at names, so it finds any model's ties and never merges two separate
tensors. The trainer's export, the embedded engine and a replica reading a model
directory all use it, so all three name a model's tensors the same way.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch

from weightsync.errors import InvalidInputError

# One view of a storage: its byte offset, dtype, shape and strides.
_View = tuple[int, torch.dtype, tuple[int, ...], tuple[int, ...]]


def tied_duplicates(
    named_tensors: Iterable[tuple[str, torch.Tensor]], *, what: str
) -> dict[str, str]:
    """Map each tied duplicate to the earlier name it aliases (dropped name -> kept name).

    Two names are tied when their tensors are the same view (offset, dtype, shape,
    strides) of one storage, on any device, the meta device included; a tensor with
    no elements ties nothing. Two tensors that overlap in memory without being the
    same view raise `InvalidInputError` naming both (they are neither one tied
    weight nor two separate ones); `what` names the model in that message.
    """
    duplicates: dict[str, str] = {}
    # id(storage) -> (the storage, kept alive so its id is not reused; its views by name).
    storages: dict[int, tuple[torch.UntypedStorage, dict[str, tuple[_View, int]]]] = {}
    for name, tensor in named_tensors:
        if tensor.numel() == 0:  # holds no memory, so it can alias nothing
            continue
        storage = tensor.untyped_storage()
        _, views = storages.setdefault(id(storage), (storage, {}))
        start = int(tensor.storage_offset()) * tensor.element_size()
        view = (start, tensor.dtype, tuple(tensor.shape), tuple(tensor.stride()))
        end = start + _span_bytes(tensor)
        for other, (other_view, other_end) in views.items():
            if other_view == view:
                duplicates[name] = other
                break
            if start < other_end and other_view[0] < end:
                raise InvalidInputError(
                    f"{what}: tensors {other!r} and {name!r} share memory but are different "
                    "views of it, so they can be exported neither as one tied weight nor as "
                    "two; make them separate parameters (e.g. `.clone()`) or tie them fully"
                )
        else:
            views[name] = (view, end)
    return duplicates


def _span_bytes(t: torch.Tensor) -> int:
    """Bytes from the tensor's first element to just past its last (strides may leave gaps)."""
    last = sum((size - 1) * stride for size, stride in zip(t.shape, t.stride(), strict=True))
    return (last + 1) * t.element_size()
