"""Bit-level building blocks for compact payloads: fixed-width bit packing, Golomb-Rice coding of
non-negative integers, and sparse index sets coded as Rice-coded gaps.

Golomb-Rice coding of the gaps between sparse positions follows Sattler et al. 2019 ("Robust and
Communication-Efficient Federated Learning from Non-IID Data", IEEE TNNLS), who derive the Rice
parameter from the density; here the encoder instead picks, for every run of 32 gaps, the parameter
that codes that run in the fewest bits (exact search, 6 bits per run), which follows the clustering
of real top-k sets and beats both the formula and the uniform-subset bound log2 C(n, k). Each Rice stream is stored as
two sub-streams, the k-bit remainders then the unary quotients, so both directions vectorise in
numpy: quotients are the distances between consecutive 1 bits of the unary stream.

Every reader takes a ``memoryview``/``bytes`` plus an offset, checks lengths before allocating,
and raises ``WireError`` on anything malformed, so a decoder built from these never hangs or
raises another exception type on hostile bytes.
"""
from __future__ import annotations

import math
import struct

import numpy as np

from ..errors import WireError

MAX_RICE_PARAMETER = 40  # gaps are < 2**40 for any vector this project ships
RICE_BLOCK = 32  # gaps sharing one Rice parameter (measured best of 32..512 on real top-k sets)
# Golden ratio, from Sattler et al.'s optimal Golomb parameter for geometric gaps.
_PHI = (1.0 + math.sqrt(5.0)) / 2.0


def packed_size(count: int, width: int) -> int:
    """Bytes that ``count`` values of ``width`` bits occupy once packed (last byte zero-padded)."""
    return (count * width + 7) // 8


def _uint_dtype(width: int) -> np.dtype:
    for dtype in (np.uint8, np.uint16, np.uint32):
        if width <= np.dtype(dtype).itemsize * 8:
            return np.dtype(dtype)
    return np.dtype(np.uint64)


