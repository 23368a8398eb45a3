"""A vLLM worker extension: the few calls weightsync makes inside vLLM's worker.

vLLM mixes this class into its worker (`worker_extension_cls`) and reaches the
methods through `collective_rpc`. It only uses the worker's own in-place reload
path (`reload_weights`), which re-runs vLLM's per-layer post-processing (on CPU:
re-packing linear weights for oneDNN/sgl kernels), so what serves afterwards is
exactly what a fresh start from the same checkpoint would serve.

This module must import without vLLM (it is type-checked and linted with the
rest of weightsync), so vLLM is only imported inside the methods.
"""

from __future__ import annotations

import contextlib
import json
import logging
import mmap
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load as load_safetensors

from weightsync.codec.bits import SUPPORTED_DTYPES
from weightsync.snapshot.safetensors_file import TensorView, tensor_views

logger = logging.getLogger(__name__)

#: What `weightsync_reload` accepts: (name, tensor) pairs when the worker runs in
#: the engine's process, or safetensors bytes when the call crosses a process.
WeightsPayload = bytes | list[tuple[str, torch.Tensor]]


class WeightsyncWorkerExtension:
    """Mixed into vLLM's worker class; every method name starts with `weightsync_`."""

    # Attributes of vLLM's worker this extension relies on (declared for mypy).
    model_runner: Any
    weightsync_last_reload: dict[str, float]

    def weightsync_reload(self, payload: WeightsPayload) -> int:
        """Reload these checkpoint-format tensors in place; return how many were given.

        Every tensor of each vLLM layer touched must be given (e.g. q, k and v for
        the fused qkv projection): vLLM re-processes a layer only once all of its
        checkpoint tensors have arrived, and keeps untouched layers as they are.
        """
        from vllm.config import set_current_vllm_config

        weights = _as_pairs(payload)
        model = self.model_runner.get_model()
        # The CPU kernels' dispatch reads the current vLLM config.
        started = time.perf_counter()
        with set_current_vllm_config(self.model_runner.vllm_config):
            self.model_runner.reload_weights(
                weights_iterator=iter(weights), is_checkpoint_format=True
            )
            reloaded = time.perf_counter()
            _reprocess_tied_modules(model, {name for name, _ in weights})
        #: Seconds of the last reload's parts, for the caller's swap phases.
        self.weightsync_last_reload = {
            "reload_weights_s": reloaded - started,
            "tied_modules_s": time.perf_counter() - reloaded,
        }
        return len(weights)

    def weightsync_reload_file(self, path: str) -> dict[str, float]:
        """`weightsync_reload` of the tensors in this safetensors file (the server path);
        returns the seconds of its parts (`reload_weights_s`: vLLM's reload; `tied_modules_s`:
        re-processing the modules that share a reloaded weight) and `tensors`, the count.

        vLLM's `/collective_rpc` route passes strings only, so the sidecar writes the
        tensors to a file beside the server and names it. The tensors handed to vLLM are
        views of the file's pages, mapped copy-on-write: nothing is allocated or copied
        for them (reading the whole file into fresh tensors first cost 512 MB of newly
        faulted, zeroed memory inside vLLM's pause and made the reload ~3x slower than
        vLLM's own; docs/vllm.md). vLLM's weight loaders copy them into its parameters;
        a parameter or buffer left pointing into the file is given its own copy before
        the file is let go.
        """
        with _mapped_safetensors(path) as (weights, region):
            count = self.weightsync_reload(weights)
            weights.clear()
            _own_storage(self.model_runner.get_model(), region)
        return {"tensors": float(count), **self.weightsync_last_reload}

    def weightsync_checksums(self, names: str | list[str], checksum_format: str) -> dict[str, str]:
        """Checksums (as a manifest records them) of the named parameters vLLM holds.

        `names` may be a JSON list (vLLM's `/collective_rpc` route passes strings).

        Only parameters vLLM keeps in checkpoint layout are answered (see
        `weightsync_read_back`); the caller compares them with what it pushed.
        """
        from weightsync.codec import checksum_tensor

        wanted = json.loads(names) if isinstance(names, str) else names
        params = dict(self.model_runner.get_model().named_parameters())
        out = {}
        for name in wanted:
            param = params.get(name)
            if param is None or param.numel() == 0:
                continue
            # Checksummed where it lives on CPU (no copy); a GPU tensor comes to the host.
            held = param.detach() if param.device.type == "cpu" else param.detach().cpu()
            out[name] = checksum_tensor(checksum_format, held)
        return out

    def weightsync_model_info(self) -> dict[str, Any]:
        """The loaded model's class, fused-module mapping and parameter names/shapes."""
        model = self.model_runner.get_model()
        return {
            "model_class": type(model).__name__,
            "packed_modules_mapping": dict(getattr(model, "packed_modules_mapping", {}) or {}),
            "parameters": {
                name: (tuple(p.shape), str(p.dtype)) for name, p in model.named_parameters()
            },
        }

    def weightsync_read_back(self, names: Iterable[str]) -> dict[str, torch.Tensor]:
        """Copies of the vLLM parameters named exactly like these checkpoint tensors.

        Only parameters that vLLM keeps in checkpoint layout can be compared bit
        for bit; the caller skips names missing here or whose shape differs
        (fused or re-packed weights).
        """
        params = dict(self.model_runner.get_model().named_parameters())
        return {
            name: params[name].detach().to("cpu", copy=True)
            for name in names
            if name in params and params[name].numel() > 0
        }


