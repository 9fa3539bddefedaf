"""Compiled (numba) kernels for the sketch decoder's inverse rotation: the fast Walsh-Hadamard transform
of the integer quantisation codes, the per-block scale and the sign flips of ``D``.

Loaded only through ``hadamard.compiled_kernels()``: numba costs ~0.25 s and ~77 MB to import, which a
process that never decodes a sketch (every device, most aggregators) should not pay. Each kernel does
exactly the float operations of the numpy path in ``sketch``/``hadamard`` (integer sums, exact in float32
below 2**24; one float32 multiply per value; the block's first entry in float64), so the two paths give
bit-identical vectors (tests/test_codecs_sketch_decode.py, tests/test_hadamard.py).

The transform is the iterative radix-2 FWHT (Fino & Algazi, "Unified matrix treatment of the fast
Walsh-Hadamard transform", IEEE Trans. Computers 1976) with several stages per pass over the data, cache-
blocked: every stage shorter than ``CHUNK`` runs on one L1-sized chunk at a time (two radix-16 passes),
then the longer ones run across the block in one pass that also scales and signs. For 2-bit codes the
first four stages come with unpacking: a 256-entry table holds ``H_4`` of the four codes in each byte, and
one radix-4 butterfly combines four bytes.

Why the shapes below: LLVM vectorises a butterfly loop only when it can prove that its loads and stores do
not overlap. With one slice and offsets that are compile-time constants (the ``CHUNK``-sized passes of
``_chunk_stages``) it can; with a runtime stride it needs a runtime check per pair of slices, which it
gives up on past a few, so the passes across a row are radix-4 over four slices. In development
measurements on the default 215,370-value payload, radix-16 chunk passes took half the time of radix-4 ones.
"""
from __future__ import annotations

import functools

import numba
import numpy as np

from .hadamard import SPLITMIX_GAMMA, SPLITMIX_M1, SPLITMIX_M2

CHUNK = 4096  # float32 values per cache block: 16 KB, half of a typical 32 KB L1 data cache
FLOAT32_EXACT = 1 << 24  # integers up to here are exact in float32: a row's code sum below it needs no count


@functools.cache
def two_bit_table_cached() -> np.ndarray:
    """``two_bit_table()``, built once (read-only)."""
    table = two_bit_table()
    table.flags.writeable = False
    return table


def two_bit_table() -> np.ndarray:
    """(256, 4) float32: row ``b`` is ``H_4`` applied to the four 2-bit codes of byte ``b``, MSB first."""
    codes = np.array([[(byte >> shift) & 3 for shift in (6, 4, 2, 0)] for byte in range(256)], dtype=np.float32)
    h4 = np.array([[1, 1, 1, 1], [1, -1, 1, -1], [1, 1, -1, -1], [1, -1, -1, 1]], dtype=np.float32)
    return np.ascontiguousarray(codes @ h4)


# Annotations are for readers: numba types each kernel from the arguments of its first call.
_jit = numba.njit(cache=True, boundscheck=False, nogil=True)
_inline = numba.njit(inline="always", boundscheck=False)


@_inline
def _butterfly4(a: float, b: float, c: float, d: float) -> tuple[float, float, float, float]:
    """``H_4 (a, b, c, d)``: two radix-2 stages at once."""
    p, q, r, s = a + b, a - b, c + d, c - d
    return p + r, q + s, p - r, q - s


@_inline
def _butterfly16(y: np.ndarray, k: int, h: int) -> None:
    """``H_16`` in place on ``y[k], y[k + h], …, y[k + 15h]``: four radix-2 stages."""
    a0, a1, a2, a3 = _butterfly4(y[k], y[h + k], y[2 * h + k], y[3 * h + k])
    a4, a5, a6, a7 = _butterfly4(y[4 * h + k], y[5 * h + k], y[6 * h + k], y[7 * h + k])
    a8, a9, a10, a11 = _butterfly4(y[8 * h + k], y[9 * h + k], y[10 * h + k], y[11 * h + k])
    a12, a13, a14, a15 = _butterfly4(y[12 * h + k], y[13 * h + k], y[14 * h + k], y[15 * h + k])
    y[k], y[4 * h + k], y[8 * h + k], y[12 * h + k] = _butterfly4(a0, a4, a8, a12)
    y[h + k], y[5 * h + k], y[9 * h + k], y[13 * h + k] = _butterfly4(a1, a5, a9, a13)
    y[2 * h + k], y[6 * h + k], y[10 * h + k], y[14 * h + k] = _butterfly4(a2, a6, a10, a14)
    y[3 * h + k], y[7 * h + k], y[11 * h + k], y[15 * h + k] = _butterfly4(a3, a7, a11, a15)


@_inline
def _radix16_pass(x: np.ndarray, base: int, size: int, h: int) -> None:
    """Stages ``h .. 8h`` on ``x[base:base + size]``, one slice per group (call with a constant ``h``)."""
    for i in range(base, base + size, 16 * h):
        y = x[i : i + 16 * h]
        for k in range(h):
            _butterfly16(y, k, h)


