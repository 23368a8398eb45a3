"""The engine interface: what a replica needs from whatever runs the model.

Kept deliberately small so a second engine (vLLM) plugs in behind the same
hot-load API: load a base, expose the live weights, apply patches in place,
load/unload LoRA adapters, generate, reset the prompt cache, checksum weights.
Engines never fetch, verify manifests or talk HTTP: the replica does that.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Literal

import torch

from weightsync.codec import Patch, checksum_tensor
from weightsync.codec.bits import dtype_name
from weightsync.errors import InvalidInputError, UnsupportedOperationError

CacheScope = Literal["all", "shared"]


@dataclass(frozen=True, kw_only=True)
class GenerateRequest:
    """One sequence to generate (the replica fans `n > 1` out into several requests)."""

    prompt_token_ids: list[int]
    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    #: Sample from the k most likely tokens only (0: no limit).
    top_k: int = 0
    seed: int | None = None
    #: None: no logprobs; 0: the sampled token's logprob; k > 0: also the top-k.
    logprobs: int | None = None
    #: Also the logprob of every prompt token after the first (same top-k as `logprobs`);
    #: only engines with `supports_prompt_logprobs`.
    prompt_logprobs: bool = False
    stop_token_ids: tuple[int, ...] = ()
    adapter: str | None = None
    #: Multi-turn session key (the `x-multi-turn-session-id` header) for cache scoping.
    cache_session: str | None = None


@dataclass(kw_only=True)
class GenerateResult:
    token_ids: list[int]
    logprobs: list[float] | None = None
    top_logprobs: list[dict[int, float]] | None = None
    #: Logprob of each token under the distribution it was sampled from (after
    #: temperature, top-k, top-p; 0.0 when greedy); None when the engine cannot tell.
    sampling_logprobs: list[float] | None = None
    #: With `prompt_logprobs`: one entry per prompt token after the first.
    prompt_logprobs: list[float] | None = None
    prompt_top_logprobs: list[dict[int, float]] | None = None
    finish_reason: Literal["stop", "length"] = "length"
    #: Identity of the snapshot that produced each generated token (same length as token_ids).
    token_snapshots: list[str] = field(default_factory=list)
    num_cached_prompt_tokens: int = 0


def check_generate_request(
    request: GenerateRequest, *, vocab_size: int, max_positions: int | None
) -> None:
    """Reject a request no engine can serve (empty or out-of-vocabulary prompt, bad knobs).

    Adapter names are engine-specific and checked by each engine.
    """
    prompt = request.prompt_token_ids
    if not prompt:
        raise InvalidInputError("the prompt is empty; send at least one token")
    bad = [t for t in prompt if not 0 <= t < vocab_size]
    if bad:
        raise InvalidInputError(
            f"prompt token ids {bad[:5]} are outside the vocabulary [0, {vocab_size})"
        )
    if max_positions is not None and len(prompt) >= max_positions:
        raise InvalidInputError(
            f"the prompt has {len(prompt)} tokens; this model takes fewer than "
            f"{max_positions} (prompt and output together)"
        )
    if request.max_tokens < 0:
        raise InvalidInputError(f"max_tokens must be >= 0, got {request.max_tokens}")
    if not request.temperature >= 0.0:
        raise InvalidInputError(f"temperature must be >= 0, got {request.temperature}")
    if not 0.0 < request.top_p <= 1.0:
        raise InvalidInputError(f"top_p must be in (0, 1], got {request.top_p}")
    if request.top_k < 0:
        raise InvalidInputError(f"top_k must be >= 0 (0: no limit), got {request.top_k}")
    if request.logprobs is not None and request.logprobs < 0:
        raise InvalidInputError(f"logprobs must be >= 0 or None, got {request.logprobs}")


#: Config keys that describe the file, not the model: they change nothing an engine builds or
#: computes (the dtype is each tensor's own, compared tensor by tensor). `architectures` is not
#: one of them: it names the model class.
CONFIG_KEYS_IGNORED = frozenset(
    {"transformers_version", "_name_or_path", "torch_dtype", "dtype", "use_cache"}
)

#: A tensor as the same-model rule sees it: its shape and dtype name (`codec.bits.dtype_name`).
TensorSpec = tuple[tuple[int, ...], str]


def tensor_specs(tensors: Mapping[str, torch.Tensor]) -> dict[str, TensorSpec]:
    """Each tensor's shape and dtype name (what `model_mismatches` compares)."""
    return {name: (tuple(t.shape), dtype_name(t.dtype)) for name, t in tensors.items()}


