"""The memory of a dense delta while it is decoded: the payload is dropped shard by shard as
its patches are made, and a delta touching every element is decoded straight into the
tensors' new bits (no int64 positions), so the load holds about one copy of the changed
data plus one shard — not the payload and the patches both, nor 5x the tensor.

The first test is exact: which files are still held when each tensor is decoded (seen
through the `current` mapping the decoder reads), and that nothing refers to a shard's
bytes afterwards. (Whether freed bytes leave the RSS is the allocator's business — bytes
read by the fetch's threads sit in their malloc arenas — so RSS is not asserted for it.)
The second measures a fresh process's peak RSS (VmHWM, reset right before the decode with
clear_refs) against the same decode done the old way, so the comparison can fail and does
not depend on the machine's speed."""

from __future__ import annotations

import sys
from collections.abc import Iterator, Mapping
from pathlib import Path

import numpy as np
import pytest
import torch

from _support.peak_rss import PRELUDE, run_child
from weightsync.codec.bits import bits
from weightsync.errors import UnsupportedOperationError
from weightsync.snapshot import SnapshotStore, write_base, write_delta

pytestmark = pytest.mark.timeout(300)


def _layers(num: int, shape: tuple[int, int], seed: int) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return {
        f"model.layers.{i}.mlp.weight": torch.randn(shape, generator=gen).to(torch.bfloat16)
        for i in range(num)
    }


class _Watching(Mapping[str, torch.Tensor]):
    """The current weights, noting which weight files the snapshot still holds whenever
    the decoder asks for a tensor (the seam: the mapping `patches` reads)."""

    def __init__(self, weights: dict[str, torch.Tensor], held: Mapping[str, bytes]) -> None:
        self.weights, self.held = weights, held
        self.seen: dict[str, set[str]] = {}

    def __getitem__(self, name: str) -> torch.Tensor:
        self.seen.setdefault(name, set(self.held))
        return self.weights[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self.weights)

    def __len__(self) -> int:
        return len(self.weights)


def test_released_patches_drop_each_shard_once_its_tensors_are_decoded(tmp_path: Path) -> None:
    old = _layers(4, (32, 48), seed=0)
    new = {n: torch.nextafter(t, torch.full_like(t, 9.0)) for n, t in old.items()}
    base = write_base(tmp_path, "b-1", old, config={})
    delta = write_delta(tmp_path, "d-1", parent=base, old=old, new=new)
    assert len(delta.files) >= 4  # one layer per shard
    store = SnapshotStore(tmp_path)

    kept = store.fetch("d-1")
    watch = _Watching(old, kept.files)
    kept.patches(watch, dense_when_smaller=True)
    every_file = set(kept.files)
    assert all(held == every_file for held in watch.seen.values())  # the default keeps all

    fetched = store.fetch("d-1")
    shards = list(fetched.files.values())
    watch = _Watching(old, fetched.files)
    patches = fetched.patches(watch, dense_when_smaller=True, release=True)
    # Dropped, not just unlisted: no view of any shard's bytes survives, so each is freed.
    for shard in shards:
        assert sys.getrefcount(shard) == 3  # `shards`, `shard` and getrefcount's argument
    del shard
    decoded: set[str] = set()  # files of the tensors decoded so far (one layer a shard)
    for name, held in watch.seen.items():  # in decoding order
        assert delta.tensors[name].file in held, name
        assert not held & decoded, (name, held & decoded)
        decoded.add(delta.tensors[name].file)
    assert len(decoded) == len(old)
    assert fetched.files == {}
    assert list(patches) == sorted(old)
    for name, patch in patches.items():
        assert patch.positions is None  # every element moved: the new bits, densely
        assert np.array_equal(patch.values, bits(new[name])), name
    with pytest.raises(UnsupportedOperationError, match="fetch it again"):
        fetched.patches(old)


CHILD = (
    PRELUDE
    + """
import torch
from weightsync.codec import get_codec, wsdelta1
from weightsync.snapshot import SnapshotStore

store_dir, mode = sys.argv[1], sys.argv[2]

store = SnapshotStore(store_dir)
live = {n: t.clone() for n, t in store.fetch("b-1").tensors().items()}
manifest = store.read_manifest("d-1")
codec = get_codec(manifest.compression_format)
# Warm the decoder (JIT, zstd contexts) on one tensor; its memory is not the load's.
warm = store.fetch("d-1")
first = sorted(live)[0]
codec.decode_patch(warm.payloads()[first], live[first])
del warm
model_kib = sum(t.numel() * t.element_size() for t in live.values()) // 1024
payload_kib = sum(f.size_bytes for f in manifest.files.values()) // 1024
before = fresh_peak()
fetched = store.fetch("d-1")
if mode == "released":
    patches = fetched.patches(live, dense_when_smaller=True, release=True)
elif mode == "positions":  # the old way: positions + values, then the dense copy
    from weightsync.codec.base import compact
    patches = {n: compact(codec.decode_patch(p, live[n]), live[n])
               for n, p in fetched.payloads().items()}
else:
    raise SystemExit(f"unknown mode {mode}")
grew = kib("VmHWM") - before
for name, patch in patches.items():
    fetched.verify_patched(name, live, patch)
print(json.dumps({"grew_kib": grew, "model_kib": model_kib, "payload_kib": payload_kib,
                  "dense": all(p.positions is None for p in patches.values())}))
"""
)


def _peak(store: Path, mode: str) -> dict[str, int]:
    return run_child(CHILD, store, mode)


def test_a_tensor_changed_everywhere_decodes_without_positions(tmp_path: Path) -> None:
    """wsdelta1, one 32 MiB tensor, every element one ulp up: decoded into a copy of the
    old bits (one tensor), where positions + values + the dense copy took 6x."""
    old = {"model.embed_tokens.weight": torch.randn(4096, 4096).to(torch.bfloat16)}
    new = {n: torch.nextafter(t, torch.full_like(t, 9.0)) for n, t in old.items()}
    base = write_base(tmp_path, "b-1", old, config={})
    write_delta(tmp_path, "d-1", parent=base, old=old, new=new)
    compact = _peak(tmp_path, "released")
    assert compact["dense"], compact
    assert compact["grew_kib"] < compact["model_kib"] * 3 / 2 + compact["payload_kib"], compact
    positions = _peak(tmp_path, "positions")
    assert positions["grew_kib"] > positions["model_kib"] * 4, positions
