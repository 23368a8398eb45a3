"""The prompt cache: KV of prompt prefixes, shared across requests, in fixed-size blocks.

A prompt is cut into blocks of `block_tokens` tokens from position 0. Block i of
a prompt is found by (namespace, id of block i-1, the tokens of block i): exact
keys, no hashing, so a hit can never hand back another prompt's KV. A namespace
is (adapter, session): KV depends on the adapter, and multi-turn sessions keep
their own blocks so `reset("shared")` can drop every other block while a
session keeps the KV it started with (the server's "new_session" policy).

Bounded by `max_tokens` with LRU eviction; evicting a block evicts the blocks
that continue it (they can no longer be reached). Lookups return fresh copies,
so nothing a request does to its KV ever changes a cached block.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Literal

import torch

from weightsync.errors import InvalidInputError

#: Per layer: (keys, values), each [batch=1, kv_heads, tokens, head_dim].
LayerKV = tuple[torch.Tensor, torch.Tensor]
_Namespace = tuple[str | None, str | None]  # (adapter, session)
_ROOT = 0


@dataclass(eq=False)
class _Block:
    block_id: int
    key: tuple[_Namespace, int, tuple[int, ...]]
    layers: list[LayerKV]
    children: set[int] = field(default_factory=set)


class PrefixCache:
    """Thread-safe LRU cache of prompt-prefix KV blocks."""

    def __init__(self, *, max_tokens: int, block_tokens: int) -> None:
        if block_tokens < 1:
            raise InvalidInputError(f"block_tokens must be >= 1, got {block_tokens}")
        if max_tokens < 0:
            raise InvalidInputError(f"max_tokens must be >= 0 (0 disables), got {max_tokens}")
        self.block_tokens = block_tokens
        self.max_blocks = max_tokens // block_tokens
        self._lock = threading.Lock()
        self._blocks: OrderedDict[int, _Block] = OrderedDict()  # LRU order, oldest first
        self._index: dict[tuple[_Namespace, int, tuple[int, ...]], int] = {}
        self._next_id = _ROOT + 1

    @property
    def num_cached_tokens(self) -> int:
        return len(self._blocks) * self.block_tokens

    def __len__(self) -> int:
        return len(self._blocks)

    def lookup(
        self,
        token_ids: Sequence[int],
        *,
        adapter: str | None,
        session: str | None,
        max_tokens: int,
    ) -> tuple[int, list[LayerKV] | None]:
        """Longest cached block-aligned prefix of `token_ids`, at most `max_tokens` long.

        A session request may also reuse blocks not tied to any session. Returns the
        number of cached tokens and per-layer copies of their KV (None when 0).
        """
        with self._lock:
            chain = self._walk(token_ids, (adapter, session), max_tokens)
            if session is not None:
                shared = self._walk(token_ids, (adapter, None), max_tokens)
                if len(shared) > len(chain):
                    chain = shared
            if not chain:
                return 0, None
            # Touch the tail first so ancestors stay more recent than what continues them.
            for block in reversed(chain):
                self._blocks.move_to_end(block.block_id)
            num_layers = len(chain[0].layers)
            layers = [
                (
                    torch.cat([b.layers[i][0] for b in chain], dim=-2),
                    torch.cat([b.layers[i][1] for b in chain], dim=-2),
                )
                for i in range(num_layers)
            ]
        return len(chain) * self.block_tokens, layers

    def store(
        self,
        token_ids: Sequence[int],
        layers: Sequence[LayerKV],
        *,
        adapter: str | None,
        session: str | None,
    ) -> int:
        """Cache every full block of `token_ids` whose KV `layers` hold; return blocks added.

        `layers` must cover at least the full blocks of `token_ids` (positions from 0).
        Blocks are copied, so the caller may keep using and extending its own KV.
        """
        if self.max_blocks == 0:
            return 0
        num_blocks = min(len(token_ids) // self.block_tokens, self.max_blocks)
        namespace: _Namespace = (adapter, session)
        added = 0
        with self._lock:
            chain: list[int] = []
            parent = _ROOT
            for i in range(num_blocks):
                start, end = i * self.block_tokens, (i + 1) * self.block_tokens
                key = (namespace, parent, tuple(token_ids[start:end]))
                block_id = self._index.get(key)
                if block_id is None:
                    block_id = self._add(key, parent, layers, start, end)
                    added += 1
                chain.append(block_id)
                parent = block_id
            # Tail first, so this chain is the most recent and its ancestors outlive it.
            for block_id in reversed(chain):
                self._blocks.move_to_end(block_id)
            self._evict_over_budget()
        return added

    def reset(self, scope: Literal["all", "shared"] = "all") -> int:
        """Drop every block ("all") or every block not tied to a session ("shared")."""
        if scope not in ("all", "shared"):
            raise InvalidInputError(f"unknown prompt cache scope {scope!r}; use 'all' or 'shared'")
        with self._lock:
            if scope == "all":
                dropped = len(self._blocks)
                self._blocks.clear()
                self._index.clear()
                return dropped
            return self._drop_where(lambda ns: ns[1] is None)

    def drop_adapter(self, adapter: str) -> int:
        """Drop every block computed with `adapter` (it was unloaded or replaced)."""
        with self._lock:
            return self._drop_where(lambda ns: ns[0] == adapter)

    # -- internals (callers hold self._lock) -----------------------------------

    def _walk(
        self, token_ids: Sequence[int], namespace: _Namespace, max_tokens: int
    ) -> list[_Block]:
        chain: list[_Block] = []
        parent = _ROOT
        for i in range(max(0, min(len(token_ids), max_tokens)) // self.block_tokens):
            start, end = i * self.block_tokens, (i + 1) * self.block_tokens
            block_id = self._index.get((namespace, parent, tuple(token_ids[start:end])))
            if block_id is None:
                break
            chain.append(self._blocks[block_id])
            parent = block_id
        return chain

    def _add(
        self,
        key: tuple[_Namespace, int, tuple[int, ...]],
        parent: int,
        layers: Sequence[LayerKV],
        start: int,
        end: int,
    ) -> int:
        block_id = self._next_id
        self._next_id += 1
        block_layers = [(k[:, :, start:end].clone(), v[:, :, start:end].clone()) for k, v in layers]
        self._blocks[block_id] = _Block(block_id, key, block_layers)
        self._index[key] = block_id
        if parent != _ROOT:
            self._blocks[parent].children.add(block_id)
        return block_id

    def _evict_over_budget(self) -> None:
        # The chain just stored is the most recent and at most max_blocks long, and
        # the oldest block is never its ancestor, so this never evicts that chain.
        while len(self._blocks) > self.max_blocks:
            self._remove_subtree(next(iter(self._blocks)))

    def _drop_where(self, predicate: Callable[[_Namespace], bool]) -> int:
        doomed = [b.block_id for b in self._blocks.values() if predicate(b.key[0])]
        before = len(self._blocks)
        for block_id in doomed:
            if block_id in self._blocks:
                self._remove_subtree(block_id)
        return before - len(self._blocks)

    def _remove_subtree(self, block_id: int) -> None:
        stack = [block_id]
        while stack:
            block = self._blocks.pop(stack.pop(), None)
            if block is None:
                continue
            del self._index[block.key]
            parent = block.key[1]
            if parent in self._blocks:
                self._blocks[parent].children.discard(block.block_id)
            stack.extend(block.children)
