"""Value codecs: fp16 is exact on fp16 values; q8, sketch and random_mask are unbiased
(E[decode] = x, checked statistically) and their payloads have the sizes their headers imply."""
from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from edgetrain.sdk.codecs import get_codec
from edgetrain.sdk.codecs.bitio import packed_size
from edgetrain.sdk.codecs.sketch import seeded_mask
from edgetrain.sdk.errors import WireError


@settings(max_examples=60, deadline=None)
@given(hnp.arrays(np.float16, st.integers(0, 200)))
def test_fp16_is_bit_exact_on_fp16_values(halves: np.ndarray) -> None:
    codec = get_codec("fp16")
    vector = halves.astype(np.float32)
    data, _ = codec.encode(vector, None, {})
    assert len(data) == 2 * vector.size
    decoded = codec.decode(data, vector.size, {})
    assert np.array_equal(decoded.astype(np.float16).view(np.uint16), halves.view(np.uint16))
    assert np.array_equal(decoded, vector, equal_nan=True)


def test_fp16_refuses_values_it_would_turn_into_inf() -> None:
    with pytest.raises(WireError, match="exceeds fp16"):
        get_codec("fp16").encode(np.array([1.0, 7e4], dtype=np.float32), None, {})


def _mean_of_decodes(name: str, vector: np.ndarray, params: dict, repeats: int) -> tuple[np.ndarray, np.ndarray]:
    codec = get_codec(name)
    decodes = np.stack([codec.decode(codec.encode(vector, None, {**params, "seed": seed})[0], vector.size, params)
                        for seed in range(repeats)]).astype(np.float64)
    return decodes.mean(axis=0), decodes.std(axis=0, ddof=1) / np.sqrt(repeats)


def _assert_unbiased(mean: np.ndarray, stderr: np.ndarray, vector: np.ndarray, rounding: float = 1e-6) -> None:
    # 5 standard errors per coordinate plus the codec's deterministic rounding (float32, or fp16
    # for values that travel in half precision): a false alarm is ~1e-6 per entry.
    slack = rounding * np.abs(vector).max()
    assert np.all(np.abs(mean - vector) <= 5 * stderr + slack), np.abs(mean - vector).max()


@pytest.mark.parametrize(
    ("name", "params"),
    [("q8", {"block": 16}), ("sketch", {"bits": 1, "block": 32}), ("sketch", {"bits": 3, "keep": 0.5, "block": 16}),
     ("sketch", {"bits": 2, "rotate": False}), ("random_mask", {"keep": 0.3, "values": "fp32"}),
     ("low_rank", {"rank": 2, "shapes": "5x8;5"}), ("low_rank", {"rank": 3, "shapes": "4x2x5;5"})],
)
def test_stochastic_codecs_are_unbiased(name: str, params: dict) -> None:
    vector = np.random.default_rng(3).standard_normal(45).astype(np.float32)  # 45: not a power of two
    mean, stderr = _mean_of_decodes(name, vector, params, repeats=1500)
    _assert_unbiased(mean, stderr, vector, rounding=4e-3 if name == "low_rank" else 1e-6)  # low_rank sends fp16
    assert stderr.max() > 0  # the codec really is random, or the check above would be vacuous


def test_the_unbiasedness_check_catches_deterministic_rounding() -> None:
    vector = np.random.default_rng(4).standard_normal(45).astype(np.float32)
    mean, stderr = _mean_of_decodes("q8", vector, {"block": 16, "stochastic": False}, repeats=20)
    assert not np.all(np.abs(mean - vector) <= 5 * stderr + 1e-6 * np.abs(vector).max())
    step = (vector.max() - vector.min()) / 255
    assert np.abs(mean - vector).max() <= step / 2 + 1e-6  # nearest rounding: within half a level


def test_q8_payload_size_and_error() -> None:
    vector = np.random.default_rng(5).standard_normal(10_000).astype(np.float32)
    codec = get_codec("q8")
    data, _ = codec.encode(vector, None, {"block": 1024})
    assert len(data) == 5 + 8 * 10 + 10_000
    decoded = codec.decode(data, vector.size, {})
    assert np.linalg.norm(decoded - vector) / np.linalg.norm(vector) < 0.02


@pytest.mark.parametrize(("bits", "keep", "block"), [(1, 1.0, 64), (4, 0.25, 128), (8, 0.7, 1 << 16)])
def test_sketch_payload_size_is_exact(bits: int, keep: float, block: int) -> None:
    size = 1000
    codec = get_codec("sketch")
    params = {"bits": bits, "keep": keep, "block": block, "seed": 7}
    data, _ = codec.encode(np.ones(size, dtype=np.float32), None, params)
    kept = seeded_mask(7, size, keep).size
    assert (kept == size) if keep == 1.0 else abs(kept - keep * size) < 5 * np.sqrt(size * keep * (1 - keep))
    full, tail = divmod(kept, block)
    padded = 1 << (tail - 1).bit_length() if tail else 0
    assert len(data) == 20 + 8 * (full + (tail > 0)) + packed_size(full * block + padded, bits)
    account = codec.account(data, size)
    assert account.total_bits == 8 * len(data) and account.index_bits == 64


def test_sketch_with_8_bits_and_rotation_is_accurate() -> None:
    vector = np.random.default_rng(6).standard_normal(5000).astype(np.float32)
    codec = get_codec("sketch")
    decoded = codec.decode(codec.encode(vector, None, {"bits": 8, "block": 1024})[0], vector.size, {})
    assert np.linalg.norm(decoded - vector) / np.linalg.norm(vector) < 0.03


def test_rotation_helps_a_spiky_vector() -> None:
    vector = np.zeros(4096, dtype=np.float32)
    vector[::512] = 100.0  # energy in a few entries: min-max quantisation without rotation wastes its levels
    vector += np.random.default_rng(8).standard_normal(4096).astype(np.float32)
    codec = get_codec("sketch")

    def error(rotate: bool) -> float:
        decoded = codec.decode(codec.encode(vector, None, {"bits": 2, "rotate": rotate, "seed": 1})[0], 4096, {})
        return float(np.linalg.norm(decoded - vector))

    assert error(True) < 0.5 * error(False)


def test_random_mask_keeps_about_keep_and_rescales() -> None:
    vector = np.full(20_000, 2.0, dtype=np.float32)
    codec = get_codec("random_mask")
    decoded = codec.decode(codec.encode(vector, None, {"keep": 0.25, "seed": 3})[0], vector.size, {})
    kept = decoded != 0
    assert abs(kept.mean() - 0.25) < 0.02
    assert np.all(decoded[kept] == 8.0)  # 2 / 0.25, so the mean is preserved


def test_low_rank_sends_rank_times_short_side_per_matrix() -> None:
    codec = get_codec("low_rank")
    vector = np.random.default_rng(9).standard_normal(300 * 40 + 300 + 7 * 3).astype(np.float32)
    data, _ = codec.encode(vector, None, {"rank": 4, "shapes": "300x40;300;3x7", "seed": 1})
    header_and_shapes = 13 + (1 + 8) + (1 + 4) + (1 + 8)
    # 300x40 -> 4 x 40 values; the bias as is; 3x7 has short side 3 <= rank, so as is.
    assert len(data) == header_and_shapes + (1 + 2 * 4 * 40) + (1 + 2 * 300) + (1 + 2 * 21)
    decoded = codec.decode(data, vector.size, {})
    np.testing.assert_allclose(decoded[12000:], vector[12000:], rtol=1e-3, atol=1e-3)  # fp16 of the rest
    assert codec.account(data, vector.size).total_bits == 8 * len(data)
