"""The embedded engine: a `transformers` causal LM in this process, in PyTorch.

Weights live in the model's own parameter tensors (CPU), exposed under the
snapshot's tensor names, and are patched in place, so a hot-load never
reallocates them. Generation is one sequence at a time: a chunked prefill
(reusing prompt-prefix KV from the prompt cache) then token-by-token decode with
a `DynamicCache`, each forward step inside the replica's `step_guard`.

Locking. `_generate_lock` serializes whole sequences. `_step_lock` is held only
around a forward step and around anything that changes the model (patches,
adapters, a new base), so those wait at most for one step, never for a whole
sequence: the replica patches while a generation is paused between steps, and
that generation then continues on the new weights with its own KV.

With `buffered_swap` the engine keeps a spare copy of the weights
(`spare_weights.py`): a load writes into it before the swap lock and the pause only
points the parameters at it.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, DynamicCache
from transformers.cache_utils import DynamicLayer
from transformers.initialization import no_init_weights

from weightsync.codec import Patch, write_patches
from weightsync.codec.bits import same_bits
from weightsync.errors import DeploymentError, InvalidInputError, UnsupportedDtypeError
from weightsync.server.engines.base import (
    CacheScope,
    Engine,
    GenerateRequest,
    GenerateResult,
    StepGuard,
    TokenCallback,
    check_generate_request,
    eos_token_ids,
    model_dtype,
    same_model,
)
from weightsync.server.engines.prefix_cache import LayerKV, PrefixCache
from weightsync.server.engines.sampling import (
    new_generator,
    pick_token,
    sampling_logprob,
    token_logprobs,
)
from weightsync.server.engines.spare_weights import SpareWeights
from weightsync.server.engines.torch_adapters import LoraAdapters
from weightsync.server.engines.torch_device import (
    device_checksum,
    host_image,
    resolve_engine_device,
    synchronize,
    write_on_device,
)
from weightsync.snapshot.tied_weights import tied_duplicates

logger = logging.getLogger(__name__)

#: How the model built from a snapshot's config is named in messages.
_BUILT = "the model built from the snapshot config"


@dataclass(eq=False)
class _Loaded:
    """One built model and what the engine derived from it."""

    model: Any  # a transformers PreTrainedModel
    config: dict[str, Any]
    weights: dict[str, torch.Tensor]  # snapshot name -> live tensor
    eos_token_ids: frozenset[int]
    vocab_size: int
    max_positions: int | None
    adapters: LoraAdapters
    prefix_cacheable: bool


class TorchEngine(Engine):
    """In-process PyTorch engine (CPU) with prompt-prefix caching and LoRA adapters."""

    name = "torch"
    supports_prompt_logprobs = True

    def __init__(
        self,
        *,
        prompt_cache_tokens: int = 65536,
        cache_block_tokens: int = 16,
        num_threads: int | None = None,
        device: str = "cpu",
        buffered_swap: bool = False,
    ) -> None:
        """`prompt_cache_tokens`: bound of the prompt cache (0 disables it).

        `cache_block_tokens`: prefix-cache granularity; the prefill also runs in
        chunks of this size from position 0, so KV (and so outputs) are the same
        bits whether a prefix came from the cache or was computed.
        `num_threads`: torch intra-op threads (process-wide), None leaves torch's default.
        `device`: "cpu", "cuda" or "auto" (CUDA when available); off the CPU the engine
        keeps a host image of the weights for decoding (`torch_device.py`).
        `buffered_swap`: keep a spare copy of the weights (one more copy of the model in
        memory) so that a load is written while serving goes on and the serving pause
        only swaps copies (`spare_weights.py`); CPU only.
        """
        self.device = resolve_engine_device(device)
        if buffered_swap and self.device.type != "cpu":
            raise InvalidInputError(
                f"buffered_swap keeps its spare copy in host memory and needs device 'cpu', "
                f"not {self.device.type!r}; on a GPU the apply already runs on the device"
            )
        self._buffered_swap = buffered_swap
        self._spare: SpareWeights | None = None
        # Off the CPU: the host image of the device weights, kept bit-equal to them.
        self._host: dict[str, torch.Tensor] | None = None
        self._prefix_cache = PrefixCache(
            max_tokens=prompt_cache_tokens, block_tokens=cache_block_tokens
        )
        if num_threads is not None:
            if num_threads < 1:
                raise InvalidInputError(f"num_threads must be >= 1, got {num_threads}")
            torch.set_num_threads(num_threads)
        self._generate_lock = threading.Lock()
        self._step_lock = threading.RLock()
        self._loaded: _Loaded | None = None
        self.tokenizer: Any = None

    # -- weights ----------------------------------------------------------------

    def load_base(
        self,
        config: Mapping[str, Any],
        tensors: Mapping[str, torch.Tensor],
        *,
        tokenizer_dir: Path | None = None,
    ) -> None:
        """Load a base snapshot, strict on names, shapes, dtypes (tied duplicates may be absent).

        Same config and tensor specs as what is loaded: copied in place (tensors,
        adapters and the prompt cache are kept; the replica resets the cache by its
        policy). Otherwise a new model is built and adapters and the cache dropped.
        """
        config = dict(config)
        tokenizer = self._load_tokenizer(tokenizer_dir) if tokenizer_dir is not None else None
        current = self._loaded
        if current is not None and same_model(current.config, current.weights, config, tensors):
            if self._spare is not None:
                self._spare.invalidate()  # the live weights are written without it
            with self._step_lock:
                for name, target in current.weights.items():
                    target.copy_(tensors[name])
                    if self._host is not None:
                        self._host[name].copy_(tensors[name])
                self.tokenizer = tokenizer
            logger.info("loaded base in place (%d tensors)", len(current.weights))
            return
        loaded = _build(config, tensors, tokenizer)
        host = None
        if self.device.type != "cpu":
            loaded.model.to(self.device)  # in place: the module's parameters move
            loaded.weights = _snapshot_weights(loaded.model)
            host = host_image(loaded.weights)
        if self._spare is not None:
            self._spare.wait()
        spare = SpareWeights(loaded.model, loaded.weights) if self._buffered_swap else None
        with self._step_lock:
            self._loaded = loaded
            self._host = host
            self._spare = spare
            self.tokenizer = tokenizer
            self._prefix_cache.reset("all")
        if spare is not None:
            logger.info("buffered swap: a spare copy of the weights (%.2f GB)", spare.nbytes / 1e9)
        if current is not None and current.adapters.names():
            logger.warning(
                "new base model built; dropped LoRA adapters %s (load them again)",
                current.adapters.names(),
            )
        logger.info(
            "built %s model (%d tensors, %s)",
            config.get("model_type"),
            len(loaded.weights),
            ", ".join(sorted({str(t.dtype) for t in loaded.weights.values()})),
        )

    def named_weights(self) -> Mapping[str, torch.Tensor]:
        """The live parameter tensors under snapshot names (tied duplicates once); off the
        CPU, their host image (bit-equal; what decoding reads)."""
        loaded = self._require_loaded()
        return dict(self._host if self._host is not None else loaded.weights)

    def weights_checksums(self, checksum_format: str) -> dict[str, str]:
        """Checksums of the tensors the model computes with (on the device, streamed)."""
        loaded = self._require_loaded()
        if self._host is None:
            return super().weights_checksums(checksum_format)
        with self._step_lock:
            return {n: device_checksum(checksum_format, t) for n, t in loaded.weights.items()}

    def apply_patches(
        self, patches: Mapping[str, Patch], *, keep_undo: bool = True
    ) -> dict[str, Patch]:
        """Patch the live tensors in place; return the undo patches (see `Engine`).

        With `keep_undo` all or none is applied; without, no undo is built and every tensor
        is written at once (`write_patches`: nothing allocated). Does not wait for
        running generations: it takes only the step lock, which a generation holds just
        inside one forward step. With `buffered_swap`, patches that `stage_patches` wrote
        into the spare copy are made live by pointing the model at it.
        """
        loaded = self._require_loaded()
        spare = self._spare
        if spare is not None and spare.is_staged(patches) and not keep_undo:
            # `stage_patches` checked these patches; this runs inside the pause.
            with self._step_lock:
                loaded.weights = spare.swap(loaded.weights)
            return {}
        _check_patches_fit(loaded.weights, patches)
        if spare is not None:
            spare.invalidate()  # the live weights are written without it
        if self._host is not None:
            return self._apply_on_device(loaded.weights, self._host, patches, keep_undo=keep_undo)
        undo: dict[str, Patch] = {}
        with self._step_lock:
            if not keep_undo:  # every tensor at once, nothing allocated (`write_patches`)
                try:
                    write_patches((loaded.weights[n], p) for n, p in patches.items())
                except (ValueError, IndexError, UnsupportedDtypeError) as e:
                    raise InvalidInputError(f"the patches could not be applied: {e}") from e
                return undo
            try:
                for name, patch in patches.items():
                    undo[name] = patch.apply_(loaded.weights[name])
            except (ValueError, IndexError, UnsupportedDtypeError) as e:
                for done, undo_patch in undo.items():
                    undo_patch.apply_(loaded.weights[done])
                if isinstance(e, IndexError):
                    numel = loaded.weights[name].numel()
                    raise InvalidInputError(
                        f"patch for {name!r} writes outside the weight's {numel} elements"
                    ) from e
                raise InvalidInputError(f"patch for {name!r} could not be applied: {e}") from e
        return undo

    def stage_patches(self, patches: Mapping[str, Patch]) -> None:
        """With `buffered_swap`, write `patches` into the spare copy (serving goes on)."""
        if self._spare is None:
            return
        loaded = self._require_loaded()
        _check_patches_fit(loaded.weights, patches)
        try:
            self._spare.stage(patches, loaded.weights)
        except (ValueError, IndexError, UnsupportedDtypeError) as e:
            raise InvalidInputError(f"the patches could not be staged: {e}") from e

    def settle(self) -> None:
        """With `buffered_swap`, bring the spare copy level with the live weights, in
        the background."""
        loaded = self._loaded
        if self._spare is not None and loaded is not None:
            self._spare.catch_up(loaded.weights)

    def close(self) -> None:
        if self._spare is not None:
            self._spare.wait()

    def _apply_on_device(
        self,
        weights: Mapping[str, torch.Tensor],
        host: Mapping[str, torch.Tensor],
        patches: Mapping[str, Patch],
        *,
        keep_undo: bool,
    ) -> dict[str, Patch]:
        """Each patch onto the host image (which checks its positions), then onto the
        device tensor in place; all or none. Returns after the device finished."""
        undo: dict[str, Patch] = {}
        with self._step_lock:
            try:
                for name, patch in patches.items():
                    back = patch.apply_(host[name])
                    try:
                        write_on_device(patch, weights[name])
                    except BaseException:
                        back.apply_(host[name])
                        raise
                    undo[name] = back
            except (ValueError, IndexError, UnsupportedDtypeError, RuntimeError) as e:
                for done, undo_patch in undo.items():
                    undo_patch.apply_(host[done])
                    write_on_device(undo_patch, weights[done])
                synchronize(self.device)
                raise InvalidInputError(f"patch for {name!r} could not be applied: {e}") from e
            synchronize(self.device)  # the pause covers the device's writes
        return undo if keep_undo else {}

    def reset_prompt_cache(self, scope: CacheScope = "all") -> int:
        """Drop cached prompt KV; never waits for a running generation."""
        dropped = self._prefix_cache.reset(scope)
        logger.debug("prompt cache reset (%s): %d blocks dropped", scope, dropped)
        return dropped

    # -- adapters ---------------------------------------------------------------

    def load_adapter(
        self, name: str, adapter_config: Mapping[str, Any], tensors: Mapping[str, torch.Tensor]
    ) -> None:
        loaded = self._require_loaded()
        with self._step_lock:
            self._prefix_cache.drop_adapter(name)
            loaded.adapters.load(name, adapter_config, tensors)

    def unload_adapter(self, name: str) -> None:
        loaded = self._require_loaded()
        with self._step_lock:
            loaded.adapters.unload(name)
            self._prefix_cache.drop_adapter(name)

    def loaded_adapters(self) -> list[str]:
        loaded = self._loaded
        return [] if loaded is None else loaded.adapters.names()

    # -- generation -------------------------------------------------------------

    def generate(
        self,
        request: GenerateRequest,
        *,
        step_guard: StepGuard,
        on_token: TokenCallback | None = None,
    ) -> GenerateResult:
        """Generate one sequence; the stop token (EOS or a stop id) ends the output.

        Each forward step (the prefill is one) runs inside `step_guard()`, and each
        token records the identity the guard yielded for the step that produced it.
        Logprobs are fp32 log-softmax of the raw logits (independent of temperature);
        sampling logprobs those of the distribution the token was drawn from.
        """
        loaded = self._require_loaded()
        _validate_request(request, loaded)
        with self._generate_lock, torch.inference_mode():
            return self._generate(request, step_guard, on_token)

    def _generate(
        self, request: GenerateRequest, step_guard: StepGuard, on_token: TokenCallback | None
    ) -> GenerateResult:
        generator = new_generator(request.seed)
        want_logprobs = request.logprobs is not None
        top_k = request.logprobs or 0
        result = GenerateResult(
            token_ids=[],
            logprobs=[] if want_logprobs else None,
            top_logprobs=[] if top_k > 0 else None,
            sampling_logprobs=[] if want_logprobs else None,
        )
        if request.max_tokens == 0 and not request.prompt_logprobs:
            return result
        prompt = list(request.prompt_token_ids)
        stop_ids: frozenset[int] = frozenset(request.stop_token_ids)
        cache: DynamicCache | None = None
        loaded: _Loaded | None = None
        max_new = request.max_tokens
        while True:
            with step_guard() as identity, self._step_lock:
                if cache is None:
                    loaded = self._require_loaded()
                    if loaded.max_positions is not None:
                        max_new = min(max_new, loaded.max_positions - len(prompt))
                    stop_ids = stop_ids | loaded.eos_token_ids
                    cache, logits, result.num_cached_prompt_tokens = self._prefill(
                        loaded, request, prompt, result
                    )
                    if max_new <= 0:
                        return result  # echo of the prompt's logprobs only
                else:
                    if self._loaded is not loaded:
                        raise DeploymentError(
                            "a new base model with a different architecture was loaded while "
                            "this request was generating; send the request again"
                        )
                    assert loaded is not None  # set by the prefill step
                    loaded.adapters.activate(request.adapter)
                    step_input = torch.tensor(
                        [[result.token_ids[-1]]], dtype=torch.long, device=self.device
                    )
                    out = loaded.model(input_ids=step_input, past_key_values=cache, use_cache=True)
                    logits = out.logits[0, -1].float().cpu()  # sampling runs on the host
                token = pick_token(
                    logits,
                    temperature=request.temperature,
                    top_p=request.top_p,
                    top_k=request.top_k,
                    generator=generator,
                )
            result.token_ids.append(token)
            result.token_snapshots.append(identity)
            if want_logprobs:
                chosen, top = token_logprobs(logits, token, top_k=top_k)
                assert result.logprobs is not None
                result.logprobs.append(chosen)
                if result.top_logprobs is not None and top is not None:
                    result.top_logprobs.append(top)
                assert result.sampling_logprobs is not None
                result.sampling_logprobs.append(
                    sampling_logprob(
                        logits,
                        token,
                        temperature=request.temperature,
                        top_p=request.top_p,
                        top_k=request.top_k,
                    )
                )
            if token in stop_ids or (on_token is not None and not on_token(result)):
                result.finish_reason = "stop"
                return result
            if len(result.token_ids) >= max_new:
                result.finish_reason = "length"
                return result

    def _prefill(
        self,
        loaded: _Loaded,
        request: GenerateRequest,
        prompt: list[int],
        result: GenerateResult,
    ) -> tuple[DynamicCache, torch.Tensor, int]:
        """Fill a fresh KV cache with the prompt; return it, the last logits (fp32), cached count.

        Runs in chunks aligned to the cache's blocks so cached and computed prefixes
        give the same bits. Called inside the first step guard, so the cached KV and
        the weights that compute the rest belong to the same snapshot. With
        `prompt_logprobs` every position's logits are kept (no cached prefix is used)
        and each prompt token's logprob goes into `result`.
        """
        loaded.adapters.activate(request.adapter)
        block = self._prefix_cache.block_tokens
        cache = DynamicCache(config=loaded.model.config)
        num_cached = 0
        top_k = request.logprobs or 0
        if request.prompt_logprobs:
            result.prompt_logprobs = []
            result.prompt_top_logprobs = [] if top_k > 0 else None
        if loaded.prefix_cacheable and not request.prompt_logprobs:
            # Keep at least one prompt token to compute: its logits start the decode.
            usable = (len(prompt) - 1) // block * block
            num_cached, layers = self._prefix_cache.lookup(
                prompt, adapter=request.adapter, session=request.cache_session, max_tokens=usable
            )
            if layers is not None:
                for index, (keys, values) in enumerate(layers):
                    cache.update(keys, values, index)
        logits: torch.Tensor | None = None
        for start in range(num_cached, len(prompt), block):
            chunk = torch.tensor(
                [prompt[start : start + block]], dtype=torch.long, device=self.device
            )
            keep = 0 if request.prompt_logprobs else 1  # 0: logits of every position
            out = loaded.model(
                input_ids=chunk, past_key_values=cache, use_cache=True, logits_to_keep=keep
            )
            logits = out.logits[0, -1].float().cpu()
            if result.prompt_logprobs is not None:
                # Position i's logits predict token i + 1 of the prompt.
                for offset in range(out.logits.shape[1]):
                    target = start + offset + 1
                    if target >= len(prompt):
                        break
                    chosen, top = token_logprobs(
                        out.logits[0, offset].float().cpu(), prompt[target], top_k=top_k
                    )
                    result.prompt_logprobs.append(chosen)
                    if result.prompt_top_logprobs is not None and top is not None:
                        result.prompt_top_logprobs.append(top)
        assert logits is not None  # the prompt is non-empty and num_cached < len(prompt)
        if loaded.prefix_cacheable:
            self._prefix_cache.store(
                prompt,
                _cache_layers(cache),
                adapter=request.adapter,
                session=request.cache_session,
            )
        return cache, logits, num_cached

    # -- helpers ----------------------------------------------------------------

    def _require_loaded(self) -> _Loaded:
        loaded = self._loaded
        if loaded is None:
            raise DeploymentError("the torch engine has no model yet; call load_base first")
        return loaded

    @staticmethod
    def _load_tokenizer(tokenizer_dir: Path) -> Any:
        try:
            return AutoTokenizer.from_pretrained(str(tokenizer_dir))
        except (OSError, ValueError) as e:
            raise InvalidInputError(
                f"cannot load the tokenizer from {tokenizer_dir}: {e}; "
                "pass a directory with tokenizer.json / tokenizer_config.json"
            ) from e


def _build(config: dict[str, Any], tensors: Mapping[str, torch.Tensor], tokenizer: Any) -> _Loaded:
    """Build a model from an HF config dict and load `tensors` strictly into it."""
    model_type = config.get("model_type")
    if not isinstance(model_type, str):
        raise InvalidInputError("the model config has no 'model_type'; is it an HF config.json?")
    if not tensors:
        raise InvalidInputError("a base snapshot must hold tensors; got none")
    dtype = model_dtype(tensors)
    fields = {k: v for k, v in config.items() if k != "model_type"}
    try:
        hf_config = AutoConfig.for_model(model_type, **fields)
        # Every weight is overwritten below, so skip the random initialisation.
        with no_init_weights():
            model = AutoModelForCausalLM.from_config(hf_config, dtype=dtype)
    except (ValueError, KeyError, TypeError) as e:
        raise InvalidInputError(
            f"cannot build a {model_type!r} causal LM from the snapshot config: {e}"
        ) from e
    model.tie_weights()
    model.eval()
    model.requires_grad_(False)
    weights = _snapshot_weights(model)
    _load_strict(model, weights, tensors)
    eos = set(eos_token_ids(hf_config.eos_token_id))
    if tokenizer is not None and tokenizer.eos_token_id is not None:
        eos.add(int(tokenizer.eos_token_id))
    probe = DynamicCache(config=hf_config)
    # Block-wise prefix KV needs plain full-attention layers (no sliding window,
    # no linear-attention state); other models run without the prompt cache.
    prefix_cacheable = all(
        isinstance(layer, DynamicLayer) and not layer.is_sliding for layer in probe.layers
    )
    if not prefix_cacheable:
        logger.info("the prompt cache is off for this model (not full attention everywhere)")
    return _Loaded(
        model=model,
        config=dict(config),
        weights=weights,
        eos_token_ids=frozenset(eos),
        vocab_size=int(hf_config.vocab_size),
        max_positions=getattr(hf_config, "max_position_embeddings", None),
        adapters=LoraAdapters(model),
        prefix_cacheable=prefix_cacheable,
    )


def _snapshot_weights(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """State-dict names -> live tensors, tied duplicates dropped (the snapshot's names)."""
    state = model.state_dict(keep_vars=True)
    tied = tied_duplicates(state.items(), what=_BUILT)
    return {name: tensor.data for name, tensor in state.items() if name not in tied}


def _load_strict(
    model: torch.nn.Module, weights: dict[str, torch.Tensor], tensors: Mapping[str, torch.Tensor]
) -> None:
    missing = sorted(set(weights) - set(tensors))
    unexpected = sorted(set(tensors) - set(weights))
    # A snapshot may carry a tied duplicate after all; accept it only if it is the same bits.
    tied = tied_duplicates(model.state_dict(keep_vars=True).items(), what=_BUILT)
    for name in list(unexpected):
        canonical = tied.get(name)
        if (
            canonical is not None
            and canonical in tensors
            and same_bits(tensors[name], tensors[canonical])
        ):
            unexpected.remove(name)
    if missing or unexpected:
        raise InvalidInputError(
            "the snapshot's tensors do not match the model built from its config: "
            f"missing {missing[:8]}{'...' if len(missing) > 8 else ''}, "
            f"unexpected {unexpected[:8]}{'...' if len(unexpected) > 8 else ''}; "
            "check that config.json belongs to these weights"
        )
    for name, target in weights.items():
        source = tensors[name]
        if tuple(source.shape) != tuple(target.shape):
            raise InvalidInputError(
                f"tensor {name!r} has shape {tuple(source.shape)} in the snapshot but "
                f"{tuple(target.shape)} in the model built from its config"
            )
    for name, target in weights.items():
        source = tensors[name]
        if source.dtype == target.dtype:
            target.copy_(source)
        else:
            # Keep the snapshot's dtype (e.g. fp32 norms in a bf16 model): never round.
            _replace_data(model, target, source.detach().clone().contiguous())
            weights[name] = _find_data(model, name)


def _replace_data(model: torch.nn.Module, old: torch.Tensor, new: torch.Tensor) -> None:
    for tensor in [*model.parameters(), *model.buffers()]:
        if tensor.data.data_ptr() == old.data_ptr():
            tensor.data = new


def _find_data(model: torch.nn.Module, name: str) -> torch.Tensor:
    tensor: torch.Tensor = model.state_dict(keep_vars=True)[name]
    return tensor.data


def _cache_layers(cache: DynamicCache) -> list[LayerKV]:
    layers: list[LayerKV] = []
    for layer in cache.layers:
        if not isinstance(layer, DynamicLayer) or layer.keys is None or layer.values is None:
            raise DeploymentError(f"unexpected KV cache layer {type(layer).__name__}")
        layers.append((layer.keys, layer.values))
    return layers


def _check_patches_fit(weights: Mapping[str, torch.Tensor], patches: Mapping[str, Patch]) -> None:
    for name, patch in patches.items():
        target = weights.get(name)
        if target is None:
            raise InvalidInputError(
                f"cannot patch {name!r}: no such weight in the loaded model "
                f"({len(weights)} weights, e.g. {next(iter(weights))!r})"
            )
        _check_patch_fits(name, patch, target)


def _check_patch_fits(name: str, patch: Patch, target: torch.Tensor) -> None:
    """Reject a patch that would write out of bounds or truncate bits, before any write."""
    numel = target.numel()
    if patch.values.dtype.itemsize != target.element_size():
        raise InvalidInputError(
            f"patch for {name!r} carries {patch.values.dtype.itemsize}-byte values but the "
            f"weight is {target.dtype}; was it decoded against the right parent?"
        )
    if patch.positions is None:
        if patch.values.size != numel:
            raise InvalidInputError(
                f"dense patch for {name!r} has {patch.values.size} values, weight has {numel}"
            )
        return
    if patch.positions.size != patch.values.size:
        raise InvalidInputError(
            f"patch for {name!r} has {patch.positions.size} positions but "
            f"{patch.values.size} values"
        )
    # Positions out of range are refused by `Patch.apply_` itself (all or nothing),
    # so no O(changed) scan runs here, inside the serving pause.


def _validate_request(request: GenerateRequest, loaded: _Loaded) -> None:
    check_generate_request(
        request, vocab_size=loaded.vocab_size, max_positions=loaded.max_positions
    )
    if request.adapter is not None and request.adapter not in loaded.adapters:
        raise InvalidInputError(
            f"unknown LoRA adapter {request.adapter!r}; loaded: "
            f"{', '.join(loaded.adapters.names()) or 'none'}"
        )
