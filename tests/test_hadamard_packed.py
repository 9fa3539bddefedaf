"""Issue 14's sketch decode from packed bytes: the byte table, the partial Walsh-Hadamard transform it
leaves, the negate-then-flip sign step, and the whole packed path bit for bit against the unpacked one."""
from __future__ import annotations

import math

import numpy as np
import pytest

from edgetrain.sdk.codecs import get_codec
from edgetrain.sdk.codecs.bitio import pack_uint
from edgetrain.sdk.codecs.hadamard import (_hadamard_matrix, byte_hadamard_table, flip_random_signs,
                                           flip_where_sign_positive, random_signs, walsh_hadamard,
                                           walsh_hadamard_unscaled)
from edgetrain.sdk.codecs.sketch import _packed_fast_path


def _naive_wht(rows: np.ndarray) -> np.ndarray:
    """H x by the definition, float64: H[i, j] = (-1)^popcount(i & j)."""
    n = rows.shape[1]
    i = np.arange(n)
    parity = np.array([[bin(a & b).count("1") & 1 for b in i] for a in i])
    return rows.astype(np.float64) @ np.where(parity, -1.0, 1.0)


@pytest.mark.parametrize("n", [1, 2, 4, 8, 16, 32, 64, 128, 512])
def test_unscaled_transform_equals_the_definition_exactly_on_integers(n: int) -> None:
    rows = np.random.default_rng(n).integers(0, 256, (3, n)).astype(np.float32)
    np.testing.assert_array_equal(walsh_hadamard_unscaled(rows), _naive_wht(rows))


@pytest.mark.parametrize("n", [2, 4, 16, 64, 1024, 1 << 13])
@pytest.mark.parametrize("done_inner", [2, 4, 8, 16])
def test_done_inner_finishes_a_transform_begun_on_the_innermost_positions(n: int, done_inner: int) -> None:
    if done_inner > n:
        pytest.skip("done_inner larger than the row")
    rows = np.random.default_rng(n + done_inner).integers(0, 4, (2, n)).astype(np.float32)
    begun = (rows.reshape(-1, done_inner) @ _hadamard_matrix(done_inner)).reshape(2, n)
    expected = rows.astype(np.float64) @ _hadamard_matrix(n).astype(np.float64)
    np.testing.assert_array_equal(walsh_hadamard_unscaled(begun, done_inner=done_inner), expected)


def test_done_inner_must_be_a_power_of_two_dividing_the_row() -> None:
    rows = np.zeros((1, 16), dtype=np.float32)
    for bad in (0, 3, 32):
        with pytest.raises(ValueError, match="done_inner"):
            walsh_hadamard_unscaled(rows, done_inner=bad)


def test_scaled_transform_is_orthonormal_and_its_own_inverse_at_sketch_sizes() -> None:
    rows = np.random.default_rng(9).standard_normal((3, 1 << 16)).astype(np.float32)
    once = walsh_hadamard(rows)
    np.testing.assert_allclose(np.linalg.norm(once, axis=1), np.linalg.norm(rows, axis=1), rtol=1e-5)
    np.testing.assert_allclose(walsh_hadamard(once), rows, atol=2e-5)


@pytest.mark.parametrize("bits", [1, 2, 4, 8])
def test_byte_table_unpacks_codes_and_transforms_each_byte(bits: int) -> None:
    codes = np.random.default_rng(bits).integers(0, 1 << bits, 4096)
    raw = np.frombuffer(pack_uint(codes, bits), dtype=np.uint8)
    per_byte = 8 // bits
    gathered = np.take(byte_hadamard_table(bits), raw, axis=0).reshape(-1)
    np.testing.assert_array_equal(gathered, (codes.reshape(-1, per_byte) @ _hadamard_matrix(per_byte)).reshape(-1))
    whole = walsh_hadamard_unscaled(gathered.reshape(1, -1), done_inner=per_byte)
    np.testing.assert_array_equal(whole[0], _naive_wht(codes.reshape(1, -1).astype(np.float32))[0] if codes.size <= 512
                                  else codes.astype(np.float64) @ _hadamard_matrix(4096).astype(np.float64))


def test_byte_table_refuses_widths_that_straddle_bytes() -> None:
    with pytest.raises(ValueError, match="tile a byte"):
        byte_hadamard_table(3)


@pytest.mark.parametrize("n", [1, 8, 1000, 229_376])
def test_negate_then_flip_where_positive_is_multiplying_by_the_signs(n: int) -> None:
    values = np.random.default_rng(n).standard_normal(n).astype(np.float32)
    values[0] = 0.0
    expected = values * random_signs(5, 2, n)
    flipped = values.copy()
    flip_random_signs(flipped, 5, 2)
    negated = -values
    flip_where_sign_positive(negated, 5, 2)
    for result in (flipped, negated):
        np.testing.assert_array_equal(result.view(np.uint32), expected.view(np.uint32))  # signed zeros too


@pytest.mark.parametrize("bits", [1, 2, 4, 8])
@pytest.mark.parametrize("block,keep,size", [(1 << 16, 1.0, 215_370), (1 << 10, 0.3, 20_011), (16, 1.0, 1000),
                                             (1 << 16, 1.0, 65_536)])
def test_packed_decode_is_bit_for_bit_the_unpacked_decode(bits: int, block: int, keep: float, size: int) -> None:
    codec = get_codec("sketch")
    vector = (np.random.default_rng(size).standard_normal(size) * 1e-2).astype(np.float32)
    payload, _ = codec.encode(vector, None, {"bits": bits, "block": block, "keep": keep, "seed": 11})
    layout = codec._parse_header(payload, size)
    assert _packed_fast_path(layout)
    kept = codec._decode_unpacked(layout)[: layout.kept_count]
    expected = np.zeros(size, dtype=np.float32)
    expected[np.arange(size) if layout.kept_at is None else layout.kept_at] = kept
    np.testing.assert_array_equal(codec.decode(payload, size, {}).view(np.uint32), expected.view(np.uint32))


@pytest.mark.parametrize("bits,block,size", [(3, 1 << 16, 1000), (2, 1, 17), (1, 4, 1001)])
def test_widths_or_blocks_that_do_not_tile_bytes_take_the_unpacked_path(bits: int, block: int, size: int) -> None:
    codec = get_codec("sketch")
    vector = np.random.default_rng(1).standard_normal(size).astype(np.float32)
    payload, _ = codec.encode(vector, None, {"bits": bits, "block": block, "seed": 3})
    assert not _packed_fast_path(codec._parse_header(payload, size))
    assert np.isfinite(codec.decode(payload, size, {})).all()
    assert math.isfinite(float(np.linalg.norm(codec.decode(payload, size, {}))))