def pack_uint(values: np.ndarray, width: int) -> bytes:
    """Pack non-negative integers ``< 2**width`` MSB-first into ``packed_size(len, width)`` bytes."""
    if not 0 <= width <= 64:
        raise WireError(f"bit width {width} outside 0..64")
    values = np.asarray(values)
    if width == 0 or values.size == 0:
        return b""
    if width == 8:
        return values.astype(np.uint8).tobytes()
    if 8 % width == 0:
        # Several values share a byte: combine them with shifts, no per-bit array needed.
        per_byte = 8 // width
        padded = np.zeros(-(-values.size // per_byte) * per_byte, dtype=np.uint8)
        padded[: values.size] = values
        grouped = padded.reshape(-1, per_byte)
        shifts = np.arange(8 - width, -1, -width, dtype=np.uint8)
        return np.bitwise_or.reduce(grouped << shifts, axis=1).astype(np.uint8).tobytes()
    dtype = _uint_dtype(width)
    shifts = np.arange(width - 1, -1, -1, dtype=dtype)
    bits = ((values.astype(dtype)[:, None] >> shifts) & dtype.type(1)).astype(np.uint8)
    return np.packbits(bits.reshape(-1)).tobytes()


def unpack_uint(data: bytes | memoryview, width: int, count: int) -> np.ndarray:
    """Inverse of ``pack_uint``: exactly ``packed_size(count, width)`` bytes, padding bits zero."""
    if not 0 <= width <= 64:
        raise WireError(f"bit width {width} outside 0..64")
    expected = packed_size(count, width)
    if len(data) != expected:
        raise WireError(f"packed field: {len(data)} bytes for {count} values of {width} bits (expected {expected})")
    if width == 0 or count == 0:
        return np.zeros(count, dtype=np.uint64)
    raw = np.frombuffer(data, dtype=np.uint8)
    if width == 8:
        return raw.astype(np.uint64)
    if 8 % width == 0:
        return _unpack_within_bytes(raw, width, count).astype(np.uint64)
    bits = np.unpackbits(raw)
    if bits[count * width :].any():
        raise WireError("packed field: non-zero padding bits")
    bits = bits[: count * width].reshape(count, width).astype(np.uint64)
    weights = np.left_shift(np.uint64(1), np.arange(width - 1, -1, -1, dtype=np.uint64))
    return bits @ weights if width < 53 else _exact_dot(bits, weights)


def _unpack_within_bytes(raw: np.ndarray, width: int, count: int) -> np.ndarray:
    """Widths 1, 2, 4: each byte holds 8/width values, MSB first; shifts undo ``pack_uint``'s shifts
    on uint8 (no per-bit array, no integer matmul: ~10x faster for the sketch's 2-bit codes). uint8.
    One contiguous pass per position in the byte, not one broadcast (bytes, 8/width) shift: ~4x faster."""
    per_byte = 8 // width
    mask = np.uint8((1 << width) - 1)
    values = np.empty((raw.size, per_byte), dtype=np.uint8)
    for position in range(per_byte):
        np.bitwise_and(raw >> np.uint8(8 - width * (position + 1)), mask, out=values[:, position])
    values = values.reshape(-1)
    if values[count:].any():
        raise WireError("packed field: non-zero padding bits")
    return values[:count]


def check_padding_bits(data: np.ndarray, width: int, count: int) -> None:
    """The bits after ``count`` values of ``width`` bits in ``data`` (``packed_size(count, width)`` bytes)
    must be zero, as ``unpack_uint8`` requires: a payload has one valid encoding."""
    spare = 8 * len(data) - count * width
    if spare and int(data[-1]) & ((1 << spare) - 1):
        raise WireError("packed field: non-zero padding bits")


def unpack_uint8(data: bytes | memoryview, width: int, count: int) -> np.ndarray:
    """``unpack_uint`` for widths 1..8, as uint8: a quantiser's codes stay one byte each (the uint64 of
    ``unpack_uint`` is 8x the memory traffic for every later pass over them)."""
    if not 1 <= width <= 8:
        raise WireError(f"bit width {width} outside 1..8 for uint8 codes")
    expected = packed_size(count, width)
    if len(data) != expected:
        raise WireError(f"packed field: {len(data)} bytes for {count} values of {width} bits (expected {expected})")
    raw = np.frombuffer(data, dtype=np.uint8)
    if width == 8:
        return raw.copy()
    if 8 % width == 0:
        return _unpack_within_bytes(raw, width, count)
    check_padding_bits(raw, width, count)
    return _unpack_across_bytes(raw, width, count)


def _unpack_across_bytes(raw: np.ndarray, width: int, count: int) -> np.ndarray:
    """Widths 3, 5, 6, 7: eight values fill ``width`` whole bytes, so each group of ``width`` bytes is read as
    one big-endian integer (a shift-or per byte) and its eight values shifted out: ``width + 8`` passes over
    count/8 groups instead of a bit per byte (np.unpackbits) and a byte per bit (~30x faster at 215k values)."""
    groups = -(-count // 8)
    grouped = np.zeros(groups * width, dtype=np.uint8)
    grouped[: raw.size] = raw
    grouped = grouped.reshape(groups, width)
    words = np.zeros(groups, dtype=np.uint64)
    for position in range(width):
        words <<= np.uint64(8)
        words |= grouped[:, position]
    values = np.empty((groups, 8), dtype=np.uint8)
    mask = np.uint64((1 << width) - 1)
    for index in range(8):
        values[:, index] = (words >> np.uint64((7 - index) * width)) & mask
    return values.reshape(-1)[:count]


def _exact_dot(bits: np.ndarray, weights: np.ndarray) -> np.ndarray:
    # Integer matmul avoids float rounding for very wide fields.
    out = np.zeros(bits.shape[0], dtype=np.uint64)
    for column, weight in enumerate(weights):
        out |= bits[:, column] * weight
    return out


def rice_parameter_for_density(density: float) -> int:
    """Sattler et al.'s Golomb parameter for gaps of a Bernoulli(``density``) mask:
    ``1 + floor(log2(log(phi - 1) / log(1 - p)))``, at least 0."""
    if not 0.0 < density < 1.0:
        return 0
    ratio = math.log(_PHI - 1.0) / math.log1p(-density)
    return max(0, 1 + math.floor(math.log2(ratio))) if ratio > 0 else 0


def rice_bits(values: np.ndarray, parameter: int) -> int:
    """Exact length in bits of the Rice code of ``values`` with one ``parameter``."""
    values = np.asarray(values, dtype=np.uint64)
    return int(values.size * (parameter + 1) + int((values >> np.uint64(parameter)).sum()))


def best_rice_parameter(values: np.ndarray) -> int:
    """The single Rice parameter that codes ``values`` in the fewest bits (searched, not estimated)."""
    return int(best_rice_parameters(values, max(1, np.asarray(values).size))[0]) if np.asarray(values).size else 0


def best_rice_parameters(values: np.ndarray, block: int = RICE_BLOCK) -> np.ndarray:
    """The cheapest Rice parameter for each run of ``block`` consecutive values.

    Top-k positions of real updates cluster (whole rows or units of a layer are large), so gaps
    are far from geometric; a parameter per short run adapts to the local density and lands well
    below the uniform-subset bound ``log2 C(n, k)`` where one global parameter sits ~4% above it.
    """
    values = np.asarray(values, dtype=np.uint64)
    runs = -(-values.size // block)
    padded = np.zeros(runs * block, dtype=np.uint64)
    padded[: values.size] = values
    padded = padded.reshape(runs, block)
    valid = (np.arange(runs * block) < values.size).reshape(runs, block)
    top = min(int(values.max()).bit_length() if values.size else 0, MAX_RICE_PARAMETER)
    costs = np.stack([((padded >> np.uint64(k)) + np.uint64(k + 1)).astype(np.int64).sum(axis=1, where=valid)
                      for k in range(top + 1)], axis=1)
    return np.argmin(costs, axis=1).astype(np.uint64)


def pack_varwidth(values: np.ndarray, widths: np.ndarray) -> bytes:
    """Each value in its own number of bits (MSB-first), concatenated and zero-padded to a byte."""
    values, widths = np.asarray(values, dtype=np.uint64), np.asarray(widths, dtype=np.int64)
    widest = int(widths.max()) if widths.size else 0
    if widest == 0:
        return b""
    shifts = np.arange(widest - 1, -1, -1, dtype=np.uint64)
    bits = ((values[:, None] >> shifts) & np.uint64(1)).astype(np.uint8)
    return np.packbits(bits[shifts[None, :] < widths[:, None].astype(np.uint64)]).tobytes()


_VARWIDTH_BLOCK = 8192  # values unpacked per step: the bit matrix stays ~2.6 MB at 40-bit widths


def unpack_varwidth(data: bytes | memoryview, widths: np.ndarray) -> np.ndarray:
    """Inverse of ``pack_varwidth``: exactly ``ceil(sum(widths) / 8)`` bytes, padding bits zero.

    Unpacked in blocks of values, so the temporary bit matrix (8 bytes per bit) never scales with
    the payload: the result (8 bytes per value) is the only allocation proportional to it.
    """
    widths = np.asarray(widths, dtype=np.int64)
    total = int(widths.sum())
    if len(data) != (total + 7) // 8:
        raise WireError(f"packed field: {len(data)} bytes for {total} bits")
    raw = np.frombuffer(data, dtype=np.uint8)
    if total % 8 and int(raw[-1]) & ((1 << (8 - total % 8)) - 1):
        raise WireError("packed field: non-zero padding bits")
    out = np.zeros(widths.size, dtype=np.uint64)
    ends = np.cumsum(widths)
    for first in range(0, widths.size, _VARWIDTH_BLOCK):
        block = widths[first : first + _VARWIDTH_BLOCK]
        widest = int(block.max()) if block.size else 0
        if widest == 0:
            continue
        start_bit = int(ends[first] - widths[first])
        end_bit = int(ends[first + block.size - 1])
        bits = np.unpackbits(raw[start_bit // 8 : (end_bit + 7) // 8])[start_bit % 8 :][: end_bit - start_bit]
        shifts = np.arange(widest - 1, -1, -1, dtype=np.uint64)
        matrix = np.zeros((block.size, widest), dtype=np.uint64)
        matrix[shifts[None, :] < block[:, None].astype(np.uint64)] = bits
        out[first : first + block.size] = (matrix << shifts).sum(axis=1, dtype=np.uint64)
    return out


def _check_parameters(parameters: np.ndarray) -> None:
    if parameters.size and int(parameters.max()) > MAX_RICE_PARAMETER:
        raise WireError(f"Rice parameter {int(parameters.max())} outside 0..{MAX_RICE_PARAMETER}")


def rice_encode(values: np.ndarray, parameters: int | np.ndarray) -> bytes:
    """Rice code with a parameter per value (or one for all): the remainders packed, then each
    quotient in unary (q zeros, then a one)."""
    values = np.asarray(values, dtype=np.uint64)
    parameters = np.broadcast_to(np.asarray(parameters, dtype=np.uint64), values.shape)
    _check_parameters(parameters)
    remainders = pack_varwidth(values & ((np.uint64(1) << parameters) - np.uint64(1)), parameters)
    quotients = (values >> parameters).astype(np.int64)
    ones_at = np.cumsum(quotients + 1) - 1
    unary = np.zeros(int(ones_at[-1]) + 1 if values.size else 0, dtype=np.uint8)
    unary[ones_at] = 1
    return remainders + np.packbits(unary).tobytes()


_SCAN_BYTES = 1 << 12  # unary bytes popcounted per step while looking for the last code (32 KiB of cumsum)
_POPCOUNT = np.array([bin(i).count("1") for i in range(256)], dtype=np.uint8)


def _unary_ones(data: bytes | memoryview, start: int, count: int) -> tuple[np.ndarray, int]:
    """Bit offsets (from ``data[start]``) of the first ``count`` one bits, and the byte offset after them.

    Work arrays are O(count), never O(len(data)): the byte holding the count-th one is found by
    popcounting fixed-size blocks, and only the non-zero bytes before it (at most ``count``) are
    expanded to bits. A crafted payload with a long tail of ones therefore costs no memory.
    """
    view = np.frombuffer(data, dtype=np.uint8)[start:]
    seen = 0
    for block_start in range(0, view.size, _SCAN_BYTES):
        popcounts = _POPCOUNT[view[block_start : block_start + _SCAN_BYTES]]
        if seen + int(popcounts.sum(dtype=np.int64)) >= count:
            last = block_start + int(np.searchsorted(np.cumsum(popcounts, dtype=np.int64), count - seen))
            break
        seen += int(popcounts.sum(dtype=np.int64))
    else:
        raise WireError(f"Rice stream truncated: {seen} of {count} unary codes present")
    nonzero = np.flatnonzero(view[: last + 1])  # each holds >= 1 one and all before ``last`` < count: <= count
    rows, columns = np.nonzero(np.unpackbits(view[nonzero]).reshape(-1, 8))
    ones = nonzero[rows] * 8 + columns
    if ones.size > count:
        raise WireError("Rice stream: non-zero padding bits")
    return ones, start + last + 1


def rice_decode(data: bytes | memoryview, offset: int, parameters: int | np.ndarray,
                count: int) -> tuple[np.ndarray, int]:
    """``count`` Rice-coded values starting at ``data[offset]``; returns them and the offset after."""
    parameters = np.broadcast_to(np.asarray(parameters, dtype=np.uint64), (count,))
    _check_parameters(parameters)
    if count == 0:
        return np.zeros(0, dtype=np.uint64), offset
    rem_end = offset + (int(parameters.sum()) + 7) // 8
    if rem_end > len(data):
        raise WireError(f"Rice stream truncated: remainders need {rem_end - offset} bytes, {len(data) - offset} left")
    if 8 * (len(data) - rem_end) < count:  # every unary code is at least one bit: bound before allocating
        raise WireError(f"Rice stream truncated: {len(data) - rem_end} bytes cannot hold {count} unary codes")
    remainders = unpack_varwidth(memoryview(data)[offset:rem_end], parameters)
    ones, end = _unary_ones(data, rem_end, count)
    quotients = np.diff(ones, prepend=-1).astype(np.uint64) - np.uint64(1)
    if (quotients >> (np.uint64(63) - parameters)).any():
        raise WireError("Rice stream: a value does not fit in 63 bits")  # the shift below would overflow
    return (quotients << parameters) | remainders, end


_COUNT = struct.Struct("<I")
_PARAMETER_BITS = 6  # per run of RICE_BLOCK gaps; holds 0..MAX_RICE_PARAMETER


def encode_positions(positions: np.ndarray, size: int) -> bytes:
    """A sorted set of distinct indices in ``range(size)``: the count, one 6-bit Rice parameter per
    run of ``RICE_BLOCK`` gaps, then the Rice-coded gaps (``p0``, then ``p[i] - p[i-1] - 1``)."""
    positions = np.asarray(positions, dtype=np.int64)
    if positions.size and (positions[0] < 0 or positions[-1] >= size or np.any(np.diff(positions) <= 0)):
        raise WireError("positions must be strictly increasing and inside the vector")
    gaps = np.diff(positions, prepend=-1) - 1
    parameters = best_rice_parameters(gaps)
    per_gap = np.repeat(parameters, RICE_BLOCK)[: gaps.size]
    return _COUNT.pack(positions.size) + pack_uint(parameters, _PARAMETER_BITS) + rice_encode(gaps, per_gap)


def decode_positions(data: bytes | memoryview, offset: int, size: int) -> tuple[np.ndarray, int]:
    """Inverse of ``encode_positions``; returns int64 positions and the offset after them."""
    end = offset + _COUNT.size
    if end > len(data):
        raise WireError("positions header truncated")
    (count,) = _COUNT.unpack_from(data, offset)
    if count > size:
        raise WireError(f"positions: {count} entries claimed for a vector of {size}")
    if count > 8 * (len(data) - end):  # each gap takes at least one bit: bound the count before allocating
        raise WireError(f"positions: {count} entries claimed in {len(data) - end} bytes")
    runs = -(-count // RICE_BLOCK)
    params_end = end + packed_size(runs, _PARAMETER_BITS)
    if params_end > len(data):
        raise WireError("positions: Rice parameters truncated")
    parameters = unpack_uint(data[end:params_end], _PARAMETER_BITS, runs)
    gaps, end = rice_decode(data, params_end, np.repeat(parameters, RICE_BLOCK)[:count], count)
    if count and int(gaps.max()) >= size:
        raise WireError("positions: a gap points past the end of the vector")
    positions = np.cumsum(gaps.astype(np.int64) + 1) - 1
    if count and positions[-1] >= size:
        raise WireError(f"positions: index {int(positions[-1])} outside a vector of {size}")
    return positions, end
