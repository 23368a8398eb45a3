"""A dense delta's memory: `apply_patches(keep_undo=False)` holds no undo of the patched
elements (at most one tensor's, transiently), so a delta that changes every element costs
its changed data plus about one tensor, not a second copy of the model."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

pytestmark = pytest.mark.timeout(300)

CHILD = """
import json, sys
import numpy as np, torch
from weightsync.codec import Patch, checksum_tensor, patch_kernels
from weightsync.codec.bits import bits
from weightsync.server.engines.torch_engine import TorchEngine
from weightsync.toymodel import build_model

torch.set_num_threads(1)
model = build_model("small", seed=0, dtype=torch.bfloat16, num_hidden_layers=12,
                    hidden_size=256, intermediate_size=1024, num_attention_heads=4,
                    num_key_value_heads=2, head_dim=64)
tensors = {k: v.detach().clone() for k, v in model.state_dict().items() if k != "lm_head.weight"}
config = model.config.to_dict()
del model
engine = TorchEngine()
engine.load_base(config, tensors)
live = engine.named_weights()
# One ulp up on every element, as sparse patches (the codecs' form: positions + values).
patches, expected = {}, {}
for name, t in live.items():
    new = torch.nextafter(t, torch.full_like(t, float("inf")))
    expected[name] = checksum_tensor("xxh3_64", new)
    patches[name] = Patch(np.arange(t.numel(), dtype=np.int64), bits(new).reshape(-1).copy())
    del new
patch_kernels.warm_up()  # compiling the kernels is not the patch's memory

def status_kib(field):
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":"))

# Reset the peak to the current RSS, so building the patches (larger than the model)
# does not hide what the apply itself allocates under an earlier high-water mark.
with open("/proc/self/clear_refs", "w") as f:
    f.write("5")
before = status_kib("VmRSS")
undo = engine.apply_patches(patches, keep_undo=sys.argv[1] == "keep")
after = status_kib("VmHWM")
exact = all(checksum_tensor("xxh3_64", t) == expected[n] for n, t in engine.named_weights().items())
print(json.dumps({
    "grew_kib": after - before, "exact": exact, "undo_tensors": len(undo),
    "model_kib": sum(t.numel() * t.element_size() for t in live.values()) // 1024,
    "largest_kib": max(t.numel() * t.element_size() for t in live.values()) // 1024,
}))
"""


def _run(mode: str) -> dict[str, int]:
    out = subprocess.run(
        [sys.executable, "-c", CHILD, mode], check=False, capture_output=True, text=True,
        timeout=240,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr[-2000:]
    return dict(json.loads(out.stdout.strip().splitlines()[-1]))


def test_dense_delta_without_undo_grows_by_about_a_tensor_not_the_model() -> None:
    without = _run("drop")
    assert without["exact"] and without["undo_tensors"] == 0, without
    assert without["grew_kib"] < without["model_kib"] / 4, without
    # The same measure with the undo kept sees the second copy: it can fail.
    kept = _run("keep")
    assert kept["exact"] and kept["undo_tensors"] > 0, kept
    assert kept["grew_kib"] > kept["model_kib"] / 2, kept
