"""The sketch's Walsh-Hadamard transform against the definition (H[i, j] = (-1)^popcount(i & j)) on small
sizes, exactly on integer rows, and orthonormal and its own inverse at the sketch's block size; the format-2
signs (one per bit of the generator's words) against their definition; the compiled transform against the
definition."""
from __future__ import annotations

import numpy as np
import pytest

from edgetrain.sdk.codecs.hadamard import (compiled_kernels, flip_by_sign_words, random_sign_words, signs_from_words,
                                           walsh_hadamard, walsh_hadamard_unscaled)


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


def test_scaled_transform_is_orthonormal_and_its_own_inverse_at_sketch_sizes() -> None:
    rows = np.random.default_rng(9).standard_normal((3, 1 << 16)).astype(np.float32)
    once = walsh_hadamard(rows)
    np.testing.assert_allclose(np.linalg.norm(once, axis=1), np.linalg.norm(rows, axis=1), rtol=1e-5)
    np.testing.assert_allclose(walsh_hadamard(once), rows, atol=2e-5)


@pytest.mark.parametrize("n", [1, 63, 64, 65, 1000])
def test_sign_words_hold_one_sign_per_bit_in_little_endian_order(n: int) -> None:
    words = random_sign_words(77, 2, n)
    raw = np.random.default_rng([77, 2]).bit_generator.random_raw(-(-n // 64))
    assert words.dtype == np.uint64 and np.array_equal(words, raw)
    expected = [1.0 if (int(raw[i // 64]) >> (i % 64)) & 1 else -1.0 for i in range(n)]
    np.testing.assert_array_equal(signs_from_words(words, n), np.array(expected, dtype=np.float32))


@pytest.mark.parametrize("start,count", [(0, 200), (5, 64), (64, 7), (130, 300)])
def test_flipping_by_sign_words_is_multiplying_by_those_signs_from_start(start: int, count: int) -> None:
    words = random_sign_words(3, 2, start + count)
    values = np.random.default_rng(1).standard_normal(count).astype(np.float32)
    expected = values * signs_from_words(words, start + count)[start:]
    flip_by_sign_words(values, words, start)
    np.testing.assert_array_equal(values, expected)


@pytest.mark.parametrize("width", [256, 512, 4096, 8192, 1 << 15, 1 << 16, 1 << 17])
def test_the_compiled_codes_transform_equals_the_definition(width: int) -> None:
    """Rows of random 8-bit codes through ``unrotate_codes`` with step 1, lo 0, factor 1 (keep = 1/sqrt(n)) and
    all signs +1: exactly H c, for every row width's mix of chunk and row passes."""
    pytest.importorskip("numba")
    kernels = compiled_kernels()
    assert kernels is not None  # installed, so on: off only after a kernel failed (nothing here may fail one)
    rows = 2
    codes = np.random.default_rng(width).integers(0, 256, rows * width).astype(np.uint8)
    out = np.empty(rows * width, dtype=np.float32)
    segments = np.array([[0, 0, rows, width]], dtype=np.int64)
    ranges = np.array([[0.0, 1.0]] * rows)
    ones = np.full(-(-rows * width // 64), np.iinfo(np.uint64).max, dtype=np.uint64)
    kernels.unrotate_codes(codes, 8, out, segments, ranges, 1.0 / np.sqrt(width), ones)  # 8-bit codes: one a byte
    expected = walsh_hadamard_unscaled(codes.reshape(rows, width).astype(np.float32))  # exact on integers
    np.testing.assert_array_equal(out.reshape(rows, width), expected)
