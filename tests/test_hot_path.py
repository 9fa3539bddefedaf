"""The aggregator's hot path after its one-pass rework: the same answers as the passes it replaced."""
from __future__ import annotations

import math

import numpy as np
import pytest

from edgetrain.aggregator import validation as v
from edgetrain.aggregator.aggregation import BLOCK_UPDATES, WeightedMean
from edgetrain.aggregator.validation import ValidationContext, validate_update
from edgetrain.sdk.codecs import get_codec
from edgetrain.sdk.errors import UpdateRejected
from edgetrain.sdk.wire import Update

FLOAT32_MAX = float(np.finfo(np.float32).max)


def _update(vector: np.ndarray, update_id: str = "u-1", device: str = "dev-1", examples: int = 120) -> Update:
    payload, _ = get_codec("dense").encode(vector.astype(np.float32), None, {})
    return Update(device_id=device, round_id=1, model_version=1, update_id=update_id, num_examples=examples,
                  codec="dense", payload=payload, metrics={}, run_id="run")


def _ctx(size: int, **overrides: object) -> ValidationContext:
    fields: dict[str, object] = dict(round_id=1, model_version=1, selected=frozenset({"dev-1", "dev-2", "dev-3"}),
                                     num_params=size, run_id="run")
    fields.update(overrides)
    return ValidationContext(**fields)  # type: ignore[arg-type]


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
@pytest.mark.parametrize("where", [0, 777, 4095])
def test_one_non_finite_value_among_huge_finite_ones_is_rejected(bad: float, where: int) -> None:
    """The single float64 sum of squares is the finiteness check: it must see one bad value even next
    to values whose squares would overflow float32 (a NaN must not hide behind an Inf, nor Inf cancel)."""
    vector = np.full(4096, FLOAT32_MAX, dtype=np.float32)
    vector[1::2] = -FLOAT32_MAX
    vector[where] = bad
    with pytest.raises(UpdateRejected) as caught:
        validate_update(_update(vector), topic_device="dev-1", ctx=_ctx(4096))
    assert caught.value.reason == v.REJECT_NON_FINITE
    assert "1 NaN/Inf value(s)" in str(caught.value)


def test_largest_finite_values_are_accepted_with_the_float64_norm() -> None:
    vector = np.full(100_000, FLOAT32_MAX, dtype=np.float32)
    vector[::3] = -FLOAT32_MAX
    valid = validate_update(_update(vector), topic_device="dev-1", ctx=_ctx(vector.size))
    assert math.isfinite(valid.norm)
    assert valid.norm == float(np.linalg.norm(vector.astype(np.float64)))


def _float64_norm(vector: np.ndarray) -> float:
    vector64 = vector.astype(np.float64)
    return math.sqrt(float(np.dot(vector64, vector64)))


@pytest.mark.parametrize("scale", [1e-15, 1e-3, 1.0, 1e15])
def test_norm_is_the_float64_norm_to_float32_rounding(scale: float) -> None:
    """Inside float32's safe range the norm is one float32 BLAS dot: ~1e-7 from the float64 norm."""
    vector = (np.random.default_rng(1).standard_normal(215_370) * scale).astype(np.float32)
    valid = validate_update(_update(vector), topic_device="dev-1", ctx=_ctx(vector.size))
    assert valid.norm == pytest.approx(_float64_norm(vector), rel=2e-6)


@pytest.mark.parametrize("case", ["magnitudes_1e-30_to_1e30", "all_tiny", "one_tiny", "zeros", "norm_2**64"])
def test_norm_outside_float32_safe_range_is_bit_for_bit_the_float64_norm(case: str) -> None:
    """Where a float32 sum of squares could overflow (a square >= 2**128) or underflow (below n * 2**-126)
    the exact float64 sum decides, as before the float32 fast path."""
    size = 215_370
    rng = np.random.default_rng(1)
    vector = {
        "magnitudes_1e-30_to_1e30": rng.standard_normal(size) * 10.0 ** rng.uniform(-30, 30, size),
        "all_tiny": rng.standard_normal(size) * 1e-21,
        "one_tiny": np.where(np.arange(size) == 7, 3e-30, 0.0),
        "zeros": np.zeros(size),
        "norm_2**64": np.full(size, 2.0 ** 64 / math.sqrt(size)),
    }[case].astype(np.float32)
    valid = validate_update(_update(vector), topic_device="dev-1", ctx=_ctx(size))
    assert valid.norm == _float64_norm(vector)


