"""The sketch's Walsh-Hadamard transform against the definition (H[i, j] = (-1)^popcount(i & j)) on small
sizes, exactly on integer rows, and orthonormal and its own inverse at the sketch's block size; the format-2
signs (one per bit of the generator's words) against their definition; the compiled transform against the
definition."""
from __future__ import annotations

import numpy as np
import pytest

from edgetrain.sdk.codecs.hadamard import (compiled_kernels, flip_by_sign_words, random_sign_words, sign_key,
                                           signs_from_words, walsh_hadamard, walsh_hadamard_unscaled)


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


def _splitmix64(state: int, count: int) -> list[int]:
    """SplitMix64 from ``state``, written from the paper's definition in Python integers."""
    out = []
    for _ in range(count):
        state = (state + 0x9E3779B97F4A7C15) % 2**64
        z = state
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) % 2**64
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) % 2**64
        out.append(z ^ (z >> 31))
    return out


def test_splitmix64_gives_its_published_outputs() -> None:
    """The reference outputs for state 1234567 (the SplitMix64 test vectors)."""
    assert _splitmix64(1234567, 5) == [6457827717110365317, 3203168211198807973, 9817491932198370423,
                                        4593380528125082431, 16408922859458223821]


@pytest.mark.parametrize("n", [1, 63, 64, 65, 1000])
@pytest.mark.parametrize("seed", [0, 77, 2**63 - 1])
def test_sign_words_hold_one_sign_per_bit_in_little_endian_order(seed: int, n: int) -> None:
    words = random_sign_words(seed, 2, n)
    expected_words = _splitmix64(sign_key(seed, 2), -(-n // 64))
    assert words.dtype == np.uint64 and words.tolist() == expected_words
    expected = [1.0 if (expected_words[i // 64] >> (i % 64)) & 1 else -1.0 for i in range(n)]
    np.testing.assert_array_equal(signs_from_words(words, n), np.array(expected, dtype=np.float32))


def test_the_sign_key_is_the_mixed_seed_xor_the_stream() -> None:
    seed = 12345
    # mix(z) is SplitMix64's output for the state z - γ
    assert sign_key(seed, 2) == _splitmix64((seed - 0x9E3779B97F4A7C15) % 2**64, 1)[0] ^ 2


@pytest.mark.parametrize("start,count", [(0, 200), (5, 64), (64, 7), (130, 300)])
def test_flipping_by_sign_words_is_multiplying_by_those_signs_from_start(start: int, count: int) -> None:
    words = random_sign_words(3, 2, start + count)
    values = np.random.default_rng(1).standard_normal(count).astype(np.float32)
    expected = values * signs_from_words(words, start + count)[start:]
    flip_by_sign_words(values, words, start)
    np.testing.assert_array_equal(values, expected)


@pytest.mark.parametrize("width", [256, 512, 4096, 8192, 1 << 15, 1 << 16, 1 << 17])
def test_the_compiled_codes_transform_equals_the_definition(width: int) -> None:
    """Rows of random 8-bit codes through ``unrotate`` with step 1, lo 0, factor 1 (keep = 1/sqrt(n)):
    exactly D H c, for every row width's mix of chunk and row passes (the signs from the same key)."""
    pytest.importorskip("numba")
    kernels = compiled_kernels()
    assert kernels is not None  # installed, so on: off only after a kernel failed (nothing here may fail one)
    rows = 2
    codes = np.random.default_rng(width).integers(0, 256, rows * width).astype(np.uint8)
    out = np.empty(rows * width, dtype=np.float32)
    segments = np.array([[0, 0, rows, width]], dtype=np.int64)
    ranges = np.array([[0.0, 1.0]] * rows)
    kernels.unrotate(codes, 8, kernels.two_bit_table_cached(), out, segments, ranges, 1.0 / np.sqrt(width),
                     np.uint64(sign_key(width, 2)))
    signs = signs_from_words(random_sign_words(width, 2, rows * width), rows * width)
    expected = walsh_hadamard_unscaled(codes.reshape(rows, width).astype(np.float32)).reshape(-1) * signs  # exact
    np.testing.assert_array_equal(out, expected)