@_inline
def _radix4_pass(x: np.ndarray, base: int, size: int, h: int) -> None:
    """Stages ``h`` and ``2h``; four slices, so a runtime ``h`` still vectorises."""
    for i in range(base, base + size, 4 * h):
        xa, xb, xc, xd = x[i : i + h], x[i + h : i + 2 * h], x[i + 2 * h : i + 3 * h], x[i + 3 * h : i + 4 * h]
        for k in range(h):
            xa[k], xb[k], xc[k], xd[k] = _butterfly4(xa[k], xb[k], xc[k], xd[k])


@_inline
def _radix2_pass(x: np.ndarray, base: int, size: int, h: int) -> None:
    for i in range(base, base + size, 2 * h):
        xa, xb = x[i : i + h], x[i + h : i + 2 * h]
        for k in range(h):
            a, b = xa[k], xb[k]
            xa[k], xb[k] = a + b, a - b


@_inline
def _stages(x: np.ndarray, base: int, size: int, h: int, top: int) -> None:
    """Stages ``h, 2h, …, top/2`` on each ``top``-long row of ``x[base:base + size]`` (runtime sizes)."""
    while 4 * h <= top:
        _radix4_pass(x, base, size, h)
        h *= 4
    if 2 * h <= top:
        _radix2_pass(x, base, size, h)


@_inline
def _chunk_stages(x: np.ndarray, start: int, chunk: int, h: int, top: int) -> None:
    """Stages ``h .. top/2`` on one chunk; a whole ``CHUNK`` from stage 16 (2-bit codes) or 1 in constant-
    stride radix-16 passes."""
    if chunk == CHUNK and top == CHUNK and h == 16:
        _radix16_pass(x, start, CHUNK, 16)
        _radix16_pass(x, start, CHUNK, 256)
    elif chunk == CHUNK and top == CHUNK and h == 1:
        _radix16_pass(x, start, CHUNK, 1)
        _radix16_pass(x, start, CHUNK, 16)
        _radix16_pass(x, start, CHUNK, 256)
    else:
        _stages(x, start, chunk, h, top)