def test_accumulable_is_the_float32_vector_itself_also_when_clipped() -> None:
    vector = np.random.default_rng(3).standard_normal(1000).astype(np.float32)
    plain = validate_update(_update(vector), topic_device="dev-1", ctx=_ctx(vector.size))
    assert plain.vector.dtype == np.float32 and plain.accumulable() is plain.vector
    clipped = validate_update(_update(vector), topic_device="dev-1", ctx=_ctx(vector.size, clip_norm=1.0))
    assert clipped.clipped and clipped.accumulable() is clipped.vector
    np.testing.assert_array_equal(clipped.vector, (vector.astype(np.float64) * (1.0 / plain.claimed_norm)).astype(
        np.float32))


def test_accumulable_is_widened_to_float64_where_float32_blocks_could_overflow() -> None:
    """An update with norm >= 2**64 reaches the accumulator as float64 (its exact values): 16 of them times
    weights up to 2**24 could pass float32's 3.4e38 in a float32 block."""
    vector = np.full(1000, 1e30, dtype=np.float32)
    valid = validate_update(_update(vector), topic_device="dev-1", ctx=_ctx(vector.size))
    assert valid.accumulable().dtype == np.float64
    np.testing.assert_array_equal(valid.accumulable(), vector.astype(np.float64))
    mean = WeightedMean(vector.size, block_updates=BLOCK_UPDATES)
    for _ in range(2 * BLOCK_UPDATES):
        mean.add(valid.accumulable(), float(1 << 24))
    assert np.isfinite(mean.weighted_sum).all()


def _exact_sums(terms: np.ndarray) -> np.ndarray:
    return np.array([math.fsum(terms[:, j]) for j in range(terms.shape[1])])


@pytest.mark.parametrize("updates", [1, 5, BLOCK_UPDATES, BLOCK_UPDATES + 1, 3 * BLOCK_UPDATES + 7])
def test_float32_block_sums_stay_within_the_block_rounding_bound(updates: int) -> None:
    """WeightedMean(block_updates=K) sums float32 updates with integer weights in float32 blocks of K: each
    entry within (K + 1) float32 roundings of the block's Σ|w·x| of the exact sum (w·x of an integer
    w < 2**24 and a float32 x is exact in float64, so math.fsum of the products is exact), signs mixed and
    magnitudes 1e-20..1e20, whether or not the last block is full (readers flush it)."""
    rng = np.random.default_rng(updates)
    size = 256
    mean = WeightedMean(size, block_updates=BLOCK_UPDATES)
    terms = np.empty((updates, size), dtype=np.float64)
    for i in range(updates):
        x = (rng.choice([-1.0, 1.0], size) * 10.0 ** rng.uniform(-20, 20, size)).astype(np.float32)
        weight = int(rng.integers(1, 1 << 20))
        mean.add(x, weight)
        terms[i] = x.astype(np.float64) * weight
    eps32 = float(np.finfo(np.float32).eps)
    bound = (BLOCK_UPDATES + 1) * eps32 * np.abs(terms).sum(axis=0)
    error = np.abs(mean.weighted_sum - _exact_sums(terms))
    assert (error <= bound).all(), f"worst error/bound {float((error / bound).max()):.3g}"
    assert mean.count == updates


