"""Deltas found next to the parameters: the same files, byte for byte, as a full host copy.

The reference is today's path written by hand: a full CPU copy of the live
weights at every save (`exported_weights`), encoded by `write_base` /
`write_delta` with the client's identity, session and timestamp, so every file
of both snapshots, the manifest included, must be the same bytes.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from _support.bits import assert_bits_equal, int_bits
from _support.training import model_step
from weightsync.errors import InvalidInputError, StorageError
from weightsync.snapshot import SnapshotStore, write_base, write_delta
from weightsync.storage import LocalStorage
from weightsync.toymodel import build_model
from weightsync.trainer import TrainingClient
from weightsync.trainer.device_diff import ChangeExporter
from weightsync.trainer.export import ExportBuffers, export_copy, hf_config, plan_export

pytestmark = pytest.mark.timeout(180)


class FailOnceStorage(LocalStorage):
    """Local storage whose next write fails once `arm()` is called."""

    armed = False

    def arm(self) -> None:
        self.armed = True

    def write_bytes(self, path: str, data: bytes | memoryview) -> None:
        if self.armed:
            self.armed = False
            raise StorageError(f"injected failure writing {self.child_url(path)}")
        super().write_bytes(path, data)


def _snapshot_files(root: Path, identity: str) -> dict[str, bytes]:
    folder = root / identity
    return {
        str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()
    }


class _Reference:
    """Today's full-copy path, written next to the client's snapshots for comparison."""

    def __init__(self, root: Path, client: TrainingClient) -> None:
        self.root = root
        self.client = client
        self.store = SnapshotStore(root)
        self.previous: dict[str, torch.Tensor] | None = None

    def write_like(self, identity: str, client_root: Path) -> None:
        client_manifest = SnapshotStore(client_root).read_manifest(identity)
        weights = self.client.exported_weights()  # a full CPU copy
        if client_manifest.kind == "base":
            write_base(
                self.root,
                identity,
                weights,
                config=hf_config(self.client.model, self.client.export_dtype),
                checksum_format=self.client.checksum_format,
                session_id=self.client.session_id,
                created_at=client_manifest.created_at,
            )
        else:
            assert self.previous is not None and client_manifest.parent is not None
            write_delta(
                self.root,
                identity,
                parent=self.store.read_manifest(client_manifest.parent),
                old=self.previous,
                new=weights,
                compression_format=self.client.compression_format,
                checksum_format=self.client.checksum_format,
                session_id=self.client.session_id,
                created_at=client_manifest.created_at,
            )
        self.previous = weights


@pytest.mark.parametrize("where", ["host", "device"])
@pytest.mark.parametrize("codec", ["arc_v2", "wsdelta1", "sparse-idx-val"])
def test_every_file_is_byte_identical_to_the_full_copy_path(
    tmp_path: Path, model: Any, optimizer: torch.optim.Optimizer, where: str, codec: str
) -> None:
    client = TrainingClient(
        model,
        storage=tmp_path / "client",
        optimizer=optimizer,
        compression_format=codec,
        previous_bits_device=where,
    )
    reference = _Reference(tmp_path / "reference", client)
    kinds = []
    for step in range(5):
        if step:
            model_step(model, optimizer, seed=step)
        # A base in the middle restarts the chain (and, on "device", the device copy).
        result = client.save_weights_for_sampler_ext(
            f"step-{step}", checkpoint_type="base" if step == 3 else None
        )
        kinds.append(result.kind)
        assert client.diff_location == where
        reference.write_like(result.snapshot_name, tmp_path / "client")
        ours = _snapshot_files(tmp_path / "client", result.snapshot_name)
        theirs = _snapshot_files(tmp_path / "reference", result.snapshot_name)
        assert sorted(ours) == sorted(theirs)
        for name, data in ours.items():
            assert data == theirs[name], f"{result.snapshot_name}/{name} differs"
        if result.kind == "delta":
            assert result.num_changed > 0
    assert kinds == ["base", "delta", "delta", "base", "delta"]


def test_a_failed_delta_leaves_the_chain_and_the_next_delta_is_still_exact(
    tmp_path: Path, model: Any, optimizer: torch.optim.Optimizer
) -> None:
    storage = FailOnceStorage(tmp_path / "client")
    client = TrainingClient(
        model, storage=storage, optimizer=optimizer, previous_bits_device="device"
    )
    client.save_weights_for_sampler_ext("base")
    model_step(model, optimizer, seed=1)
    client.save_weights_for_sampler_ext("d1")
    model_step(model, optimizer, seed=2)
    storage.arm()
    with pytest.raises(StorageError, match="injected failure"):
        client.save_weights_for_sampler_ext("d2")
    assert client.last_snapshot == f"d1-{client.session_id}"
    model_step(model, optimizer, seed=3)
    # Onto d1, not onto the bits of the failed save (which the device copy had moved to).
    result = client.save_weights_for_sampler_ext("d3")
    assert result.parent == f"d1-{client.session_id}"
    store = SnapshotStore(storage)
    assert_bits_equal(store.materialize(result.snapshot_name), client.exported_weights())


def test_the_exporter_finds_exactly_the_changed_bits_across_chunks(tmp_path: Path) -> None:
    """Chunks of 7 elements split every tensor unevenly; the host images match a full copy
    and the changes are exactly the differing bits ("device": the diff runs on the CPU)."""
    model = build_model("tiny", seed=0)
    sources = plan_export(model.state_dict().items(), what="tiny").sources
    for where in ("host", "device"):
        exporter = ChangeExporter(torch.bfloat16, previous_bits_device=where, chunk_elements=7)
        spare = ExportBuffers(torch.bfloat16)
        previous = export_copy(exporter.export_base(sources, spare), torch.bfloat16)
        exporter.committed()
        spare.release()
        for step in range(3):
            before = export_copy(sources, torch.bfloat16)
            with torch.no_grad():
                for i, tensor in enumerate(sources.values()):
                    flat = tensor.view(-1)
                    flat[(step + i) % flat.numel() :: 5] += 1e-2
            export = exporter.export_delta(sources, previous, spare)
            expected = export_copy(sources, torch.bfloat16)
            assert_bits_equal(export.tensors, expected)
            if where == "host":
                # CPU parameters, bits kept on the host: a straight cast copy, no diff.
                assert export.changes is None
                exporter.committed()
                spare.adopt(previous)
                previous = export.tensors
                continue
            assert export.changes is not None
            for name, changes in export.changes.items():
                differs = torch.nonzero(
                    int_bits(before[name]).view(-1) != int_bits(expected[name]).view(-1)
                )
                assert torch.equal(changes.positions, differs.view(-1)), name
                assert torch.equal(
                    changes.values, int_bits(expected[name]).view(-1)[differs.view(-1)]
                )
            assert export.num_changed > 0
            exporter.committed()
            # As the client does: the spare takes the old parent's buffers.
            spare.adopt(previous)
            previous = export.tensors


def test_auto_keeps_cpu_parameters_bits_on_the_host_and_bad_options_are_refused(
    tmp_path: Path, model: Any
) -> None:
    client = TrainingClient(model, storage=tmp_path)
    assert client.diff_location is None
    client.save_weights_for_sampler_ext("base")
    assert client.diff_location == "host"
    with pytest.raises(InvalidInputError, match="previous_bits_device must be one of auto"):
        TrainingClient(model, storage=tmp_path, previous_bits_device="gpu")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (none here)")
@pytest.mark.parametrize("where", ["host", "device"])
def test_a_cuda_model_writes_the_same_files_as_the_same_model_on_the_cpu(
    tmp_path: Path, where: str
) -> None:
    cpu_model = build_model("tiny", seed=0)
    cuda_model = build_model("tiny", seed=0).to("cuda")
    clients = [
        TrainingClient(cpu_model, storage=tmp_path / "cpu"),
        TrainingClient(cuda_model, storage=tmp_path / "cuda", previous_bits_device=where),
    ]
    generator = torch.Generator().manual_seed(0)
    for step in range(3):
        if step:
            noise = {
                n: torch.randn(p.shape, generator=generator) * 1e-2
                for n, p in cpu_model.named_parameters()
            }
            with torch.no_grad():
                for m in (cpu_model, cuda_model):
                    for n, p in m.named_parameters():
                        p.add_(noise[n].to(p.device))
        results = [c.save_weights_for_sampler_ext(f"s{step}") for c in clients]
        assert clients[1].diff_location == where
        cpu_files = _snapshot_files(tmp_path / "cpu", results[0].snapshot_name)
        cuda_files = _snapshot_files(tmp_path / "cuda", results[1].snapshot_name)
        weights = {n for n in cpu_files if n.endswith(".safetensors")}
        assert weights
        for name in weights:
            assert cpu_files[name] == cuda_files[name], name
