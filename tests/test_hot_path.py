"""The aggregator's hot path after its one-pass rework: the same answers as the passes it replaced."""
from __future__ import annotations

import math

import numpy as np
import pytest

from edgetrain.aggregator import validation as v
from edgetrain.aggregator.aggregation import WeightedMean
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


def test_norm_is_bit_for_bit_the_float64_norm() -> None:
    vector = (np.random.default_rng(1).standard_normal(215_370) * 10.0 ** np.random.default_rng(2).uniform(
        -30, 30, 215_370)).astype(np.float32)
    valid = validate_update(_update(vector), topic_device="dev-1", ctx=_ctx(vector.size))
    vector64 = vector.astype(np.float64)
    assert valid.norm == math.sqrt(float(np.dot(vector64, vector64)))


def test_float64_copy_holds_exactly_the_float32_values_also_when_clipped() -> None:
    vector = np.random.default_rng(3).standard_normal(1000).astype(np.float32)
    plain = validate_update(_update(vector), topic_device="dev-1", ctx=_ctx(vector.size))
    assert plain.vector.dtype == np.float32 and plain.accumulable().dtype == np.float64
    np.testing.assert_array_equal(plain.accumulable(), plain.vector.astype(np.float64))
    clipped = validate_update(_update(vector), topic_device="dev-1", ctx=_ctx(vector.size, clip_norm=1.0))
    assert clipped.clipped
    np.testing.assert_array_equal(clipped.accumulable(), clipped.vector.astype(np.float64))


def test_accumulating_the_float64_copy_is_bit_for_bit_the_float32_accumulation() -> None:
    """WeightedMean.add on ``vector64`` gives the same float64 sums as on the float32 vector it widens,
    on magnitudes from 1e-38 to 1e38 and weights up to 2**28."""
    rng = np.random.default_rng(4)
    size = 50_000
    from_float32, from_float64 = WeightedMean(size), WeightedMean(size)
    for i, weight in enumerate((1, 7, 60_000, 2**28, 3)):
        vector = (rng.standard_normal(size) * 10.0 ** rng.uniform(-38, 38, size)).astype(np.float32)
        valid = validate_update(_update(vector, f"u-{i}"), topic_device="dev-1", ctx=_ctx(size))
        from_float32.add(valid.vector, weight)
        from_float64.add(valid.accumulable(), weight)
    np.testing.assert_array_equal(from_float64.weighted_sum, from_float32.weighted_sum)
    np.testing.assert_array_equal(from_float64.result(), from_float32.result())


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


# ---- accumulation error: BLAS daxpy into float64 against the exact sum ---------------------------

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
    np.testing.assert_array_equal(valid.accumulable(), vector.astype(np.float64))
