"""The sketch's Walsh-Hadamard transform against the definition (H[i, j] = (-1)^popcount(i & j)) on small
sizes, exactly on integer rows, and orthonormal and its own inverse at the sketch's block size."""
from __future__ import annotations

import numpy as np
import pytest

from edgetrain.sdk.codecs.hadamard import walsh_hadamard, walsh_hadamard_unscaled


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