def model_mismatches(
    served_config: Mapping[str, Any],
    served: Mapping[str, TensorSpec],
    config: Mapping[str, Any],
    incoming: Mapping[str, TensorSpec],
) -> list[str]:
    """How a snapshot's model (`config`, `incoming`) differs from the served one; [] if none.

    The one same-model rule: the same config but for `CONFIG_KEYS_IGNORED` (`config_mismatches`),
    the same tensor names, shapes and dtypes. Each difference reads `... served X != snapshot Y`.
    The replica's admission refuses a hot-load by it; every engine picks in-place or rebuild by
    it (`same_model`).
    """
    problems = config_mismatches(served_config, config)
    missing = sorted(set(served) - set(incoming))
    extra = sorted(set(incoming) - set(served))
    if missing:
        problems.append(f"tensors missing from the snapshot: {', '.join(missing[:5])}")
    if extra:
        problems.append(f"tensors the served model lacks: {', '.join(extra[:5])}")
    for name, (shape, dtype) in incoming.items():
        if name in served and served[name] != (tuple(shape), dtype):
            served_shape, served_dtype = served[name]
            problems.append(
                f"{name}: served {served_shape} {served_dtype} != snapshot {tuple(shape)} {dtype}"
            )
    return problems


def same_model(
    served_config: Mapping[str, Any],
    served: Mapping[str, torch.Tensor],
    config: Mapping[str, Any],
    tensors: Mapping[str, torch.Tensor],
) -> bool:
    """Whether a base (`config`, `tensors`) is the model an engine holds (`served_config`,
    `served`), so it can be copied in place: no `model_mismatches`.
    """
    return not model_mismatches(served_config, tensor_specs(served), config, tensor_specs(tensors))


def config_mismatches(served: Mapping[str, Any], incoming: Mapping[str, Any]) -> list[str]:
    """Keys on which two HF configs differ, as `key: served X != snapshot Y`.

    Both are first normalized the way the model is built from them (the
    `transformers` config class of their `model_type` fills defaults and folds
    legacy keys, e.g. a top-level `rope_theta` into `rope_parameters`). Every key
    counts (`architectures`, `rms_norm_eps`, `rope_parameters`, `eos_token_id`, ...)
    except `CONFIG_KEYS_IGNORED`: a model with the same shapes but another config
    computes other outputs. A config that names no `architectures` (a model built
    from a config and never saved) stands for the class `AutoModelForCausalLM` builds
    for its `model_type`, as the engines build it.
    """
    mine, theirs = _normalized(served), _normalized(incoming)
    if mine is None or theirs is None:  # no config class: compare what both set
        mine, theirs = dict(served), dict(incoming)
        keys = set(mine) & set(theirs)
    else:
        keys = set(mine) | set(theirs)
    out = []
    for key in sorted(keys - CONFIG_KEYS_IGNORED):
        if mine.get(key) != theirs.get(key):
            out.append(f"{key}: served {mine.get(key)!r} != snapshot {theirs.get(key)!r}")
    return out


def _normalized(config: Mapping[str, Any]) -> dict[str, Any] | None:
    from transformers import AutoConfig

    doc = dict(config)
    model_type = doc.pop("model_type", None)
    if not isinstance(model_type, str):
        return None
    try:
        normalized = dict(AutoConfig.for_model(model_type, **doc).to_dict())
    except (ValueError, TypeError, KeyError):
        return None
    if not normalized.get("architectures"):
        from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

        built = MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.get(model_type)
        normalized["architectures"] = [built] if built else None
    return normalized


def eos_token_ids(value: Any) -> frozenset[int]:
    """The EOS token ids an HF config's `eos_token_id` names (an id, a list of ids, or None)."""
    if value is None:
        return frozenset()
    if isinstance(value, list | tuple):
        return frozenset(int(i) for i in value)
    return frozenset({int(value)})


def model_dtype(tensors: Mapping[str, torch.Tensor]) -> torch.dtype:
    """The floating dtype most of a base's elements are stored in (what the model computes in).

    Raises `InvalidInputError` for a base without floating-point tensors (no model weights).
    """
    sizes: dict[torch.dtype, int] = {}
    for t in tensors.values():
        if t.is_floating_point():
            sizes[t.dtype] = sizes.get(t.dtype, 0) + t.numel()
    if not sizes:
        raise InvalidInputError(
            "the base has no floating-point tensors, so it holds no model weights; "
            "save the model's own weights (e.g. save_pretrained's safetensors)"
        )
    return max(sizes, key=lambda d: sizes[d])


#: Held around each decoding step; yields the snapshot identity serving that step.
#: The replica uses it to pause generation at a token boundary during a swap.
StepGuard = Callable[[], AbstractContextManager[str]]

