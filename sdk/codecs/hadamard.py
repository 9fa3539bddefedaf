"""The randomized Hadamard rotation of Konečný et al. 2016 ("Federated Learning: Strategies for
Improving Communication Efficiency"): ``y = H D x / sqrt(n)`` with ``D`` a random ±1 diagonal and
``H`` the Walsh-Hadamard matrix. It spreads a vector's energy evenly over its coordinates, so a
uniform quantiser between min and max loses far less. Orthonormal and its own inverse up to ``D``.
"""
from __future__ import annotations

import functools
import math

import numpy as np


def next_power_of_two(n: int) -> int:
    return 1 if n <= 1 else 1 << (n - 1).bit_length()


_FACTOR_BITS = 4  # H_n is applied as Kronecker factors H_16 (measured best of 8, 16, 32 on 2**15 and 2**16)
_FACTOR = 1 << _FACTOR_BITS


@functools.lru_cache(maxsize=8)
def _hadamard_matrix(n: int) -> np.ndarray:
    """H_n (Sylvester), built once per size (np.block's bookkeeping cost ~0.1 ms a decode), read-only."""
    matrix = np.ones((1, 1), dtype=np.float32)
    while matrix.shape[0] < n:
        matrix = np.block([[matrix, matrix], [matrix, -matrix]])
    matrix.flags.writeable = False
    return matrix


def walsh_hadamard(rows: np.ndarray) -> np.ndarray:
    """Orthonormal fast Walsh-Hadamard transform of each row (row length a power of two), O(n log n).

    float32 throughout: the rotation feeds a 1-8 bit quantiser, so its ~1e-7 rounding is noise-free
    in comparison, and it halves the memory traffic on a board.
    """
    x = walsh_hadamard_unscaled(rows)
    x *= np.float32(1.0 / math.sqrt(rows.shape[1]))
    return x


def walsh_hadamard_unscaled(rows: np.ndarray, done_inner: int = 1) -> np.ndarray:
    """``H x`` for each row, without the 1/sqrt(n), as a new float32 array. On integer rows whose transform
    stays below 2**24 (8-bit codes in blocks up to 2**16) every sum is exact, rounding nothing.

    ``H_n`` is the Kronecker product ``H_16 ⊗ H_16 ⊗ … (⊗ H_r)``, so each factor is one small matmul along
    one axis of the row viewed as a (16, 16, …) tensor: log16(n) BLAS passes instead of log2(n) numpy
    butterfly stages over strided views (~1.8x faster than radix-4 butterflies at 2**16).

    ``done_inner`` (a power of two dividing n): the rows are already transformed along their innermost
    ``done_inner`` positions, ``(I ⊗ H_done_inner) x``, e.g. by ``byte_hadamard_table``; only
    ``H_{n/done_inner} ⊗ I_done_inner`` is left, its innermost factor one matmul by ``H_k ⊗ I_done_inner``.
    """
    count, n = rows.shape
    if n & (n - 1):
        raise ValueError(f"Hadamard length {n} is not a power of two")
    if done_inner < 1 or done_inner & (done_inner - 1) or n % done_inner:
        raise ValueError(f"done_inner {done_inner} is not a power of two dividing {n}")
    x = rows.astype(np.float32)
    done = 1
    for k in _factors(n.bit_length() - 1, done_inner.bit_length() - 1):
        after = n // (done * k)
        if after == done_inner:  # the innermost factor: one matmul over all rows
            x = x.reshape(-1, k * done_inner) @ _inner_matrix(k, done_inner)
        else:  # an outer axis: H_k times each (k, after) slice
            x = np.matmul(_hadamard_matrix(k), x.reshape(count * done, k, after))
        done *= k
    return x.reshape(count, n)


