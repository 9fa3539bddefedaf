"""DRIVE, Vargaftik et al., NeurIPS 2021 ("DRIVE: One-bit Distributed Mean Estimation",
arXiv:2105.08339): rotate, send one sign bit per coordinate and one scale.

Rotate ``x`` by ``R = H D / sqrt(n)`` (Walsh-Hadamard times seeded random signs ``D``, the seed in
the header so both ends draw the same ``D``), send ``sign(R x)`` as one bit a coordinate and one
float32 scale ``S``; the decoder returns ``R^T (S sign(R x))``. The paper's two scales:

- biased (default): ``S = ||R x||_1 / n``, the ``S`` that minimises ``||x - S R^T sign(R x)||^2``;
  with a uniform random rotation the normalised error tends to ``1 - 2/pi`` (about 0.363);
- ``unbiased=true``: ``S = ||x||^2 / ||R x||_1`` (unbiased for a uniform random rotation; the
  Hadamard form is the paper's practical one), normalised error about ``pi/2 - 1`` (0.571).

The rotation is blocked: full blocks of ``block`` values, then the tail split into its binary
digits (powers of two down to ``MIN_SEGMENT``) and the last few values padded to a power of two,
so at most ``MIN_SEGMENT - 1`` zeros are padded (a single pad to the next power of two, as the
sketch codec does, can cost up to 2x). Each segment gets its own scale (DRIVE applied per segment).

``sparsity=s`` keeps the top ``1 - s`` fraction by magnitude first (positions Rice-coded as in
``stc``) and sends the kept values rotated and 1-bit: the sparse values quantised and entropy-coded.
With ``feedback=true`` (default) what was not sent (dropped entries, the 1-bit error) is carried to
the next call as in ``stc``/``dgc`` (error feedback). State: ``residual`` float32 (size,).

Payload: header (tag, flags, log2 block, seed), positions when sparse, one float32 scale a segment,
the sign bits (1 = non-negative).
"""
from __future__ import annotations

import struct
from collections.abc import Mapping
from typing import Any, ClassVar

import numpy as np

from ..errors import WireError
from .bitio import decode_positions, encode_positions, pack_uint, packed_size, unpack_uint
from .dgc import sparse_vector
from .entropy import PayloadBits, empirical_entropy_bits, index_set_bound_bits
from .hadamard import flip_random_signs, next_power_of_two, random_signs, walsh_hadamard
from .params import KnobParams, Knob, check_size, check_vector, kept_count, non_negative, read_params, state_array
from .sketch import _SEED_MASK, fresh_seed
from .stc import top_k_positions

_DRIVE_TAG = 0x56  # 'V' (Vargaftik)
_HEADER = struct.Struct("<BBBQ")  # tag, flags, log2(block), seed
_UNBIASED, _SPARSE = 1, 2  # flag bits
_SIGN_STREAM = 4  # the seed's stream for D (the sketch codec uses 1-3)
MIN_LOG_BLOCK, MAX_LOG_BLOCK = 6, 24
MIN_SEGMENT = 1 << MIN_LOG_BLOCK  # tail pieces below this are padded, not split further


def segments(count: int, block: int) -> list[tuple[int, int, int]]:
    """(start, values, width) per rotated segment of ``count`` values: full ``block``s, the tail's
    power-of-two pieces down to ``MIN_SEGMENT``, then the rest zero-padded to a power of two."""
    out, start = [], 0
    full = count // block
    out.extend((i * block, block, block) for i in range(full))
    start = full * block
    width = block >> 1
    while count - start >= MIN_SEGMENT:
        if count - start >= width:
            out.append((start, width, width))
            start += width
        width >>= 1
    if count > start:
        out.append((start, count - start, next_power_of_two(count - start)))
    return out


def layout(count: int, block: int) -> tuple[int, int]:
    """(segments, padded length) of ``segments(count, block)`` in O(log block), without the list: the
    decoder checks a payload's length against these before it allocates anything."""
    full, tail = divmod(count, block)
    pieces = bin(tail >> MIN_LOG_BLOCK).count("1")  # the tail's powers of two >= MIN_SEGMENT
    rest = tail & (MIN_SEGMENT - 1)
    return full + pieces + (1 if rest else 0), count - rest + (next_power_of_two(rest) if rest else 0)


