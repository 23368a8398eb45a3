"""Where the torch engine serves: the device option, patches applied on the device, checksums.

On the CPU the live parameters are the only copy and patches are applied to them
with the numpy kernels (`Patch.apply_`). On an accelerator the engine keeps a
host image of the weights beside the device parameters, because decoding a
delta reads the old bits on the host (`Codec.decode_patch`); a patch is applied
to the host image first (which checks its positions, all or nothing), then its
positions and values are copied to the device and written into the parameters'
own storage with torch ops (same `data_ptr()`, so CUDA graphs stay valid). The
pause is measured after `torch.cuda.synchronize()`, so it includes the device's
work. Checksums of live weights are computed from the device tensors, copied to
the host in bounded chunks (the checksums are host functions).
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import torch

from weightsync.codec import Patch
from weightsync.codec.checksums import checksum_hasher
from weightsync.errors import InvalidInputError
from weightsync.server.config import ENGINE_DEVICES

#: Bytes of a device tensor copied to the host at a time for a checksum.
CHECKSUM_CHUNK_BYTES = 64 << 20
#: Bytes of a read-only patch copied to the device at a time.
WRITE_CHUNK_BYTES = 64 << 20

_INT_VIEW: dict[int, torch.dtype] = {1: torch.uint8, 2: torch.int16, 4: torch.int32}
_NP_SIGNED: dict[int, type[np.signedinteger] | type[np.unsignedinteger]] = {
    1: np.uint8,
    2: np.int16,
    4: np.int32,
}


def resolve_engine_device(device: str) -> torch.device:
    """The torch device for `--device` ("auto": CUDA when available, else the CPU)."""
    if device not in ENGINE_DEVICES:
        raise InvalidInputError(
            f"engine device must be one of {', '.join(ENGINE_DEVICES)}, got {device!r}"
        )
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise InvalidInputError(
            "--device cuda was asked for but torch sees no CUDA device "
            f"(torch {torch.__version__}, built with CUDA {torch.version.cuda}); "
            "use --device cpu or auto, or install a CUDA build of torch"
        )
    return torch.device(device)


def write_on_device(
    patch: Patch, target: torch.Tensor, *, chunk_bytes: int = WRITE_CHUNK_BYTES
) -> None:
    """Write `patch`'s new bits into `target` (contiguous, any device) in place, with torch ops.

    The storage is never replaced: only its changed elements are written. Positions
    must already be known to be inside `target` (the host image's apply checks them).
    Read-only values (a view of fetched bytes) are copied `chunk_bytes` at a time.
    """
    if not target.is_contiguous():
        raise InvalidInputError("a patched weight must be contiguous")
    size = target.element_size()
    flat = target.view(-1).view(_INT_VIEW[size])
    array = np.ascontiguousarray(patch.values).view(_NP_SIGNED[size])
    if not array.flags.writeable and patch.positions is None:
        # A read-only view (a base's new bits, straight from its fetched bytes): torch
        # wraps only writable arrays, so it goes through in bounded copies.
        step = max(1, chunk_bytes // size)
        for start in range(0, array.size, step):
            part = torch.from_numpy(array[start : start + step].copy())
            flat[start : start + step].copy_(part.to(target.device, non_blocking=False))
        return
    values = torch.from_numpy(array if array.flags.writeable else array.copy())
    if patch.positions is None:
        flat.copy_(values.to(target.device, non_blocking=False))
        return
    positions = torch.from_numpy(np.ascontiguousarray(patch.positions))
    flat.index_copy_(0, positions.to(target.device), values.to(target.device))


def synchronize(device: torch.device) -> None:
    """Wait for the device's queued work (a no-op on the CPU), so a timer covers it."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def device_checksum(
    checksum_format: str, tensor: torch.Tensor, *, chunk_bytes: int = CHECKSUM_CHUNK_BYTES
) -> str:
    """Checksum of a tensor's bits on any device, copied to the host `chunk_bytes` at a time;
    equal to `checksum_tensor` of the same bits."""
    hasher = checksum_hasher(checksum_format)
    size = tensor.element_size()
    flat = tensor.detach().contiguous().view(-1).view(_INT_VIEW[size])
    step = max(1, chunk_bytes // size)
    for start in range(0, flat.numel(), step):
        piece = flat[start : start + step].to("cpu")
        hasher.update(piece.numpy().view(np.uint8).data)
    return hasher.hexdigest()


def host_image(weights: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A host copy of device weights (pinned when on CUDA), the old bits decodes read."""
    out: dict[str, torch.Tensor] = {}
    for name, tensor in weights.items():
        pin = tensor.device.type == "cuda"
        copy = torch.empty(tensor.shape, dtype=tensor.dtype, device="cpu", pin_memory=pin)
        copy.copy_(tensor)
        out[name] = copy
    return out
