"""The torch engine's device path: patches written in place with torch ops, streamed checksums.

On the CPU the torch-op writer (what runs on CUDA) is compared bit for bit with the
numpy kernels; the CUDA tests run only where torch sees a device.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import torch

from _support.engine_steps import PROMPT, RecordingGuard
from _support.models import snapshot_tensors
from weightsync.codec import Patch, checksum_tensor, get_codec, list_checksums
from weightsync.errors import InvalidInputError
from weightsync.server.config import ReplicaConfig
from weightsync.server.engines.base import GenerateRequest
from weightsync.server.engines.torch_device import (
    device_checksum,
    resolve_engine_device,
    write_on_device,
)
from weightsync.server.engines.torch_engine import TorchEngine

needs_cuda = pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs a CUDA device (none here)"
)


def _int_bits(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view({1: torch.uint8, 2: torch.int16, 4: torch.int32}[t.element_size()])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32, torch.float8_e4m3fn])
@pytest.mark.parametrize("dense", [False, True])
def test_the_torch_op_writer_equals_the_numpy_kernels_in_place(
    dtype: torch.dtype, dense: bool
) -> None:
    generator = torch.Generator().manual_seed(3)
    old = torch.randn(64, 33, generator=generator).to(dtype)
    new = old.clone()
    flat = new.view(-1)
    picked = torch.randperm(flat.numel(), generator=generator)[:300]
    flat[picked] = torch.randn(300, generator=generator).to(dtype)
    patch = get_codec("sparse-idx-val" if not dense else "full").decode_patch(
        get_codec("sparse-idx-val" if not dense else "full").encode(old, new), old
    )
    assert (patch.positions is None) == dense
    by_numpy = old.clone()
    patch.apply_(by_numpy)
    by_torch = old.clone()
    address = by_torch.data_ptr()
    write_on_device(patch, by_torch)
    assert by_torch.data_ptr() == address  # the same storage: written in place
    assert torch.equal(_int_bits(by_torch), _int_bits(by_numpy))
    assert torch.equal(_int_bits(by_torch), _int_bits(new))


@pytest.mark.parametrize("checksum_format", list_checksums())
def test_streamed_checksums_equal_the_whole_tensor_checksum(checksum_format: str) -> None:
    tensor = torch.randn(1000, 7, generator=torch.Generator().manual_seed(0)).to(torch.bfloat16)
    expected = checksum_tensor(checksum_format, tensor)
    # 998 bytes: chunks that split the tensor unevenly.
    assert device_checksum(checksum_format, tensor, chunk_bytes=998) == expected
    tensor.view(-1)[5] += 1
    assert device_checksum(checksum_format, tensor, chunk_bytes=998) != expected


def test_a_cpu_engine_patches_its_parameters_in_their_own_storage(model: Any) -> None:
    engine = TorchEngine(cache_block_tokens=4, device="cpu")
    engine.load_base(model.config.to_dict(), snapshot_tensors(model))
    live = engine.named_weights()
    addresses = {n: t.data_ptr() for n, t in live.items()}
    name = next(iter(live))
    values = np.asarray(_int_bits(live[name]).view(-1)[:4].numpy() ^ 1).view(np.uint16)
    engine.apply_patches({name: Patch(np.arange(4, dtype=np.int64), values)})
    after = engine.named_weights()
    assert {n: t.data_ptr() for n, t in after.items()} == addresses
    assert np.array_equal(_int_bits(after[name]).view(-1)[:4].numpy().view(np.uint16), values)


def test_the_device_option_is_checked_and_reaches_only_the_torch_engine(tmp_path: Any) -> None:
    assert resolve_engine_device("cpu") == torch.device("cpu")
    assert resolve_engine_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    with pytest.raises(InvalidInputError, match="must be one of cpu, cuda, auto"):
        resolve_engine_device("tpu")
    if not torch.cuda.is_available():
        with pytest.raises(InvalidInputError, match="no CUDA device"):
            TorchEngine(device="cuda")
    model_dir = tmp_path / "m"
    model_dir.mkdir()
    config = ReplicaConfig(model_dir=model_dir, device="auto")
    assert config.engine_kwargs == {"device": "auto"}
    assert ReplicaConfig(model_dir=model_dir).engine_kwargs == {}
    with pytest.raises(InvalidInputError, match="option of the torch engine"):
        ReplicaConfig(model_dir=model_dir, engine="vllm", device="cuda")
    with pytest.raises(InvalidInputError, match="unknown device 'gpu'"):
        ReplicaConfig(model_dir=model_dir, device="gpu")  # type: ignore[arg-type]


@needs_cuda
def test_a_cuda_engine_patches_in_place_and_serves_what_the_cpu_engine_serves(model: Any) -> None:
    tensors = snapshot_tensors(model)
    generator = torch.Generator().manual_seed(5)
    new = {
        n: (t.float() + 0.05 * torch.randn(t.shape, generator=generator)).to(t.dtype)
        for n, t in tensors.items()
    }
    codec = get_codec("wsdelta1")
    engines = [TorchEngine(cache_block_tokens=4, device=d) for d in ("cpu", "cuda")]
    for engine in engines:
        engine.load_base(model.config.to_dict(), tensors)
    cuda = engines[1]
    device_weights = cuda._require_loaded().weights  # the parameters themselves
    addresses = {n: t.data_ptr() for n, t in device_weights.items()}
    assert all(t.is_cuda for t in device_weights.values())
    for engine in engines:
        patches = {
            n: codec.decode_patch(codec.encode(tensors[n], new[n]), engine.named_weights()[n])
            for n in tensors
        }
        engine.apply_patches(patches)
    assert {n: t.data_ptr() for n, t in device_weights.items()} == addresses
    for n, t in device_weights.items():
        assert torch.equal(_int_bits(t.cpu()), _int_bits(new[n])), n
    assert cuda.weights_checksums("xxh3_64") == engines[0].weights_checksums("xxh3_64")
    request = GenerateRequest(prompt_token_ids=PROMPT, max_tokens=6, temperature=0.0)
    outputs = [e.generate(request, step_guard=RecordingGuard()).token_ids for e in engines]
    assert len(outputs[1]) == 6
