"""The randomized Hadamard rotation of Konečný et al. 2016 ("Federated Learning: Strategies for
Improving Communication Efficiency"): ``y = H D x / sqrt(n)`` with ``D`` a random ±1 diagonal and
``H`` the Walsh-Hadamard matrix. It spreads a vector's energy evenly over its coordinates, so a
uniform quantiser between min and max loses far less. Orthonormal and its own inverse up to ``D``.
"""
from __future__ import annotations

import functools
import importlib
import logging
import math
from types import ModuleType

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


def walsh_hadamard_unscaled(rows: np.ndarray) -> np.ndarray:
    """``H x`` for each row, without the 1/sqrt(n), as a new float32 array. On integer rows whose transform
    stays below 2**24 (8-bit codes in blocks up to 2**16) every sum is exact, rounding nothing.

    ``H_n`` is the Kronecker product ``H_16 ⊗ H_16 ⊗ … (⊗ H_r)``, so each factor is one small matmul along
    one axis of the row viewed as a (16, 16, …) tensor: log16(n) BLAS passes instead of log2(n) numpy
    butterfly stages over strided views (~1.8x faster than radix-4 butterflies at 2**16).
    """
    count, n = rows.shape
    if n & (n - 1):
        raise ValueError(f"Hadamard length {n} is not a power of two")
    stages = n.bit_length() - 1
    factors = [_FACTOR] * (stages // _FACTOR_BITS) + ([1 << stages % _FACTOR_BITS] if stages % _FACTOR_BITS else [])
    x = rows.astype(np.float32)
    done = 1
    for k in factors:
        after = n // (done * k)
        if after == 1:  # the innermost axis: one matmul over all rows
            x = x.reshape(-1, k) @ _hadamard_matrix(k)
        else:  # an outer axis: H_k times each (k, after) slice
            x = np.matmul(_hadamard_matrix(k), x.reshape(count * done, k, after))
        done *= k
    return x.reshape(count, n)


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


# SplitMix64 (Steele, Lea & Flood, "Fast splittable pseudorandom number generators", OOPSLA 2014): its
# increment and output mix. Counter-based, so the compiled decoder derives each word of signs where it needs
# it, and numpy derives them all at once: the same integers, mod 2**64, on both ends.
SPLITMIX_GAMMA = 0x9E3779B97F4A7C15
SPLITMIX_M1 = 0xBF58476D1CE4E5B9
SPLITMIX_M2 = 0x94D049BB133111EB


def _splitmix_mix(z: np.ndarray) -> np.ndarray:
    """SplitMix64's output mix of each uint64 in ``z`` (wrapping mod 2**64)."""
    z = (z ^ (z >> np.uint64(30))) * np.uint64(SPLITMIX_M1)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(SPLITMIX_M2)
    return z ^ (z >> np.uint64(31))


def sign_key(seed: int, stream: int) -> int:
    """The SplitMix64 state the signs of ``(seed, stream)`` start from: ``mix(seed) XOR stream``."""
    return int(_splitmix_mix(np.array([seed], dtype=np.uint64))[0]) ^ stream


def random_sign_words(seed: int, stream: int, n: int) -> np.ndarray:
    """The ±1 diagonal ``D`` of ``n`` values as bits, one per sign (the sketch codec's wire format 2): value
    ``i`` is +1 where bit ``i % 64`` of word ``i // 64`` is set, word ``w`` being SplitMix64's output
    ``mix(sign_key(seed, stream) + (w + 1) γ)`` (mod 2**64). 64 signs per word, and any word computable on
    its own: the compiled decoder computes them as it signs (hadamard_kernels)."""
    counters = np.arange(1, -(-n // 64) + 1, dtype=np.uint64)
    return _splitmix_mix(np.uint64(sign_key(seed, stream)) + counters * np.uint64(SPLITMIX_GAMMA))


def _word_bits(words: np.ndarray, start: int, count: int) -> np.ndarray:
    """Bits ``start .. start + count`` of ``words`` (bit ``i`` = bit ``i % 64`` of word ``i // 64``), uint8."""
    first, last = start // 64, -(-(start + count) // 64)
    raw = np.ascontiguousarray(words[first:last], dtype="<u8").view(np.uint8)
    offset = start - 64 * first
    return np.unpackbits(raw, bitorder="little")[offset : offset + count]


def signs_from_words(words: np.ndarray, n: int) -> np.ndarray:
    """The first ``n`` signs of ``random_sign_words`` as float32 ±1."""
    return _word_bits(words, 0, n).astype(np.float32) * np.float32(2) - np.float32(1)


def flip_by_sign_words(values: np.ndarray, words: np.ndarray, start: int = 0) -> None:
    """``values *= signs`` in place on a flat float32 array, with the signs ``start .. start + values.size``
    of ``random_sign_words``: a sign-bit XOR where the bit is clear."""
    clear = np.uint8(1) - _word_bits(words, start, values.size)
    view = values.view(np.uint32)
    view ^= clear.astype(np.uint32) << np.uint32(31)


_log = logging.getLogger(__name__)


class _CompiledKernels:
    """``hadamard_kernels`` once imported, or None: numba not installed (the lean SDK on a board decodes with
    the numpy functions above, to the same bits), or a kernel failed once (it is then left off for good)."""

    def __init__(self) -> None:
        self._module: ModuleType | None = None
        self._tried = False

    def get(self) -> ModuleType | None:
        # Imported on first use, not with this module: numba costs ~0.25 s and ~77 MB to import
        # (docs/results/hot_path/sketch-startup.txt), which a process that never decodes a rotated sketch
        # should not pay.
        if not self._tried:
            self._tried = True
            try:
                self._module = importlib.import_module(".hadamard_kernels", __package__)
            except ImportError:
                self._module = None
        return self._module

    def fail(self, exc: Exception) -> None:
        if self._module is not None:
            _log.warning("compiled Hadamard kernels failed (%s: %s); decoding with numpy from now on",
                         type(exc).__name__, exc)
        self._module, self._tried = None, True


_KERNELS = _CompiledKernels()


def compiled_kernels() -> ModuleType | None:
    """The compiled kernels module (``hadamard_kernels``), or None where they are unavailable."""
    return _KERNELS.get()


def compiled_kernels_failed(exc: Exception) -> None:
    """A kernel raised (e.g. numba could not compile it on this platform): use numpy from now on."""
    _KERNELS.fail(exc)


def rotate(rows: np.ndarray, signs: np.ndarray) -> np.ndarray:
    """``H D x / sqrt(n)`` for each row; ``signs`` has one ±1 per element of ``rows``."""
    return walsh_hadamard(rows * signs.reshape(rows.shape))


def unrotate(rows: np.ndarray, signs: np.ndarray) -> np.ndarray:
    """Inverse of ``rotate``: ``D H y / sqrt(n)`` (H is symmetric and orthonormal)."""
    return walsh_hadamard(rows) * signs.reshape(rows.shape)