def _power_of_two_block(value: int) -> bool:
    return value & (value - 1) == 0 and MIN_SEGMENT <= value <= 1 << MAX_LOG_BLOCK


class DriveCodec(KnobParams):
    """Randomised Hadamard rotation + 1-bit signs + one scale per segment (DRIVE), optionally after a
    top-k sparsification, with error feedback; params ``sparsity`` (0 = dense), ``unbiased``,
    ``block``, ``feedback``, ``seed``."""

    name = "drive"
    lossless = False
    _knobs: ClassVar[dict[str, Knob]] = {
        "sparsity": Knob(float, 0.0, lambda s: 0.0 <= s < 1.0, "in [0, 1)"),
        "unbiased": Knob(bool, False),
        "block": Knob(int, 1 << 16, _power_of_two_block, f"a power of two in [{MIN_SEGMENT}, 2**{MAX_LOG_BLOCK}]"),
        "feedback": Knob(bool, True),
        "seed": Knob(int, None, non_negative, ">= 0"),
    }

    def encode(self, vector: np.ndarray, state: dict[str, np.ndarray] | None,
               params: Mapping[str, Any]) -> tuple[bytes, dict[str, np.ndarray] | None]:
        p = read_params(self.name, params, self._knobs)
        update = check_vector(self.name, vector)
        size = update.size
        accumulated = state_array(self.name, state, "residual", size) if p["feedback"] else update.copy()
        if p["feedback"]:
            accumulated += update
        sparse = p["sparsity"] > 0.0
        positions = top_k_positions(np.abs(accumulated), kept_count(1.0 - p["sparsity"], size)) if sparse else None
        kept = accumulated[positions] if sparse else accumulated
        seed = fresh_seed(p["seed"]) & _SEED_MASK
        scales, positive = _quantise(kept, p["block"], seed, p["unbiased"])
        flags = (_UNBIASED if p["unbiased"] else 0) | (_SPARSE if sparse else 0)
        payload = (_HEADER.pack(_DRIVE_TAG, flags, p["block"].bit_length() - 1, seed)
                   + (encode_positions(positions, size) if sparse else b"")
                   + scales.astype("<f4").tobytes() + pack_uint(positive, 1))
        if not p["feedback"]:
            return payload, state
        sent = _dequantise(scales, positive, kept.size, p["block"], seed)
        residual = accumulated  # in place: what was not sent stays for the next call
        if sparse:
            residual[positions] -= sent
        else:
            residual -= sent
        return payload, {"residual": residual}

    def _parse(self, data: bytes, size: int) -> tuple[int, int, int, np.ndarray | None, np.ndarray, np.ndarray, int]:
        """(flags, block, seed, positions or None, scales, sign bits, where the scales start); every
        length the header implies is checked against ``len(data)`` before anything is allocated."""
        if len(data) < _HEADER.size:
            raise WireError(f"drive codec: {len(data)} bytes is shorter than its header")
        tag, flags, log_block, seed = _HEADER.unpack_from(data)
        if tag != _DRIVE_TAG or flags > (_UNBIASED | _SPARSE) or seed > _SEED_MASK:
            raise WireError(f"drive codec: bad header (tag {tag:#x}, flags {flags:#x})")
        if not MIN_LOG_BLOCK <= log_block <= MAX_LOG_BLOCK:
            raise WireError(f"drive codec: block 2**{log_block} outside [2**{MIN_LOG_BLOCK}, 2**{MAX_LOG_BLOCK}]")
        positions, scales_at = None, _HEADER.size
        if flags & _SPARSE:
            positions, scales_at = decode_positions(data, _HEADER.size, size)
        count = size if positions is None else positions.size
        block = 1 << log_block
        parts, padded = layout(count, block)
        signs_at = scales_at + 4 * parts
        expected = signs_at + packed_size(padded, 1)
        if len(data) != expected:
            raise WireError(f"drive codec: {len(data)} bytes, the header implies {expected}")
        scales = np.frombuffer(data, dtype="<f4", count=parts, offset=scales_at).astype(np.float32)
        if not (np.isfinite(scales).all() and (scales >= 0).all()):
            raise WireError("drive codec: a scale is not a finite non-negative number")
        positive = unpack_uint(memoryview(data)[signs_at:], 1, padded).astype(np.uint8)
        return flags, block, seed, positions, scales, positive, scales_at

    def decode(self, data: bytes, size: int, params: Mapping[str, Any]) -> np.ndarray:
        read_params(self.name, params, self._knobs)
        size = check_size(self.name, size)
        _, block, seed, positions, scales, positive, _ = self._parse(data, size)
        count = size if positions is None else positions.size
        values = _dequantise(scales, positive, count, block, seed)
        return values if positions is None else sparse_vector(size, positions, values)

    def account(self, data: bytes, size: int) -> PayloadBits:
        """Header; index bits (the Rice-coded positions) against ``log2 C(size, k)``; values (scales and
        sign bits) against 32 bits a scale plus the signs' empirical entropy."""
        _, _, _, positions, scales, positive, scales_at = self._parse(data, size)
        index_bits = 8 * (scales_at - _HEADER.size)
        bound = index_set_bound_bits(size, positions.size) if positions is not None else 0.0
        value_bits = 8 * len(data) - 8 * scales_at
        return PayloadBits(8 * len(data), 8 * _HEADER.size, index_bits, bound, value_bits,
                           32.0 * scales.size + empirical_entropy_bits(positive))

    def __repr__(self) -> str:
        return "DriveCodec()"


