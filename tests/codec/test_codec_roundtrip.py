"""Every registered codec round-trips bit-exactly: random bits, special values, RL-like moves."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from _support.bit_patterns import DTYPES, random_bits, ulp_moves
from _support.bits import int_bits
from weightsync.codec import get_codec, list_codecs, wsdelta1
from weightsync.codec.base import Patch
from weightsync.codec.bits import bits
from weightsync.codec.change_sum import tensor_change_sum
from weightsync.codec.framing import TRAILER_BYTES, open_payload, seal
from weightsync.errors import PayloadCorruptError

CODECS = list_codecs()
SHAPES = st.one_of(
    st.tuples(st.integers(0, 700)),
    st.tuples(st.integers(0, 9), st.integers(0, 40)),
    st.tuples(st.integers(1, 3), st.integers(1, 5), st.integers(1, 7)),
    st.just(()),
)
HYPOTHESIS = settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def assert_round_trip(codec: str, old: torch.Tensor, new: torch.Tensor) -> bytes:
    impl = get_codec(codec)
    old_bits_before = int_bits(old).clone()
    payload = impl.encode(old, new)
    # encode_for_manifest: the same payload, the count of elements whose bits differ
    # and, where the codec adds it up, the change sum of the reference definition.
    encoded = impl.encode_for_manifest(old, new)
    assert encoded.payload == payload
    assert encoded.num_changed == int((int_bits(old) != int_bits(new)).sum())
    if encoded.change_sum is not None:
        assert encoded.change_sum == tensor_change_sum(bits(old).reshape(-1), bits(new).reshape(-1))
    out = impl.decode(payload, old)
    assert out.shape == new.shape and out.dtype == new.dtype
    assert torch.equal(int_bits(out), int_bits(new))
    assert torch.equal(int_bits(old), old_bits_before), "decode must not touch `old`"
    return payload


@pytest.mark.timeout(120)
@pytest.mark.parametrize("codec", CODECS)
@HYPOTHESIS
@given(
    dtype=st.sampled_from(DTYPES),
    shape=SHAPES,
    seed=st.integers(0, 2**32 - 1),
    specials=st.sampled_from([0.0, 0.3, 1.0]),
)
def test_random_bits_round_trip(
    codec: str, dtype: torch.dtype, shape: tuple[int, ...], seed: int, specials: float
) -> None:
    rng = np.random.default_rng(seed)
    old = random_bits(rng, dtype, shape, specials=specials)
    new = random_bits(rng, dtype, shape, specials=specials)
    assert_round_trip(codec, old, new)


@pytest.mark.timeout(120)
@pytest.mark.parametrize("codec", CODECS)
@HYPOTHESIS
@given(
    dtype=st.sampled_from(DTYPES),
    shape=SHAPES,
    seed=st.integers(0, 2**32 - 1),
    density=st.sampled_from([0.0, 0.001, 0.01, 0.05, 0.3, 1.0]),
)
def test_rl_like_moves_round_trip(
    codec: str, dtype: torch.dtype, shape: tuple[int, ...], seed: int, density: float
) -> None:
    rng = np.random.default_rng(seed)
    old = random_bits(rng, dtype, shape, specials=0.05)
    new = ulp_moves(rng, old, density=density)
    assert_round_trip(codec, old, new)


@pytest.mark.timeout(120)
@pytest.mark.parametrize("codec", CODECS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_multi_chunk_tensor_round_trips_in_place(codec: str, dtype: torch.dtype) -> None:
    """Larger than one wsdelta1 chunk (4M elements), decoded into the old buffer."""
    rng = np.random.default_rng(7)
    old = random_bits(rng, dtype, (4 * 2**20 + 12345,), specials=0.01)
    new = ulp_moves(rng, old, density=0.02)
    impl = get_codec(codec)
    payload = impl.encode(old, new)
    target = old.clone()
    out = impl.decode(payload, target, inplace=True)
    assert out.data_ptr() == target.data_ptr()
    assert torch.equal(int_bits(target), int_bits(new))


@pytest.mark.parametrize("codec", CODECS)
def test_patch_undo_restores_old_bits(codec: str) -> None:
    rng = np.random.default_rng(3)
    old = random_bits(rng, torch.bfloat16, (64, 33), specials=0.1)
    new = ulp_moves(rng, old, density=0.1)
    impl = get_codec(codec)
    target = old.clone()
    undo = impl.decode_patch(impl.encode(old, new), old).apply_(target)
    assert torch.equal(int_bits(target), int_bits(new))
    undo.apply_(target)
    assert torch.equal(int_bits(target), int_bits(old))


# arc_v1 is excluded: zlib tops out near 1000:1, so 200 KB of zeros take 217 bytes.
@pytest.mark.parametrize("codec", [c for c in CODECS if get_codec(c).needs_old and c != "arc_v1"])
def test_no_change_payload_is_tiny_and_patch_empty(codec: str) -> None:
    rng = np.random.default_rng(4)
    old = random_bits(rng, torch.bfloat16, (1000, 100), specials=0.0)
    payload = get_codec(codec).encode(old, old.clone())
    assert len(payload) < 200
    patch = get_codec(codec).decode_patch(payload, old)
    if patch.positions is not None:
        assert patch.num_changed == 0


def test_default_codec_patch_is_sparse_and_sorted() -> None:
    rng = np.random.default_rng(5)
    old = random_bits(rng, torch.bfloat16, (5 * 2**20,), specials=0.0)
    new = ulp_moves(rng, old, density=0.01)
    patch: Patch = get_codec("wsdelta1").decode_patch(get_codec("wsdelta1").encode(old, new), old)
    assert patch.positions is not None
    changed = np.flatnonzero(int_bits(old).numpy() != int_bits(new).numpy())
    assert np.array_equal(patch.positions, changed)
    assert patch.positions.dtype == np.int64


@pytest.mark.parametrize("codec", CODECS)
def test_encode_for_manifest_counts_across_chunks(codec: str) -> None:
    """A tensor longer than the codecs' and `count_changed`'s chunks (2**20 elements)."""
    from weightsync.codec.base import count_changed

    n = (1 << 21) + 12345
    old = torch.arange(n, dtype=torch.int32).to(torch.float32).to(torch.bfloat16)
    new = old.clone()
    flat = new.view(torch.int16)
    changed = torch.tensor([0, 7, 1 << 20, (1 << 20) + 1, n - 1])
    flat[changed] ^= 1
    assert count_changed(old, new) == len(changed)
    encoded = get_codec(codec).encode_for_manifest(old, new)
    assert encoded.num_changed == len(changed)
    assert torch.equal(int_bits(get_codec(codec).decode(encoded.payload, old)), int_bits(new))
    if encoded.change_sum is not None:
        assert encoded.change_sum == tensor_change_sum(bits(old), bits(new))


def mixed_tensors(rng: np.random.Generator) -> list[tuple[torch.Tensor, float]]:
    """Old tensors for a batch, each with the density to move it by: small and
    multi-chunk tensors, several dtypes, an empty one, an unchanged one, one changed
    everywhere."""
    cases = [
        (torch.bfloat16, (4 * 2**20 + 777,), 0.03),
        (torch.bfloat16, (64, 33), 0.2),
        (torch.float32, (1000,), 0.5),
        (torch.bfloat16, (0,), 0.0),
        (torch.float16, (300, 7), 0.0),
        (torch.bfloat16, (2**20 + 5,), 1.0),
    ]
    return [(random_bits(rng, dtype, shape, specials=0.01), d) for dtype, shape, d in cases]


@pytest.mark.timeout(120)
@pytest.mark.parametrize("codec", CODECS)
def test_encode_all_for_manifest_matches_each_tensor_alone(codec: str) -> None:
    """Many tensors at once (their chunks sharing the threads) give, in order, exactly
    the payloads, counts and change sums of encoding each on its own: small and
    multi-chunk tensors, several dtypes, an empty one and an unchanged one."""
    rng = np.random.default_rng(11)
    pairs = []
    for old, density in mixed_tensors(rng):
        pairs.append((old, ulp_moves(rng, old, density=density)))
    impl = get_codec(codec)
    together = impl.encode_all_for_manifest(pairs)
    assert len(together) == len(pairs)
    for (old, new), encoded in zip(pairs, together, strict=True):
        alone = impl.encode_for_manifest(old, new)
        assert encoded == alone
        assert torch.equal(int_bits(impl.decode(encoded.payload, old)), int_bits(new))
    assert impl.encode_all_for_manifest([]) == []


@pytest.mark.timeout(120)
@pytest.mark.parametrize("codec", CODECS)
def test_decode_all_matches_each_payload_alone(codec: str) -> None:
    """Many payloads at once (their chunks sharing the threads) give, in order, exactly
    the patches of decoding each on its own, in both forms."""
    rng = np.random.default_rng(12)
    impl = get_codec(codec)
    items = []
    for old, density in mixed_tensors(rng):
        items.append((impl.encode(old, ulp_moves(rng, old, density=density)), old))
    for compact in (False, True):
        together = impl.decode_all(items, compact=compact)
        assert len(together) == len(items)
        for (payload, old), patch in zip(items, together, strict=True):
            decode = impl.decode_compact if compact else impl.decode_patch
            alone = decode(payload, old)
            assert (patch.positions is None) == (alone.positions is None)
            if patch.positions is not None and alone.positions is not None:
                assert np.array_equal(patch.positions, alone.positions)
            assert np.array_equal(patch.values, alone.values)
    assert impl.decode_all([]) == []


@pytest.mark.timeout(60)
@pytest.mark.parametrize("codec", CODECS)
def test_decode_all_names_the_malformed_payload(codec: str) -> None:
    """A batch with one malformed payload (cut short) raises for that payload's index,
    whether its header or a chunk's streams are what breaks."""
    rng = np.random.default_rng(13)
    impl = get_codec(codec)
    olds = [random_bits(rng, torch.bfloat16, (3 * 2**20,), specials=0.0) for _ in range(3)]
    payloads = [impl.encode(old, ulp_moves(rng, old, density=0.05)) for old in olds]
    for cut in (len(payloads[1]) // 2, 8):
        broken = [payloads[0], payloads[1][:cut], payloads[2]]
        with pytest.raises(PayloadCorruptError) as raised:
            impl.decode_all(list(zip(broken, olds, strict=True)))
        assert raised.value.index == 1


@pytest.mark.timeout(60)
def test_wsdelta1_decode_all_names_the_payload_whose_chunk_fails() -> None:
    """A well-framed wsdelta1 payload whose first chunk claims one change too few fails
    while that chunk decodes (on the codec's threads), and is still named by index."""
    rng = np.random.default_rng(14)
    impl = get_codec("wsdelta1")
    olds = [random_bits(rng, torch.bfloat16, (2**20,), specials=0.0) for _ in range(3)]
    payloads = [impl.encode(old, ulp_moves(rng, old, density=0.05)) for old in olds]
    body = open_payload(payloads[2], wsdelta1.MAGIC, olds[2], wsdelta1.NAME)
    at = len(payloads[2]) - TRAILER_BYTES - len(body) + wsdelta1._COUNT.size + 2  # row 0's m
    content = bytearray(payloads[2][:-TRAILER_BYTES])
    count = int.from_bytes(content[at : at + 4], "little")
    content[at : at + 4] = (count - 1).to_bytes(4, "little")
    broken = [payloads[0], payloads[1], seal([bytes(content)])]
    with pytest.raises(PayloadCorruptError, match="stream error") as raised:
        impl.decode_all(list(zip(broken, olds, strict=True)))
    assert raised.value.index == 2
