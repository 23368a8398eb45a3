"""Codec measurements: payload size against full bf16 and the entropy bound, and speed
against this machine's memcpy bandwidth measured in the same run.

Speeds are GB/s of the *tensor set's* bytes (what the sampler holds), so a codec
that skips unchanged data is credited for it; decoding includes applying the
patch in place, as a replica does. Timings are best-of-`repeats` wall clock.

Fireworks' formats are measured against their own implementation
(fireworks-delta-compression, the `fireworks` extra): `arc_v3`, which weightsync
only reads, is encoded by it; for every `arc_*` codec its decoder is timed too
(`reference_decode_s`), next to weightsync's.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch

from weightsync.codec import Codec, Patch, get_codec
from weightsync.codec.arc import fireworks_checksum
from weightsync.codec.bits import bits
from weightsync.codec.stats import change_stats
from weightsync.errors import UnsupportedOperationError

DEFAULT_THREADS = 2
# Densities (changed fraction) of the synthetic sweep: the ≤1.05x-of-bound target range.
SWEEP_DENSITIES: tuple[float, ...] = (0.001, 0.003, 0.01, 0.03, 0.07, 0.15, 0.3, 0.5)
# Weight scale of the synthetic tensors: Qwen3's initializer range.
_WEIGHT_STD = 0.02

TensorSet = Mapping[str, torch.Tensor]


@dataclass(frozen=True, kw_only=True)
class CodecMeasurement:
    """One codec on one (old, new) tensor set."""

    codec: str
    num_elements: int
    full_bytes: int
    payload_bytes: int
    encode_s: float
    decode_s: float
    lossless: bool
    #: Who encoded: "weightsync", or the format's reference implementation.
    encoder: str = "weightsync"
    #: fireworks-delta-compression decoding the same payloads (arc_* only), seconds.
    reference_decode_s: float | None = None

    @property
    def encode_gbps(self) -> float:
        return self.full_bytes / max(self.encode_s, 1e-9) / 1e9

    @property
    def decode_gbps(self) -> float:
        return self.full_bytes / max(self.decode_s, 1e-9) / 1e9

    @property
    def x_smaller(self) -> float:
        return self.full_bytes / max(self.payload_bytes, 1)

    @property
    def reference_decode_gbps(self) -> float | None:
        if self.reference_decode_s is None:
            return None
        return self.full_bytes / max(self.reference_decode_s, 1e-9) / 1e9

    def to_json(self) -> dict[str, Any]:
        return {
            **asdict(self),
            "encode_gbps": self.encode_gbps,
            "decode_gbps": self.decode_gbps,
            "reference_decode_gbps": self.reference_decode_gbps,
            "x_smaller": self.x_smaller,
        }


Encoder = Callable[[torch.Tensor, torch.Tensor], bytes]


def reference_encoder(codec: str) -> tuple[str, Encoder]:
    """Who encodes `codec` in the benchmark, and how: weightsync, or for a format it
    only reads, that format's own implementation (imported when needed)."""
    impl = get_codec(codec)
    if not impl.read_only:
        return "weightsync", impl.encode
    fdc = _fireworks_delta_compression(codec)

    def encode(old: torch.Tensor, new: torch.Tensor) -> bytes:
        payload, _ = fdc.delta_compress(src=old, dst=new, compression_format=codec)
        return bytes(payload.numpy().tobytes())

    return "fireworks-delta-compression", encode


def _fireworks_delta_compression(codec: str) -> Any:
    try:
        from fireworks_delta_compression import compression
    except ImportError as e:
        raise UnsupportedOperationError(
            f"measuring {codec} needs its reference implementation: pip install "
            "'weightsync[fireworks]' (fireworks-delta-compression)"
        ) from e
    return compression


def _reference_decode_s(
    codec: str, old: TensorSet, new: TensorSet, payloads: Mapping[str, bytes], repeats: int
) -> float | None:
    """fireworks-delta-compression decoding `payloads` (None if it is not installed)."""
    try:
        fdc = _fireworks_delta_compression(codec)
    except UnsupportedOperationError:
        return None
    checksums = {n: fireworks_checksum(bits(new[n])) for n in payloads}
    diffs = {n: torch.frombuffer(bytearray(p), dtype=torch.uint8) for n, p in payloads.items()}

    def decode_all() -> None:
        for n, diff in diffs.items():
            fdc.delta_decompress(
                src=old[n], compressed_diff=diff, checksum=checksums[n], compression_format=codec
            )

    return min(_timed(decode_all) for _ in range(max(1, repeats)))


def measure_memcpy_gbps(*, size_bytes: int = 256 * 2**20, repeats: int = 5) -> float:
    """This machine's single-stream memcpy bandwidth, GB/s (best of `repeats`)."""
    src = np.ones(size_bytes, dtype=np.uint8)
    dst = np.empty_like(src)
    np.copyto(dst, src)  # fault the pages in before timing
    best = min(_timed(lambda: np.copyto(dst, src)) for _ in range(repeats))
    return size_bytes / best / 1e9


