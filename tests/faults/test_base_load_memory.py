"""The memory of a base hot-load before its swap: the fetched weight files are the new
weights (`FetchedSnapshot.tensor_bits`: read-only views, each tensor checked against the
manifest), so preparing a base holds about one copy of the model — where the parsed
tensors plus a dense copy of each held three.

Measured as a fresh process's peak RSS (VmHWM, reset right before the fetch with
clear_refs) against the same preparation done the old way, so the comparison can fail
and does not depend on the machine's speed. The whole replica's figure (0.6B shape) is
`benchmarks/replica_memory.py --mode base`, in docs/reliability.md.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from _support.peak_rss import PRELUDE, run_child
from weightsync.snapshot import write_base

pytestmark = pytest.mark.timeout(300)

CHILD = (
    PRELUDE
    + """
from weightsync.codec import Patch
from weightsync.codec.bits import bits
from weightsync.snapshot import SnapshotStore

store_dir, mode = sys.argv[1], sys.argv[2]

store = SnapshotStore(store_dir)
manifest = store.read_manifest("b-1")
model_kib = sum(e.num_elements * 2 for e in manifest.tensors.values()) // 1024
before = fresh_peak()
fetched = store.fetch("b-1")
if mode == "views":  # what the load pipeline does now
    patches = {n: Patch(None, b) for n, b in fetched.tensor_bits().items()}
elif mode == "copies":  # the old way: parsed tensors, then a dense copy of each
    patches = {n: Patch(None, bits(t.contiguous()).copy()) for n, t in fetched.tensors().items()}
else:
    raise SystemExit(f"unknown mode {mode}")
grew = kib("VmHWM") - before
print(json.dumps({"grew_kib": grew, "model_kib": model_kib, "tensors": len(patches)}))
"""
)


def _peak(store: Path, mode: str) -> dict[str, int]:
    return run_child(CHILD, store, mode)


def test_preparing_a_base_holds_one_copy_of_the_model(tmp_path: Path) -> None:
    """64 MiB of bf16 in 8 one-layer shards plus a 16 MiB embedding shard: the views hold
    what was fetched (1x + the allocator's slack), the old way held about 3x."""
    gen = torch.Generator().manual_seed(0)
    weights = {
        f"model.layers.{i}.mlp.weight": torch.randn(2048, 2048, generator=gen).to(torch.bfloat16)
        for i in range(8)
    }
    weights["model.embed_tokens.weight"] = torch.randn(4096, 2048, generator=gen).to(torch.bfloat16)
    write_base(tmp_path, "b-1", weights, config={})
    views = _peak(tmp_path, "views")
    assert views["tensors"] == len(weights)
    assert views["grew_kib"] < views["model_kib"] * 5 / 4, views
    copies = _peak(tmp_path, "copies")
    assert copies["grew_kib"] > copies["model_kib"] * 5 / 2, copies
