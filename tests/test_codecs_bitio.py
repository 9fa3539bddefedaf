"""Lossless building blocks of the compact codecs: bit packing, Golomb-Rice, sparse positions,
and the entropy bounds the benchmark compares against."""
from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from edgetrain.sdk.codecs.bitio import (
    best_rice_parameter,
    best_rice_parameters,
    decode_positions,
    encode_positions,
    pack_uint,
    pack_varwidth,
    packed_size,
    rice_bits,
    rice_decode,
    rice_encode,
    rice_parameter_for_density,
    unpack_uint,
    unpack_uint8,
    unpack_varwidth,
)
from edgetrain.sdk.codecs.entropy import empirical_entropy_bits, index_set_bound_bits
from edgetrain.sdk.errors import WireError


@settings(max_examples=150, deadline=None)
@given(st.integers(1, 40).flatmap(lambda w: st.tuples(st.just(w), st.lists(st.integers(0, (1 << w) - 1), max_size=80))))
def test_pack_uint_round_trips_and_has_exact_size(case: tuple[int, list[int]]) -> None:
    width, values = case
    array = np.array(values, dtype=np.uint64)
    data = pack_uint(array, width)
    assert len(data) == packed_size(len(values), width) == math.ceil(len(values) * width / 8)
    assert unpack_uint(data, width, len(values)).tolist() == values


def test_pack_uint_is_msb_first() -> None:
    assert pack_uint(np.array([1, 0, 1, 1, 0, 0, 0, 1]), 1) == bytes([0b10110001])
    assert pack_uint(np.array([0b101, 0b011]), 3) == bytes([0b10101100])
    assert pack_uint(np.array([3, 0, 2]), 2) == bytes([0b11001000])


def test_unpack_uint_refuses_wrong_length_and_dirty_padding() -> None:
    with pytest.raises(WireError, match="bytes for 6 values"):
        unpack_uint(b"\x00\x00", 3, 6)
    with pytest.raises(WireError, match="padding"):
        unpack_uint(bytes([0b10101101]), 3, 2)  # the last 2 bits must be zero


@settings(max_examples=150, deadline=None)
@given(st.integers(0, 30).flatmap(
    # Quotients stay below 2**7 so the unary part (one bit per unit of quotient) stays small.
    lambda k: st.tuples(st.lists(st.integers(0, (1 << (k + 7)) - 1), max_size=60), st.just(k))))
def test_rice_round_trips_for_any_parameter(case: tuple[list[int], int]) -> None:
    values, parameter = case
    array = np.array(values, dtype=np.uint64)
    data = rice_encode(array, parameter)
    assert len(data) == packed_size(len(values), parameter) + (
        math.ceil((sum(v >> parameter for v in values) + len(values)) / 8))
    decoded, end = rice_decode(data + b"tail", 0, parameter, len(values))
    assert decoded.tolist() == values
    assert end == len(data)  # self-delimiting: the trailing bytes are left for the next field


@settings(max_examples=100, deadline=None)
@given(st.lists(st.integers(0, 40).flatmap(lambda k: st.tuples(st.integers(0, (1 << (k + 5)) - 1), st.just(k))),
                max_size=80))
def test_rice_with_a_parameter_per_value_round_trips(pairs: list[tuple[int, int]]) -> None:
    values = np.array([v for v, _ in pairs], dtype=np.uint64)
    parameters = np.array([k for _, k in pairs], dtype=np.uint64)
    data = rice_encode(values, parameters)
    decoded, end = rice_decode(data, 0, parameters, len(pairs))
    assert decoded.tolist() == values.tolist() and end == len(data)
    widths = np.array([k for _, k in pairs], dtype=np.int64)
    masked = values & ((np.uint64(1) << parameters) - np.uint64(1))
    packed = pack_varwidth(masked, widths)
    assert len(packed) == math.ceil(widths.sum() / 8)
    assert unpack_varwidth(packed, widths).tolist() == masked.tolist()


def test_rice_code_bits_are_the_textbook_ones() -> None:
    # k=2: 9 = q 2, r 01 -> remainders "01", unary "001"; 2 = q 0, r 10 -> "10", "1".
    assert rice_encode(np.array([9, 2], dtype=np.uint64), 2) == bytes([0b01100000, 0b00110000])