def _factors(stages: int, done_bits: int) -> list[int]:
    """Factor sizes, outermost first, for the ``stages - done_bits`` index bits still to transform: H_16s
    outside, and an innermost one that makes ``H_k ⊗ I_done`` at most 16 wide (one efficient matmul)."""
    left = stages - done_bits
    if left <= 0:
        return []
    inner_bits = min(left, max(_FACTOR_BITS - done_bits, 1))
    outer = left - inner_bits
    bits = [_FACTOR_BITS] * (outer // _FACTOR_BITS) + ([outer % _FACTOR_BITS] if outer % _FACTOR_BITS else [])
    return [1 << b for b in bits] + [1 << inner_bits]


@functools.lru_cache(maxsize=16)
def _inner_matrix(k: int, done_inner: int) -> np.ndarray:
    """``H_k ⊗ I_done_inner``, read-only."""
    matrix = np.kron(_hadamard_matrix(k), np.eye(done_inner, dtype=np.float32)).astype(np.float32)
    matrix.flags.writeable = False
    return matrix


@functools.lru_cache(maxsize=8)
def byte_hadamard_table(bits: int) -> np.ndarray:
    """(256, 8 // bits) float32: row ``b`` is ``H_p c`` of the p = 8/bits codes of ``bits`` bits packed
    in byte value ``b``, most significant first (``bitio.pack_uint``'s order). Indexing it by packed
    bytes unpacks the codes and does the innermost p-point transform in one gather (exact integers)."""
    if bits not in (1, 2, 4, 8):
        raise ValueError(f"byte_hadamard_table: {bits}-bit codes do not tile a byte")
    per_byte = 8 // bits
    values = np.arange(256, dtype=np.uint16)
    shifts = (8 - bits * (np.arange(per_byte) + 1)).astype(np.uint16)
    codes = (values[:, None] >> shifts) & ((1 << bits) - 1)
    table = (codes.astype(np.float32) @ _hadamard_matrix(per_byte)).astype(np.float32)
    table.flags.writeable = False
    return table


def _sign_bytes(seed: int, stream: int, n: int) -> np.ndarray:
    """One byte per sign whose top bit is that sign's draw: ``Generator.integers(0, 2, n, int8)`` takes
    each uint8 of the bit generator's little-endian output and keeps ``(byte * 2) >> 8`` (Lemire's
    bounded method), i.e. its top bit; reading those bytes directly is ~10x faster and draws the same
    signs (tests pin the two together, so a numpy that changes its method fails them)."""
    words = np.random.default_rng([seed, stream]).bit_generator.random_raw(-(-n // 8))
    return np.asarray(words, dtype="<u8").view(np.uint8)[:n]


def random_signs(seed: int, stream: int, n: int) -> np.ndarray:
    """The ±1 diagonal ``D``, reproducible from ``(seed, stream)`` on both sides of the wire: the signs
    ``2 * default_rng([seed, stream]).integers(0, 2, n, dtype=int8) - 1``, as float32."""
    signs = np.full(n, -1.0, dtype=np.float32)
    signs[_sign_bytes(seed, stream, n) >= 0x80] = 1.0
    return signs


def flip_random_signs(values: np.ndarray, seed: int, stream: int) -> None:
    """``values *= random_signs(seed, stream, values.size)`` in place on a flat float32 array, by flipping
    sign bits (an XOR per value instead of a float multiply by a float vector drawn first)."""
    negative = _sign_bytes(seed, stream, values.size) < 0x80
    view = values.view(np.uint32)
    view ^= negative.astype(np.uint32) << np.uint32(31)


def flip_where_sign_positive(values: np.ndarray, seed: int, stream: int) -> None:
    """``values *= -random_signs(seed, stream, values.size)`` in place on a flat float32 array: a caller that
    has negated its values already (in a multiply it makes anyway) gets ``D x`` by flipping where D is +1.
    Cheaper than ``flip_random_signs``: the sign bit is the byte's own top bit, moved to bit 31 by one
    widening shift (no compare, no separate cast)."""
    top_bits = np.bitwise_and(_sign_bytes(seed, stream, values.size), np.uint8(0x80))
    view = values.view(np.uint32)
    np.bitwise_xor(view, np.left_shift(top_bits, np.uint32(24), dtype=np.uint32), out=view)


def rotate(rows: np.ndarray, signs: np.ndarray) -> np.ndarray:
    """``H D x / sqrt(n)`` for each row; ``signs`` has one ±1 per element of ``rows``."""
    return walsh_hadamard(rows * signs.reshape(rows.shape))


def unrotate(rows: np.ndarray, signs: np.ndarray) -> np.ndarray:
    """Inverse of ``rotate``: ``D H y / sqrt(n)`` (H is symmetric and orthonormal)."""
    return walsh_hadamard(rows) * signs.reshape(rows.shape)