def test_float32_blocks_typical_error_is_about_1e_7() -> None:
    """Updates like a model's deltas (same scale, random signs): the block sums' relative error (to
    Σ|w·x|) is a few 1e-8 at the median, and the float64 path's is ~1e-16."""
    rng = np.random.default_rng(7)
    size, updates = 4096, 64
    blocked, exact = WeightedMean(size, block_updates=BLOCK_UPDATES), WeightedMean(size)
    terms = np.empty((updates, size))
    for i in range(updates):
        x = (rng.standard_normal(size) * 1e-2).astype(np.float32)
        weight = int(rng.integers(50, 600))
        blocked.add(x, weight)
        exact.add(x, weight)
        terms[i] = x.astype(np.float64) * weight
    scale = np.abs(terms).sum(axis=0)
    truth = _exact_sums(terms)
    assert float(np.median(np.abs(blocked.weighted_sum - truth) / scale)) < 1e-7
    assert float(np.max(np.abs(blocked.weighted_sum - truth) / scale)) < 1e-6
    assert float(np.max(np.abs(exact.weighted_sum - truth) / scale)) < 1e-14


def test_float32_blocks_leave_other_adds_exact() -> None:
    """float64 vectors, non-integer weights and weights above 2**24 go straight into the float64 sums: the
    same sums as a WeightedMean without blocks, bit for bit; blocks are off by default."""
    rng = np.random.default_rng(4)
    size = 1000
    blocked, plain = WeightedMean(size, block_updates=BLOCK_UPDATES), WeightedMean(size)
    assert plain.block_updates == 0
    for i, weight in enumerate((0.5, 1 / 3, 2.0 ** 25, 7.25)):
        x = rng.standard_normal(size).astype(np.float32)
        blocked.add(x if i % 2 else x.astype(np.float64), weight)
        plain.add(x if i % 2 else x.astype(np.float64), weight)
    np.testing.assert_array_equal(blocked.weighted_sum, plain.weighted_sum)
    np.testing.assert_array_equal(blocked.result(), plain.result())


def test_merge_and_result_see_an_unflushed_block() -> None:
    rng = np.random.default_rng(5)
    size = 64
    vectors = [rng.standard_normal(size).astype(np.float32) for _ in range(5)]
    left, right = WeightedMean(size, block_updates=BLOCK_UPDATES), WeightedMean(size, block_updates=BLOCK_UPDATES)
    for i, x in enumerate(vectors):
        (left if i < 3 else right).add(x, i + 1)
    left.merge(right)
    expected = sum(x.astype(np.float64) * (i + 1) for i, x in enumerate(vectors))
    scale = sum(np.abs(x.astype(np.float64)) * (i + 1) for i, x in enumerate(vectors))  # Σ|w·x|: sums cancel
    assert (np.abs(left.weighted_sum - expected) <= 1e-6 * scale).all()
    assert (np.abs(left.result() - expected / 15.0) <= 1e-6 * scale / 15.0).all()
    assert left.count == 5 and left.total_weight == 15.0


# ---- sketch decode: the in-place Walsh-Hadamard transform and the within-byte unpacking ---------

@pytest.mark.parametrize("n", [1, 2, 4, 32, 64, 256, 1024])
def test_walsh_hadamard_equals_the_dense_hadamard_matrix(n: int) -> None:
    from edgetrain.sdk.codecs.hadamard import _hadamard_matrix, walsh_hadamard

    rows = np.random.default_rng(n).standard_normal((3, n)).astype(np.float32)
    expected = rows.astype(np.float64) @ _hadamard_matrix(n).astype(np.float64) / math.sqrt(n)
    np.testing.assert_allclose(walsh_hadamard(rows), expected, rtol=1e-5, atol=1e-5 * math.sqrt(n))


def test_walsh_hadamard_leaves_its_input_alone_and_is_its_own_inverse() -> None:
    from edgetrain.sdk.codecs.hadamard import walsh_hadamard

    rows = np.random.default_rng(9).standard_normal((2, 1 << 16)).astype(np.float32)
    before = rows.copy()
    once = walsh_hadamard(rows)
    np.testing.assert_array_equal(rows, before)
    np.testing.assert_allclose(walsh_hadamard(once), rows, atol=1e-5)