def _reprocess_tied_modules(model: torch.nn.Module, loaded_names: set[str]) -> None:
    """Re-run post-processing of modules that share a reloaded module's weight.

    With tied embeddings, `lm_head` shares `embed_tokens.weight` but is never
    loaded itself, so vLLM's reload skips its post-processing; on CPU that step
    packs the weight into the GEMM kernel's own copy, which would keep serving
    the old embedding. Re-running it re-packs from the (updated) shared weight.
    """
    modules = dict(model.named_modules())
    loaded_ptrs = set()
    for name in loaded_names:
        module_name, _, param_name = name.rpartition(".")
        module = modules.get(module_name)
        param = getattr(module, param_name, None) if module is not None else None
        if isinstance(param, torch.Tensor) and param.numel() > 0:
            loaded_ptrs.add(param.data_ptr())
    if not loaded_ptrs:
        return
    loaded_modules = {name.rpartition(".")[0] for name in loaded_names}
    for module_name, module in modules.items():
        weight = getattr(module, "weight", None)
        quant_method = getattr(module, "quant_method", None)
        if (
            module_name not in loaded_modules
            and isinstance(weight, torch.Tensor)
            and weight.numel() > 0
            and weight.data_ptr() in loaded_ptrs
            and quant_method is not None
        ):
            logger.debug("re-processing %s (shares a reloaded weight)", module_name)
            quant_method.process_weights_after_loading(module)


@contextlib.contextmanager
def _mapped_safetensors(
    path: str,
) -> Iterator[tuple[list[tuple[str, torch.Tensor]], tuple[int, int]]]:
    """The tensors of a safetensors file as views of its pages (mapped copy-on-write, so
    a write to one would not reach the file), and the mapping's address range."""
    with Path(path).open("rb") as f:
        mapped = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)
    try:
        pages = np.frombuffer(mapped, dtype=np.uint8)
        region = (int(pages.ctypes.data), int(pages.ctypes.data) + pages.size)
        del pages
        weights = [(name, _tensor_view(view)) for name, view in tensor_views(mapped, path).items()]
        yield weights, region
    finally:
        weights = []  # this frame's views go before the unmap (the caller cleared its own)
        try:
            mapped.close()
        except BufferError:  # something vLLM keeps still views the pages: unmapped when freed
            logger.debug("%s: still viewed after the reload; unmapped when released", path)


def _tensor_view(view: TensorView) -> torch.Tensor:
    dtype = SUPPORTED_DTYPES[view.dtype]
    if not view.data.nbytes:
        return torch.empty(view.shape, dtype=dtype)
    return torch.frombuffer(view.data, dtype=dtype).view(view.shape)


def _own_storage(model: torch.nn.Module, region: tuple[int, int]) -> int:
    """Give every parameter and buffer of `model` whose storage lies in `region` (the
    mapped push file) a copy of its own; return how many needed one."""
    low, high = region

    def viewing(tensor: torch.Tensor) -> bool:
        return low <= tensor.untyped_storage().data_ptr() < high

    moved = 0
    for module_name, module in model.named_modules():
        for name, param in module.named_parameters(recurse=False):
            if viewing(param):
                logger.warning("vLLM kept %s.%s viewing the push file", module_name, name)
                param.data = param.data.clone()
                moved += 1
        for name, buffer in module.named_buffers(recurse=False):
            if viewing(buffer):
                logger.warning("vLLM kept %s.%s viewing the push file", module_name, name)
                setattr(module, name, buffer.clone())
                moved += 1
    return moved


def _as_pairs(payload: WeightsPayload) -> list[tuple[str, torch.Tensor]]:
    if isinstance(payload, bytes | bytearray | memoryview):
        return list(load_safetensors(bytes(payload)).items())
    return list(payload)