def test_best_rice_parameter_is_optimal_and_beats_the_density_formula() -> None:
    rng = np.random.default_rng(1)
    for density in (0.5, 0.1, 0.01, 0.001):
        gaps = rng.geometric(density, size=2000).astype(np.uint64) - 1
        best = best_rice_parameter(gaps)
        costs = [rice_bits(gaps, k) for k in range(30)]
        assert costs[best] == min(costs)
        formula = rice_parameter_for_density(density)
        assert abs(formula - best) <= 1  # the closed form lands next to the searched optimum
        # Rice on geometric gaps stays within ~3% of the entropy of the index set.
        assert costs[best] <= 1.05 * index_set_bound_bits(int(gaps.sum()) + gaps.size, gaps.size) + 64


def test_adaptive_rice_follows_clustered_positions_below_the_uniform_bound() -> None:
    rng = np.random.default_rng(9)
    size = 200_000
    uniform = np.sort(rng.choice(size, 2000, replace=False))
    # Clustered like real top-k sets: dense in a few stretches, sparse elsewhere.
    dense_part = rng.choice(np.arange(50_000, 60_000), 1500, replace=False)
    clustered = np.sort(np.concatenate([dense_part, rng.choice(np.arange(60_000, size), 500, replace=False)]))
    bound = index_set_bound_bits(size, 2000)
    uniform_bits = 8 * len(encode_positions(uniform, size))
    clustered_bits = 8 * len(encode_positions(clustered, size))
    assert bound < uniform_bits < 1.04 * bound  # a few % over the bound, run parameters included
    assert clustered_bits < 0.8 * bound
    gaps = np.diff(clustered, prepend=-1) - 1
    assert best_rice_parameters(gaps).size == math.ceil(2000 / 32)
    assert clustered_bits < rice_bits(gaps, best_rice_parameter(gaps))  # adapting beats one parameter


@settings(max_examples=100, deadline=None)
@given(st.integers(1, 5000).flatmap(lambda n: st.tuples(st.just(n), st.sets(st.integers(0, n - 1), max_size=200))))
def test_positions_round_trip(case: tuple[int, set[int]]) -> None:
    size, chosen = case
    positions = np.array(sorted(chosen), dtype=np.int64)
    data = encode_positions(positions, size)
    decoded, end = decode_positions(data, 0, size)
    assert decoded.tolist() == positions.tolist() and end == len(data)


def test_positions_refuse_indices_past_the_vector() -> None:
    data = encode_positions(np.array([3, 9]), 10)
    with pytest.raises(WireError, match="outside|past"):
        decode_positions(data, 0, 9)
    with pytest.raises(WireError):
        encode_positions(np.array([5, 5]), 10)


def test_index_set_bound_matches_log_binomial() -> None:
    for n, k in [(10, 0), (10, 3), (64, 32), (1000, 7)]:
        assert index_set_bound_bits(n, k) == pytest.approx(math.log2(math.comb(n, k)), abs=1e-6)


def test_empirical_entropy() -> None:
    assert empirical_entropy_bits(np.array([1, 1, 1, 1])) == 0.0
    assert empirical_entropy_bits(np.array([0, 1, 2, 3] * 5)) == pytest.approx(2.0 * 20)
    assert empirical_entropy_bits(np.array([0, 0, 0, 1])) == pytest.approx(4 * (-(0.75 * math.log2(0.75)
                                                                                  + 0.25 * math.log2(0.25))))


@pytest.mark.parametrize("width", range(1, 9))
def test_unpack_uint8_inverts_pack_uint_and_refuses_dirty_padding(width: int) -> None:
    count = 37  # not a multiple of any per-byte count: the last byte carries padding for widths < 8
    values = np.random.default_rng(width).integers(0, 1 << width, count).astype(np.uint8)
    packed = pack_uint(values, width)
    got = unpack_uint8(packed, width, count)
    assert got.dtype == np.uint8
    np.testing.assert_array_equal(got, values)
    if width < 8:
        dirty = packed[:-1] + bytes([packed[-1] | 1])  # the last bit is padding
        with pytest.raises(WireError, match="padding"):
            unpack_uint8(dirty, width, count)
    with pytest.raises(WireError):
        unpack_uint8(packed + b"\0", width, count)