def measure_codec(
    codec: str,
    old: TensorSet,
    new: TensorSet,
    *,
    threads: int = DEFAULT_THREADS,
    repeats: int = 1,
) -> CodecMeasurement:
    """Encode `new` against `old` tensor by tensor, decode and apply in place, check bits.

    Tensors are spread over `threads` worker threads (largest first); codecs that
    chunk a large tensor also run its chunks in parallel.
    """
    impl = get_codec(codec)
    encoder, encode = reference_encoder(codec)
    names = sorted(old, key=lambda name: -old[name].numel())
    full_bytes = sum(old[n].numel() * old[n].element_size() for n in names)
    if names:
        _warm_up(impl, encode, old[names[0]], new[names[0]])
    payloads: dict[str, bytes] = {}
    targets: dict[str, torch.Tensor] = {}

    def encode_one(n: str) -> bytes:
        return encode(old[n], new[n])

    def decode_one(n: str) -> Patch:
        return impl.decode_patch(payloads[n], old[n]).apply_(targets[n])

    with ThreadPoolExecutor(max_workers=max(1, threads)) as pool:

        def encode_all() -> None:
            payloads.update(zip(names, pool.map(encode_one, names), strict=True))

        encode_s = min(_timed(encode_all) for _ in range(max(1, repeats)))
        decode_s = float("inf")
        for _ in range(max(1, repeats)):
            targets.clear()
            targets.update({n: old[n].clone() for n in names})
            decode_s = min(decode_s, _timed(lambda: list(pool.map(decode_one, names))))
    lossless = all(np.array_equal(bits(targets[n]), bits(new[n])) for n in names)
    reference = None
    if impl.shard_layout == "fireworks":
        reference = _reference_decode_s(codec, old, new, payloads, repeats)
    return CodecMeasurement(
        codec=codec,
        num_elements=sum(old[n].numel() for n in names),
        full_bytes=full_bytes,
        payload_bytes=sum(len(p) for p in payloads.values()),
        encode_s=encode_s,
        decode_s=decode_s,
        lossless=lossless,
        encoder=encoder,
        reference_decode_s=reference,
    )


def synthetic_rl_update(
    num_elements: int, changed_fraction: float, *, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """A bf16 (old, new) pair changed like an RL step, at about `changed_fraction`.

    fp32 master weights ~ N(0, 0.02) move by ±lr (an Adam-like step of constant
    magnitude), both rounded to bf16; lr is searched so the bf16 changed fraction
    lands within 5 % of the target. Deterministic for a given seed: size ratios
    measured on it are reproducible.
    """
    rng = np.random.default_rng(seed)
    master = rng.normal(0.0, _WEIGHT_STD, num_elements).astype(np.float32)
    direction = np.where(rng.random(num_elements) < 0.5, -1.0, 1.0).astype(np.float32)
    old = torch.from_numpy(master).to(torch.bfloat16)
    sample = slice(0, min(num_elements, 1 << 20))

    def fraction(lr: float, where: slice) -> float:
        moved = torch.from_numpy(master[where] + np.float32(lr) * direction[where])
        return float(
            (moved.to(torch.bfloat16).view(torch.int16) != old[where].view(torch.int16))
            .float()
            .mean()
        )

    low, high = 1e-10, 1.0
    lr = 1e-6
    for _ in range(60):
        lr = (low * high) ** 0.5
        got = fraction(lr, sample)
        if abs(got - changed_fraction) <= 0.02 * changed_fraction:
            break
        low, high = (lr, high) if got < changed_fraction else (low, lr)
    new = torch.from_numpy(master + np.float32(lr) * direction).to(torch.bfloat16)
    return old, new


@dataclass(frozen=True, kw_only=True)
class SweepRow:
    """One codec on one synthetic density."""

    codec: str
    target_fraction: float
    changed_fraction: float
    one_step_fraction: float
    payload_bytes: int
    full_bytes: int
    bound_bytes: float

    @property
    def over_bound(self) -> float:
        return self.payload_bytes / max(self.bound_bytes, 1.0)

    @property
    def x_smaller(self) -> float:
        return self.full_bytes / max(self.payload_bytes, 1)

    def to_json(self) -> dict[str, Any]:
        return {**asdict(self), "over_bound": self.over_bound, "x_smaller": self.x_smaller}


def density_sweep(
    codecs: list[str],
    *,
    num_elements: int = 1 << 23,
    densities: tuple[float, ...] = SWEEP_DENSITIES,
    seed: int = 0,
) -> list[SweepRow]:
    """Payload size of each codec against the bound across synthetic densities."""
    rows = []
    for density in densities:
        old, new = synthetic_rl_update(num_elements, density, seed=seed)
        stats = change_stats(old, new)
        for name in codecs:
            payload = reference_encoder(name)[1](old, new)
            rows.append(
                SweepRow(
                    codec=name,
                    target_fraction=density,
                    changed_fraction=stats.changed_fraction,
                    one_step_fraction=stats.one_step_fraction,
                    payload_bytes=len(payload),
                    full_bytes=old.numel() * old.element_size(),
                    bound_bytes=stats.bound_bytes,
                )
            )
    return rows


def _warm_up(impl: Codec, encode: Encoder, old: torch.Tensor, new: torch.Tensor) -> None:
    """One small round trip, so JIT compilation or cache loading is not timed."""
    count = min(old.numel(), 4096)
    small_old, small_new = old.reshape(-1)[:count], new.reshape(-1)[:count]
    impl.decode(encode(small_old, small_new), small_old)


def _timed(func: Callable[[], object]) -> float:
    start = time.perf_counter()
    func()
    return time.perf_counter() - start