#: Called after each generated token with the result so far; returning False ends the
#: sequence there with `finish_reason` "stop" (a stop string matched). It must not
#: block for long: a forward step of every other request may wait on it.
TokenCallback = Callable[[GenerateResult], bool]


class Engine(ABC):
    """A model runtime held by one replica.

    What every engine shares lives here, once: the request checks
    (`check_generate_request`), the same-model rule that picks in-place or rebuild
    for a base (`same_model`), the dtype a model computes in (`model_dtype`), the EOS
    ids of a config (`eos_token_ids`) and the weights' checksums (`weights_checksums`).
    """

    name: ClassVar[str]
    #: Whether `generate` honours `GenerateRequest.prompt_logprobs` (echo with logprobs).
    supports_prompt_logprobs: ClassVar[bool] = False

    @abstractmethod
    def load_base(
        self,
        config: Mapping[str, Any],
        tensors: Mapping[str, torch.Tensor],
        *,
        tokenizer_dir: Path | None = None,
    ) -> None:
        """Replace the whole model with these weights (HF config + HF tensor names)."""

    @abstractmethod
    def named_weights(self) -> Mapping[str, torch.Tensor]:
        """The live weights (or the engine's host copy of them) under snapshot tensor names.

        Callers only read them (decode, checksum); all writes go through `apply_patches`.
        """

    @abstractmethod
    def apply_patches(
        self, patches: Mapping[str, Patch], *, keep_undo: bool = True
    ) -> dict[str, Patch]:
        """Apply patches in place to the named weights; return the patches that undo them.

        `keep_undo=False` holds no undo of the patched elements (one copy of the changed
        data less) and returns `{}`; a failure part way then leaves the weights partly
        patched, and the caller puts back verified weights (`load_base`).
        """

    def stage_patches(self, patches: Mapping[str, Patch]) -> None:  # noqa: B027  (optional)
        """Prepare, before the swap lock, what `apply_patches(patches)` will need.

        The load pipeline calls it once per load with the verified patches, then
        `apply_patches` with the same mapping inside the swap; the live weights do not
        change in between (loads are serialized). Serving goes on meanwhile, so an
        engine does here what depends only on the patches and the live weights (the
        `vllm` engine writes its push file). The default does nothing.
        """

    def settle(self) -> None:  # noqa: B027  (optional)
        """Called once each load has ended (either way), outside the swap lock: the
        engine may start background work that the load left for later (the torch
        engine's buffered swap brings its spare copy up to date here). The default
        does nothing.
        """

    @abstractmethod
    def generate(
        self,
        request: GenerateRequest,
        *,
        step_guard: StepGuard,
        on_token: TokenCallback | None = None,
    ) -> GenerateResult:
        """Generate one sequence, holding `step_guard()` around every forward step.

        An exception raised by `step_guard()` (a cancelled request) ends the
        sequence and propagates; `on_token` sees every token as it is produced.
        """

    @abstractmethod
    def reset_prompt_cache(self, scope: CacheScope = "all") -> int:
        """Drop cached prompt KV ("all", or only entries not tied to a multi-turn session).

        Returns the number of entries dropped.
        """

    def load_adapter(
        self, name: str, adapter_config: Mapping[str, Any], tensors: Mapping[str, torch.Tensor]
    ) -> None:
        """Load a standalone PEFT LoRA adapter under `name` (replacing one of that name)."""
        raise UnsupportedOperationError(
            f"engine {self.name!r} does not support LoRA adapters; use the torch engine"
        )

    def unload_adapter(self, name: str) -> None:
        raise UnsupportedOperationError(
            f"engine {self.name!r} does not support LoRA adapters; use the torch engine"
        )

    def loaded_adapters(self) -> list[str]:
        """Names of the loaded adapters, least recently used first."""
        return []

    def weights_checksums(self, checksum_format: str) -> dict[str, str]:
        """Checksum of every named weight, as the manifest records them."""
        return {n: checksum_tensor(checksum_format, t) for n, t in self.named_weights().items()}

    @property
    def inference_url(self) -> str | None:
        """Base URL of an OpenAI server of the engine's own, beside the replica's (or None)."""
        return None

    def swap(self, identity: str) -> AbstractContextManager[None]:
        """Held around a swap's apply (or base load) and cache reset, inside the swap lock.

        An engine whose generation runs outside the replica (vLLM's own server)
        pauses it here and, on leaving, names `identity` as served when an apply
        inside succeeded, then resumes. The default does nothing.
        """
        return nullcontext()

    def close(self) -> None:  # noqa: B027  (optional hook)
        """Release resources (threads, subprocesses)."""
