"""The prompt cache: block-aligned prefix reuse, identical outputs, scopes, LRU bound."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from _support.engine_steps import PROMPT, RecordingGuard
from _support.models import snapshot_tensors
from weightsync.errors import InvalidInputError
from weightsync.server.engines.base import GenerateRequest, GenerateResult
from weightsync.server.engines.prefix_cache import PrefixCache
from weightsync.server.engines.torch_engine import TorchEngine


def _run(engine: TorchEngine, prompt: list[int], **kwargs: Any) -> GenerateResult:
    fields: dict[str, Any] = dict(max_tokens=6, temperature=0.0, logprobs=2) | kwargs
    return engine.generate(
        GenerateRequest(prompt_token_ids=prompt, **fields), step_guard=RecordingGuard()
    )


def _outputs(result: GenerateResult) -> tuple[Any, ...]:
    return result.token_ids, result.logprobs, result.top_logprobs, result.finish_reason


def test_cache_hit_gives_identical_outputs_and_reports_cached_tokens(model: Any) -> None:
    uncached = TorchEngine(prompt_cache_tokens=0, cache_block_tokens=4)
    uncached.load_base(model.config.to_dict(), snapshot_tensors(model))
    engine = TorchEngine(cache_block_tokens=4)
    engine.load_base(model.config.to_dict(), snapshot_tensors(model))

    first = _run(engine, PROMPT)
    assert first.num_cached_prompt_tokens == 0
    again = _run(engine, PROMPT)
    # 12 tokens: the last is always computed, so two full blocks (8 tokens) come from the cache.
    assert again.num_cached_prompt_tokens == 8
    assert _outputs(again) == _outputs(first) == _outputs(_run(uncached, PROMPT))
    assert _run(uncached, PROMPT).num_cached_prompt_tokens == 0

    branch = [*PROMPT[:9], 50, 51, 52, 53, 54]  # shares two full blocks and one token
    hit = _run(engine, branch)
    assert hit.num_cached_prompt_tokens == 8
    assert _outputs(hit) == _outputs(_run(uncached, branch))

    sampled = dict(temperature=1.0, seed=4)
    assert _outputs(_run(engine, PROMPT, **sampled)) == _outputs(_run(uncached, PROMPT, **sampled))


def test_requests_never_change_cached_kv(engine: TorchEngine) -> None:
    cache = engine._prefix_cache
    _run(engine, PROMPT)
    count, layers = cache.lookup(PROMPT, adapter=None, session=None, max_tokens=12)
    assert count == 12 and layers is not None
    snapshot = [(k.clone(), v.clone()) for k, v in layers]
    layers[0][0].fill_(7.0)  # a caller scribbling on its copy
    _run(engine, PROMPT, max_tokens=10)
    _, after = cache.lookup(PROMPT, adapter=None, session=None, max_tokens=12)
    assert after is not None
    for (k, v), (k2, v2) in zip(snapshot, after, strict=True):
        assert torch.equal(k, k2) and torch.equal(v, v2)


def test_reset_scopes_keep_multi_turn_sessions_on_shared(engine: TorchEngine) -> None:
    cache = engine._prefix_cache  # blocks of 4 tokens
    session_prompt = [*PROMPT[:4], 60, 61, 62, 63, 64]
    _run(engine, PROMPT)  # shared: 3 blocks
    _run(engine, session_prompt, cache_session="conv-1")  # conv-1: 2 blocks of its own
    assert len(cache) == 5

    # A request outside the session never sees the session's blocks (only shared block 1)...
    assert _run(engine, session_prompt).num_cached_prompt_tokens == 4  # +1 shared block
    # ...while a session may also reuse shared blocks.
    assert _run(engine, PROMPT, cache_session="conv-2").num_cached_prompt_tokens == 8  # +3
    assert len(cache) == 9

    assert engine.reset_prompt_cache("shared") == 4
    assert len(cache) == 5  # conv-1's 2 and conv-2's 3 blocks
    assert _run(engine, session_prompt, cache_session="conv-1").num_cached_prompt_tokens == 8
    assert _run(engine, [*PROMPT[:8], 99, 98]).num_cached_prompt_tokens == 0  # +2 shared

    assert engine.reset_prompt_cache("all") == 7
    assert len(cache) == 0
    assert _run(engine, session_prompt, cache_session="conv-1").num_cached_prompt_tokens == 0


def _kv(num_tokens: int, fill: float) -> list[tuple[torch.Tensor, torch.Tensor]]:
    block = torch.full((1, 2, num_tokens, 8), fill)
    return [(block, block + 1), (block + 2, block + 3)]


def test_lru_bound_in_tokens_evicts_oldest_and_its_continuations() -> None:
    cache = PrefixCache(max_tokens=16, block_tokens=4)
    a, b, c = list(range(8)), list(range(100, 108)), list(range(200, 212))
    cache.store(a, _kv(8, 1.0), adapter=None, session=None)
    cache.store(b, _kv(8, 2.0), adapter=None, session=None)
    assert cache.num_cached_tokens == 16
    assert cache.lookup(a, adapter=None, session=None, max_tokens=8)[0] == 8  # a is now fresher
    cache.store(c, _kv(12, 3.0), adapter=None, session=None)
    assert cache.num_cached_tokens <= 16
    assert cache.lookup(b, adapter=None, session=None, max_tokens=8)[0] == 0  # b was oldest
    count, layers = cache.lookup(c, adapter=None, session=None, max_tokens=12)
    assert count == 12 and layers is not None
    assert layers[1][1].shape == (1, 2, 12, 8)
    assert torch.all(layers[1][1] == 6.0)
    # A chain longer than the whole budget keeps its head.
    cache.store(list(range(300, 340)), _kv(40, 4.0), adapter=None, session=None)
    assert cache.num_cached_tokens == 16
    assert cache.lookup(list(range(300, 340)), adapter=None, session=None, max_tokens=40)[0] == 16


def test_adapters_have_their_own_blocks() -> None:
    cache = PrefixCache(max_tokens=64, block_tokens=4)
    cache.store(list(range(8)), _kv(8, 1.0), adapter="a", session=None)
    assert cache.lookup(list(range(8)), adapter=None, session=None, max_tokens=8)[0] == 0
    assert cache.lookup(list(range(8)), adapter="a", session=None, max_tokens=8)[0] == 8
    assert cache.drop_adapter("a") == 2
    assert cache.lookup(list(range(8)), adapter="a", session=None, max_tokens=8)[0] == 0


def test_disabled_cache_and_bad_arguments() -> None:
    cache = PrefixCache(max_tokens=0, block_tokens=4)
    assert cache.store(list(range(8)), _kv(8, 1.0), adapter=None, session=None) == 0
    assert cache.lookup(list(range(8)), adapter=None, session=None, max_tokens=8) == (0, None)
    with pytest.raises(InvalidInputError, match="block_tokens"):
        PrefixCache(max_tokens=8, block_tokens=0)
    with pytest.raises(InvalidInputError, match="unknown prompt cache scope"):
        cache.reset("everything")  # type: ignore[arg-type]