def _width_groups(parts: list[tuple[int, int, int]]) -> list[tuple[int, int, int]]:
    """Runs of equal-width segments as (first segment, rows, width). Segments are contiguous and only
    the last is padded, so the padded stream is the values followed by zeros and each run is a
    (rows, width) view of it."""
    groups, i = [], 0
    while i < len(parts):
        j = i
        while j < len(parts) and parts[j][2] == parts[i][2]:
            j += 1
        groups.append((i, j - i, parts[i][2]))
        i = j
    return groups


def _quantise(kept: np.ndarray, block: int, seed: int, unbiased: bool) -> tuple[np.ndarray, np.ndarray]:
    """Per-segment scales (float32) and the sign bits (uint8, 1 = non-negative) of ``R kept``."""
    parts = segments(kept.size, block)
    padded = sum(width for _, _, width in parts)
    stream = np.zeros(padded, dtype=np.float32)
    stream[: kept.size] = kept
    stream *= random_signs(seed, _SIGN_STREAM, padded)
    scales = np.zeros(len(parts), dtype=np.float64)
    positive = np.empty(padded, dtype=np.uint8)
    offset = 0
    for first, rows, width in _width_groups(parts):
        rotated = walsh_hadamard(stream[offset : offset + rows * width].reshape(rows, width))
        l1 = np.abs(rotated).sum(axis=1, dtype=np.float64)
        if unbiased:  # ||x||^2 / ||R x||_1; R is orthonormal, so ||x|| = ||R x||
            squares = np.square(rotated, dtype=np.float64).sum(axis=1)
            scales[first : first + rows] = np.divide(squares, l1, out=np.zeros_like(l1), where=l1 > 0)
        else:  # ||R x||_1 / n: the MSE-minimising scale for these signs
            scales[first : first + rows] = l1 / width
        positive[offset : offset + rows * width] = (rotated >= 0).reshape(-1)
        offset += rows * width
    return scales.astype(np.float32), positive


def _dequantise(scales: np.ndarray, positive: np.ndarray, count: int, block: int, seed: int) -> np.ndarray:
    """``R^T (S sign)`` per segment, the padding dropped: ``count`` float32 values."""
    parts = segments(count, block)
    stream = np.empty(positive.size, dtype=np.float32)
    offset = 0
    for first, rows, width in _width_groups(parts):
        bits = positive[offset : offset + rows * width].reshape(rows, width)
        rotated = np.where(bits != 0, np.float32(1.0), np.float32(-1.0)) * scales[first : first + rows, None]
        stream[offset : offset + rows * width] = walsh_hadamard(rotated).reshape(-1)  # H is its own inverse
        offset += rows * width
    flip_random_signs(stream, seed, _SIGN_STREAM)  # D^T = D
    return stream[:count].copy() if count < stream.size else stream
