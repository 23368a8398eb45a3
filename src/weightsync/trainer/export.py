"""What a snapshot holds: the live tensors, tied duplicates removed, cast to the export dtype.

Names are the model's `state_dict()` names; when several names share one tensor
(tied embeddings) the first is kept, as `save_pretrained` does, so with tied
embeddings `lm_head.weight` is dropped. The cast goes into reusable CPU buffers
(pinned when the model is on CUDA): a training loop saving every step allocates
nothing after the first save, whose successor's buffers are made in the background
(`ExportBuffers.reserve`).
"""

from __future__ import annotations

import logging
import mmap
import threading
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import torch

from weightsync.background import lowest_priority
from weightsync.codec.bits import DTYPE_NAMES, SUPPORTED_DTYPES
from weightsync.errors import InvalidInputError, UnsupportedDtypeError
from weightsync.snapshot.tied_weights import tied_duplicates

logger = logging.getLogger(__name__)

# Spellings accepted for `export_dtype`, beyond a `torch.dtype` itself.
_DTYPE_ALIASES: dict[str, torch.dtype] = {
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
    "half": torch.float16,
    "float32": torch.float32,
    "fp32": torch.float32,
    "float": torch.float32,
    "float8_e4m3fn": torch.float8_e4m3fn,
    "fp8_e4m3": torch.float8_e4m3fn,
    "float8_e5m2": torch.float8_e5m2,
    "fp8_e5m2": torch.float8_e5m2,
    **SUPPORTED_DTYPES,
}

# The name transformers writes into `config.json` for each export dtype.
_CONFIG_DTYPE_NAMES: dict[torch.dtype, str] = {
    torch.bfloat16: "bfloat16",
    torch.float16: "float16",
    torch.float32: "float32",
    torch.float8_e4m3fn: "float8_e4m3fn",
    torch.float8_e5m2: "float8_e5m2",
}

# Marks the config written for a model that is not a transformers model.
PLAIN_MODULE_KEY = "weightsync_plain_module"


def resolve_export_dtype(export_dtype: str | torch.dtype) -> torch.dtype:
    """Return the torch dtype for `export_dtype`, or raise naming the exportable ones."""
    if isinstance(export_dtype, torch.dtype):
        if export_dtype in DTYPE_NAMES:
            return export_dtype
    elif isinstance(export_dtype, str):
        key = export_dtype.removeprefix("torch.")
        if key in _DTYPE_ALIASES:
            return _DTYPE_ALIASES[key]
        if key.lower() in _DTYPE_ALIASES:
            return _DTYPE_ALIASES[key.lower()]
    raise UnsupportedDtypeError(
        f"export_dtype {export_dtype!r} cannot be exported; snapshots hold one of "
        f"{', '.join(_CONFIG_DTYPE_NAMES.values())} (the serving copy is usually 'bfloat16')"
    )


def config_dtype_name(dtype: torch.dtype) -> str:
    return _CONFIG_DTYPE_NAMES[dtype]


@dataclass(frozen=True)
class ExportPlan:
    """The tensors a snapshot would hold, by exported name, as live (uncast) sources."""

    sources: dict[str, torch.Tensor]
    dropped_ties: dict[str, str]  # dropped name -> the kept name it aliases

    @property
    def names(self) -> list[str]:
        return list(self.sources)


def plan_export(named_tensors: Iterable[tuple[str, torch.Tensor]], *, what: str) -> ExportPlan:
    """Remove tied duplicates (`tied_duplicates`: the first name is kept) and refuse what
    cannot be exported.

    `what` names the model in messages. Raises `UnsupportedDtypeError` for a tensor
    that is not floating point (e.g. an integer buffer) and `InvalidInputError` for a
    tensor without data (meta device), a sparse tensor, or two tensors that partly
    overlap in memory (they cannot be stored as separate weights nor as one).
    """
    named = list(named_tensors)
    for name, tensor in named:
        _check_exportable(name, tensor, what=what)
    dropped = tied_duplicates(named, what=what)
    sources = {name: tensor for name, tensor in named if name not in dropped}
    if not sources:
        raise InvalidInputError(f"{what} has no tensors in its state dict; nothing to export")
    if dropped:
        logger.debug("%s: tied tensors not exported separately: %s", what, dropped)
    return ExportPlan(sources=sources, dropped_ties=dropped)