@pytest.mark.parametrize("width", [1, 2, 4])
@pytest.mark.parametrize("count", [0, 1, 5, 8, 9, 1001])
def test_unpack_within_bytes_round_trips_and_refuses_padding_bits(width: int, count: int) -> None:
    from edgetrain.sdk.codecs.bitio import pack_uint, unpack_uint
    from edgetrain.sdk.errors import WireError

    values = np.random.default_rng(count).integers(0, 1 << width, count)
    packed = pack_uint(values, width)
    unpacked = unpack_uint(memoryview(packed), width, count)
    assert unpacked.dtype == np.uint64
    np.testing.assert_array_equal(unpacked, values)
    if (count * width) % 8:
        corrupt = bytearray(packed)
        corrupt[-1] |= 1  # the last bit is padding
        with pytest.raises(WireError, match="padding"):
            unpack_uint(bytes(corrupt), width, count)


# ---- accumulation error without blocks: BLAS daxpy into float64 against the exact sum ---------------------------

def test_weighted_sum_error_is_bounded_on_adversarial_magnitudes_and_many_updates() -> None:
    """Σw·x over 400 updates whose entries span 1e-30..1e30 with both signs (so sums cancel): each
    entry's error is within the recursive-summation bound n·eps64·Σ|w·x| of the exact sum. The products
    w·x (integer w < 2**24, float32 x) are exact in float64, so math.fsum of them is the exact sum."""
    rng = np.random.default_rng(11)
    size, updates = 64, 400
    mean = WeightedMean(size)
    terms = np.empty((updates, size), dtype=np.float64)
    for i in range(updates):
        x = (rng.choice([-1.0, 1.0], size) * 10.0 ** rng.uniform(-30, 30, size)).astype(np.float32)
        weight = int(rng.integers(1, 1 << 20))
        mean.add(x if i % 2 else x.astype(np.float64), weight)  # both input dtypes take the same path
        terms[i] = x.astype(np.float64) * weight
    exact = np.array([math.fsum(terms[:, j]) for j in range(size)])
    bound = updates * np.finfo(np.float64).eps * np.abs(terms).sum(axis=0)
    error = np.abs(mean.weighted_sum - exact)
    assert (error <= bound).all(), f"worst error/bound {float((error / bound).max()):.3g}"
    # and no worse than the numpy two-pass float64 accumulation it replaced, in the same units
    naive = np.zeros(size)
    for row in terms:
        naive += row
    assert (np.abs(naive - exact) <= bound).all()


# ---- no payload copies: the frame's bytes are the payload's bytes ---------------------------------

def test_update_payload_is_a_view_of_an_immutable_frame_not_a_copy() -> None:
    from edgetrain.sdk import wire

    vector = np.arange(1000, dtype=np.float32)
    frame = wire.encode(_update(vector))
    decoded = wire.decode(frame)
    assert np.shares_memory(np.frombuffer(decoded.payload, np.uint8), np.frombuffer(frame, np.uint8))
    assert bytes(decoded.payload) == get_codec("dense").encode(vector, None, {})[0]


def test_payload_of_a_mutable_frame_is_copied_so_later_writes_cannot_change_it() -> None:
    from edgetrain.sdk import wire

    frame = bytearray(wire.encode(_update(np.ones(100, dtype=np.float32))))
    decoded = wire.decode(frame)
    before = bytes(decoded.payload)
    frame[-40:-4] = bytes(36)  # inside the payload, after the checksum was verified
    assert bytes(decoded.payload) == before


def test_dense_validation_reads_the_frame_without_copying_the_payload() -> None:
    from edgetrain.sdk import wire

    vector = np.random.default_rng(5).standard_normal(4096).astype(np.float32)
    frame = wire.encode(_update(vector))
    valid = validate_update(wire.decode(frame), topic_device="dev-1", ctx=_ctx(vector.size))
    assert np.shares_memory(valid.vector, np.frombuffer(frame, np.uint8))
    assert not valid.vector.flags.writeable  # nobody can write through it into the frame
    np.testing.assert_array_equal(valid.vector, vector)
    assert valid.accumulable() is valid.vector  # and the accumulator reads it in place too