@_inline
def _two_bit_groups(packed: np.ndarray, table: np.ndarray, out: np.ndarray, start: int, count: int) -> None:
    """``out[start:start + count]`` = ``H_16`` of each group of 16 codes (4 bytes of ``packed``)."""
    for g in range(start // 16, (start + count) // 16):
        l0, l1 = table[packed[4 * g]], table[packed[4 * g + 1]]
        l2, l3 = table[packed[4 * g + 2]], table[packed[4 * g + 3]]
        group = out[16 * g : 16 * g + 16]
        for m in range(4):
            group[m], group[m + 4], group[m + 8], group[m + 12] = _butterfly4(l0[m], l1[m], l2[m], l3[m])


@_inline
def _last_pass(width: int, h0: int) -> tuple[int, int]:
    """(h, radix) of a row's final pass: the last radix-4 (or radix-2, for an odd number of stages) pass of
    its stages across the row when it is wider than ``CHUNK``, else of its stages from ``h0``."""
    chunk = min(CHUNK, width)
    first = chunk if width > chunk else h0
    stages = 0
    while first << stages < width:
        stages += 1
    return (width // 2, 2) if stages % 2 else (width // 4, 4)


@_inline
def _scale_sign64(v: np.ndarray, scale: float, word: int) -> None:
    """``v[j] * scale`` for the 64 values of ``v``, negated where bit ``j`` of ``word`` is clear: an exact
    sign flip (IEEE rounding is symmetric, so ``v * -s == -(v * s)`` bit for bit)."""
    one = np.uint64(1)
    for j in range(64):
        v[j] = v[j] * (scale if (word >> np.uint64(j)) & one else -scale)


@_inline
def _sign_word(key: int, index: int) -> int:
    """Word ``index`` of the signs (``hadamard.random_sign_words``): SplitMix64's output from ``key``."""
    z = key + np.uint64(index + 1) * np.uint64(SPLITMIX_GAMMA)
    z = (z ^ (z >> np.uint64(30))) * np.uint64(SPLITMIX_M1)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(SPLITMIX_M2)
    return z ^ (z >> np.uint64(31))


@_inline
def _scale_sign_rows(y: np.ndarray, start: int, h: int, radix: int, scale: float, key: int,
                     sign_at: int) -> None:
    for m in range(radix):
        at = m * h + start
        _scale_sign64(y[at : at + 64], scale, _sign_word(key, (sign_at + at) // 64))


@_inline
def _final_pass(x: np.ndarray, base: int, h: int, radix: int, scale: float, key: int, sign_at: int) -> None:
    """The last radix-4 (or 2) pass (stride ``h``, a multiple of 64), 64 columns at a time, each run then
    scaled and signed while in L1. Four (two) slices: at the row's large power-of-two strides, 16 streams
    would fall in the same L1 sets."""
    y = x[base : base + radix * h]
    for start in range(0, h, 64):
        if radix == 4:
            xa, xb = y[start : start + 64], y[h + start : h + start + 64]
            xc, xd = y[2 * h + start : 2 * h + start + 64], y[3 * h + start : 3 * h + start + 64]
            for j in range(64):
                xa[j], xb[j], xc[j], xd[j] = _butterfly4(xa[j], xb[j], xc[j], xd[j])
        else:
            xa, xb = y[start : start + 64], y[h + start : h + start + 64]
            for j in range(64):
                a, b = xa[j], xb[j]
                xa[j], xb[j] = a + b, a - b
        _scale_sign_rows(y, start, h, radix, scale, key, sign_at)


@_inline
def _finish_row(x: np.ndarray, base: int, width: int, h: int, radix: int, lo: float, step: float, factor: float,
                key: int, sign_at: int, exact_sum: int) -> None:
    """The row at ``base`` once its chunk-level stages are done: the stages across the row, the last pass
    (``h``, ``radix``) fused with ``sketch``'s scale (``step * factor``, float32) and the signs, then the
    first entry, ``(lo n + step (H c)_0) factor`` in float64 (``H 1 = n e_0``), signed. ``(H c)_0`` is the
    row's code sum: ``exact_sum`` when the caller counted it (>= 0, for rows whose sum may pass 2**24, where
    float32 sums round), else the transform's own first entry (exact below 2**24)."""
    chunk = min(CHUNK, width)
    if width > chunk:
        _stages(x, base, width, chunk, h)
    total = np.float64(exact_sum)
    if exact_sum < 0:  # (H c)_0 = the sum of the last pass's first column, exact below 2**24
        total = np.float64(x[base]) + np.float64(x[base + h])
        for m in range(2, radix):
            total += np.float64(x[base + m * h])
    scale = np.float32(step * factor)
    _final_pass(x, base, h, radix, scale, key, sign_at)
    first = np.float32((lo * width + step * np.float64(total)) * factor)
    x[base] = first if _sign_word(key, sign_at // 64) & np.uint64(1) else -first


@_inline
def _row_factor(width: int, keep: float) -> float:
    return 1.0 / (np.sqrt(np.float64(width)) * keep)


@_jit
def unrotate(packed: np.ndarray, bits: int, table: np.ndarray, out: np.ndarray, segments: np.ndarray,
             ranges: np.ndarray, keep: float, key: int) -> None:
    """``out`` = the sketch's kept values from the MSB-first ``bits``-bit codes (1..8) in ``packed``: each row
    ``r`` (``segments``: (start, first range row, rows, width) per segment, widths powers of two >= 256, starts
    multiples of 64) is ``D H (lo[r] + step[r] c) / (sqrt(width) keep)``, ``ranges`` holding (lo, step) per row
    in float64 and the signs of ``D`` the bits of ``hadamard.random_sign_words`` from the SplitMix64 state
    ``key`` (``hadamard.sign_key``), each word computed where it is used. Each L1-sized chunk is unpacked and
    transformed while it is hot: 2-bit codes through ``table`` (``two_bit_table``) with their first four
    stages, other widths eight codes at a time."""
    first_stage = 16 if bits == 2 else 1
    for s in range(segments.shape[0]):
        start, first_row, rows, width = segments[s, 0], segments[s, 1], segments[s, 2], segments[s, 3]
        chunk = min(CHUNK, width)
        h, radix = _last_pass(width, first_stage)
        factor = _row_factor(width, keep)
        may_round = width * ((1 << bits) - 1) >= FLOAT32_EXACT  # the row's code sum may pass float32's integers
        for r in range(rows):
            base = start + r * width
            for at in range(base, base + width, chunk):
                if bits == 2:
                    _two_bit_groups(packed, table, out, at, chunk)
                else:
                    _unpack_codes(packed, bits, out, at, chunk)
                _chunk_stages(out, at, chunk, first_stage, min(chunk, h))
            lo, step = ranges[first_row + r, 0], ranges[first_row + r, 1]
            exact = _code_sum(packed, bits, base, width) if may_round else -1
            _finish_row(out, base, width, h, radix, lo, step, factor, key, base, exact)


@_inline
def _unpack_codes(packed: np.ndarray, bits: int, out: np.ndarray, start: int, count: int) -> None:
    """``out[start:start + count]`` = codes ``start ..`` of the MSB-first bitstream ``packed`` of ``bits``-bit
    codes (1..8), as float32: eight codes are ``bits`` whole bytes (``start`` and ``count`` multiples of 8)."""
    mask = (1 << bits) - 1
    for g in range(start // 8, (start + count) // 8):
        word = 0
        for b in range(bits):
            word = (word << 8) | np.int64(packed[g * bits + b])
        group = out[8 * g : 8 * g + 8]
        for k in range(8):
            group[k] = np.float32((word >> ((7 - k) * bits)) & mask)


@_inline
def _code_sum(packed: np.ndarray, bits: int, start: int, count: int) -> int:
    """The sum of ``bits``-bit codes ``start .. start + count`` (multiples of 8), in integers."""
    mask = (1 << bits) - 1
    total = 0
    for g in range(start // 8, (start + count) // 8):
        word = 0
        for b in range(bits):
            word = (word << 8) | np.int64(packed[g * bits + b])
        for k in range(8):
            total += (word >> ((7 - k) * bits)) & mask
    return total