def _check_exportable(name: str, tensor: torch.Tensor, *, what: str) -> None:
    if not isinstance(tensor, torch.Tensor):
        raise InvalidInputError(
            f"{what}: state dict entry {name!r} is a {type(tensor).__name__}, not a tensor"
        )
    if tensor.is_meta:
        raise InvalidInputError(
            f"{what}: tensor {name!r} is on the meta device (no data); materialize the "
            "model's weights (e.g. `to_empty` + load) before saving"
        )
    if tensor.layout != torch.strided:
        raise InvalidInputError(
            f"{what}: tensor {name!r} has layout {tensor.layout}; only dense tensors can be "
            "exported (call `.to_dense()` on it)"
        )
    if not tensor.dtype.is_floating_point:
        raise UnsupportedDtypeError(
            f"{what}: tensor {name!r} has dtype {tensor.dtype}, which cannot be exported as "
            "sampler weights; register it as a non-persistent buffer "
            "(`register_buffer(..., persistent=False)`) or drop it from the state dict"
        )


class ExportBuffers:
    """Reusable CPU buffers in the export dtype, filled from live tensors.

    Filling makes non-contiguous sources contiguous and moves device tensors to the
    CPU in the same copy; the returned dict's tensors are the buffers themselves.
    """

    def __init__(self, dtype: torch.dtype) -> None:
        self.dtype = dtype
        self._buffers: dict[str, torch.Tensor] = {}
        self._reserving: threading.Thread | None = None

    def reserve(self, like: Mapping[str, torch.Tensor]) -> None:
        """Make buffers shaped like `like` in the background and fault their pages in,
        replacing any held: the next save fills memory that is already mapped.

        A save that finds no buffer allocates one, and its copy then faults in every
        page of fresh memory on the save's own time: 0.2-1 s per GB on the machines
        measured (docs/benchmarks.md, "A ninth run"). The client reserves after a
        base that had no parent, the one save whose successor has no old buffers to
        reuse, so it holds two images from then on as it does from the second save
        on anyway. The work runs on one thread at the lowest CPU priority (the next
        use of these buffers waits for it); if it fails, the next save allocates.
        """
        self._settle()
        self._buffers = {}
        shapes = {name: (t.shape, t.is_pinned()) for name, t in like.items()}
        self._reserving = threading.Thread(
            target=self._reserve_now, args=(shapes,), name="export-reserve", daemon=True
        )
        self._reserving.start()

    def _reserve_now(self, shapes: Mapping[str, tuple[torch.Size, bool]]) -> None:
        lowest_priority("reserving the export buffers")
        page = mmap.PAGESIZE
        reserved: dict[str, torch.Tensor] = {}
        try:
            for name, (shape, pinned) in shapes.items():
                buf = torch.empty(shape, dtype=self.dtype, device="cpu", pin_memory=pinned)
                if not pinned and buf.numel():  # pinned memory is mapped when allocated
                    # One byte per page, through numpy: one thread, the GIL released.
                    buf.view(-1).view(torch.uint8).numpy()[::page] = 0
                reserved[name] = buf
        except Exception:  # never fatal: the next save allocates what is missing
            logger.exception("reserving the export buffers failed; the next save allocates")
        self._buffers = reserved

    def _settle(self) -> None:
        """Wait for a reservation in progress: its buffers are the ones to use."""
        if self._reserving is not None:
            self._reserving.join()
            self._reserving = None

    def fill(self, sources: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        self._settle()
        out: dict[str, torch.Tensor] = {}
        with torch.no_grad():
            for name, src in sources.items():
                buf = self._buffers.get(name)
                if buf is None or buf.shape != src.shape:
                    # Pinned when the source is on an accelerator: its copies run at full speed.
                    buf = torch.empty(
                        src.shape, dtype=self.dtype, device="cpu", pin_memory=_pin_for(src)
                    )
                    self._buffers[name] = buf
                buf.copy_(src.detach())
                out[name] = buf
        if len(self._buffers) != len(out):
            # The model's tensor set changed; forget buffers for names no longer exported.
            self._buffers = {name: self._buffers[name] for name in out}
        return out

    def buffer(self, name: str, like: torch.Tensor, *, pin: bool) -> tuple[torch.Tensor, bool]:
        """The buffer for `name` shaped like `like`, and whether it was just allocated."""
        self._settle()
        buf = self._buffers.get(name)
        if buf is not None and buf.shape == like.shape and buf.dtype == like.dtype:
            return buf, False
        buf = torch.empty(like.shape, dtype=like.dtype, device="cpu", pin_memory=pin)
        self._buffers[name] = buf
        return buf, True

    def retain(self, names: Iterable[str]) -> None:
        """Forget the buffers of names not in `names` (the model's tensor set changed)."""
        self._settle()
        keep = set(names)
        self._buffers = {n: b for n, b in self._buffers.items() if n in keep}

    def adopt(self, tensors: Mapping[str, torch.Tensor]) -> None:
        """Take `tensors` (a previous export no longer needed) as the buffers to fill next."""
        self._settle()
        self._buffers = dict(tensors)

    def release(self) -> None:
        self._settle()
        self._buffers = {}


def _pin_for(src: torch.Tensor) -> bool:
    return src.device.type == "cuda" and torch.cuda.is_available()


def export_copy(sources: Mapping[str, torch.Tensor], dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """A fresh CPU copy of `sources` in `dtype` (nothing shared with the live model)."""
    with torch.no_grad():
        return {
            name: src.detach().to(device="cpu", dtype=dtype, copy=True).contiguous()
            for name, src in sources.items()
        }


def num_bytes(tensors: Mapping[str, torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in tensors.values())


def _model_class(model: Any) -> type:
    """The model's own class: FSDP2's `fully_shard` swaps in a subclass made by torch
    (`FSDPQwen3ForCausalLM`), which names no model a replica could build."""
    return next(
        (c for c in type(model).__mro__ if not c.__module__.startswith("torch.")), type(model)
    )


def hf_config(model: Any, export_dtype: torch.dtype) -> dict[str, Any]:
    """`config.json` for a snapshot of `model`.

    A transformers model gets its own config with `dtype` set to the export dtype
    and `architectures` filled in (as `save_pretrained` does, with the class the
    model was built as, under any torch wrapper subclass); any other module gets
    a minimal config saying it is not a transformers model.
    """
    config = getattr(model, "config", None)
    to_dict = getattr(config, "to_dict", None)
    if config is not None and callable(to_dict) and getattr(config, "model_type", None):
        data = dict(to_dict())
        data["dtype"] = config_dtype_name(export_dtype)
        data.pop("torch_dtype", None)
        if not data.get("architectures"):
            data["architectures"] = [_model_class(model).__name__]
        return data
    return {
        PLAIN_MODULE_KEY: True,
        "module_class": f"{type(model).__module__}.{type(model).__qualname__}",
        "dtype": config_dtype_name(export_dtype),
        "note": (
            "weights of a plain torch.nn.Module, not a transformers model; load them with "
            "the module's own code (names are its state_dict names)"
        ),
    }


def is_plain_module_config(config: Mapping[str, Any]) -> bool:
    return bool(config.get(PLAIN_MODULE_KEY)) or not config.get("model_type")
