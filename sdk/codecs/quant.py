"""Baseline value codecs and the quantisers other codecs reuse.

``fp16``: IEEE half precision, 2 bytes a value (lossless for values that are already fp16).
``q8``: 8-bit uniform quantisation with a (min, step) pair per block; stochastic rounding (on by
default) makes it unbiased, E[decode] = x (as in QSGD, Alistarh et al. 2017, and the
probabilistic quantisation of Konečný et al. 2016).
"""
from __future__ import annotations

import math
import struct
from collections.abc import Mapping
from typing import Any, ClassVar

import numpy as np

from ..errors import WireError
from .entropy import PayloadBits, empirical_entropy_bits
from .params import KnobParams, Knob, check_size, check_vector, non_negative, read_params

_F16 = np.dtype("<f2")
_F32 = np.dtype("<f4")
FP16_MAX = float(np.finfo(np.float16).max)


def rng_for(seed: int | None) -> np.random.Generator:
    """A generator from ``seed``, or from fresh OS entropy when none is given (the usual case:
    rounding noise must differ from round to round)."""
    return np.random.default_rng(seed)


# ---- values as fp16 when they fit, else fp32 (one flag byte says which) -------------------------

def encode_values(values: np.ndarray, prefer_fp16: bool) -> tuple[bytes, np.ndarray]:
    """A flag byte plus the values; returns the bytes and the float32 values the decoder will see
    (so error feedback can keep exactly what rounding lost)."""
    if prefer_fp16 and (values.size == 0 or float(np.abs(values).max()) <= FP16_MAX):
        half = values.astype(_F16)
        return b"\x01" + half.tobytes(), half.astype(np.float32)
    return b"\x00" + values.astype(_F32).tobytes(), values.astype(np.float32)


def decode_values(data: bytes | memoryview, offset: int, count: int) -> tuple[np.ndarray, int]:
    """Inverse of ``encode_values``: ``count`` values from ``data[offset]``; returns them and the end."""
    if offset >= len(data):
        raise WireError("values field truncated (no format byte)")
    flag = data[offset]
    if flag not in (0, 1):
        raise WireError(f"values field: unknown format byte {flag}")
    dtype = _F16 if flag == 1 else _F32
    end = offset + 1 + count * dtype.itemsize
    if end > len(data):
        raise WireError(f"values field truncated: {len(data) - offset - 1} bytes for {count} values")
    field = data[offset + 1 : end]
    values = fp16_bytes_to_float32(field) if flag == 1 else np.frombuffer(field, dtype=_F32).astype(np.float32)
    return values, end


# ---- blockwise uniform quantisation -------------------------------------------------------------

def quantize_blocks(blocks: np.ndarray, bits: int, stochastic: bool,
                    rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Codes in ``0 .. 2**bits - 1`` for each row of ``blocks`` between its min and max.

    Stochastic rounding picks the upper level with probability equal to the fractional part, so the
    dequantised value is unbiased; deterministic rounding picks the nearest level.
    """
    levels = (1 << bits) - 1
    lo = blocks.min(axis=1).astype(np.float32)
    hi = blocks.max(axis=1).astype(np.float32)
    step = ((hi.astype(np.float64) - lo) / levels).astype(np.float32)
    safe = np.where(step > 0, step, 1.0).astype(np.float64)
    # float64 so the position between levels is not biased by float32 rounding.
    scaled = (blocks - lo[:, None].astype(np.float64)) / safe[:, None]
    noise = rng.random(scaled.shape) if stochastic else 0.5
    codes = np.clip(np.floor(scaled + noise), 0, levels)
    codes[step == 0] = 0
    return codes.astype(np.uint8 if bits <= 8 else np.uint16), lo, step


def dequantize_blocks(codes: np.ndarray, lo: np.ndarray, step: np.ndarray) -> np.ndarray:
    return (lo[:, None].astype(np.float64) + codes * step[:, None].astype(np.float64)).astype(np.float32)


def dequantize_codes(codes: np.ndarray, block: int, lo: np.ndarray, step: np.ndarray) -> np.ndarray:
    """``lo + code * step`` per value (``lo``/``step`` of the value's block of ``block`` codes), in
    float64 and rounded once to float32: the same numbers ``dequantize_blocks`` gives.

    Vectorised without per-value gathers: whole blocks are a (rows, block) view scaled in place by
    broadcasting, the partial last block separately. Only ``codes.size`` values are allocated, never
    whole padded blocks: the block length comes off the wire and may be far larger than the vector.
    """
    size = codes.size
    full_rows = size // block
    head = full_rows * block
    values = codes.astype(np.float64)
    if full_rows:
        blocks = values[:head].reshape(full_rows, block)
        blocks *= step[:full_rows, None].astype(np.float64)
        blocks += lo[:full_rows, None].astype(np.float64)
    if head < size:
        tail = values[head:]
        tail *= np.float64(step[full_rows])
        tail += np.float64(lo[full_rows])
    return values.astype(np.float32)


# float32 bits of an fp16 value: the half's exponent and mantissa sit 13 bits up, its sign at bit 31.
_HALF_TO_SINGLE_MASK = np.int32(np.uint32(0x8FFFE000).view(np.int32))
# Rebiases the exponent (127 - 15 = 112); exact for normal and subnormal halves alike.
_HALF_EXPONENT_REBIAS = np.float32(2.0 ** 112)
_HALF_EXPONENT_BITS = 0x7C00
_SINGLE_INF_BITS = 0x7F800000


def fp16_bytes_to_float32(data: bytes | memoryview) -> np.ndarray:
    """Little-endian fp16 values as float32, bit for bit what ``astype(np.float32)`` gives (NaN
    payloads and signs included) at about a third of its cost: numpy's own half-to-single cast is a
    scalar loop, while this is four vectorised integer/float passes (the classic bit-level
    conversion, e.g. F. Giesen, "Half to float done quick", 2012). Inf/NaN halves, which the
    rebiasing would turn into large finite numbers, are patched afterwards; they are rare.
    """
    halves = np.frombuffer(data, dtype="<i2")
    # Sign extension fills bits 16-31 with the sign; the mask keeps bit 31 and clears bits 28-30.
    bits = halves.astype(np.int32)
    bits <<= 13
    bits &= _HALF_TO_SINGLE_MASK
    values = bits.view(np.float32)
    values *= _HALF_EXPONENT_REBIAS
    if values.size and max(float(values.max()), -float(values.min())) > FP16_MAX:
        _patch_non_finite_halves(halves.view("<u2"), bits)
    return values


def _patch_non_finite_halves(halves: np.ndarray, bits: np.ndarray) -> None:
    """Inf/NaN halves (all exponent bits set) as float32 Inf/NaN with the same sign and payload."""
    special = (halves & _HALF_EXPONENT_BITS) == _HALF_EXPONENT_BITS
    half_bits = halves[special].astype(np.uint32)
    single = ((half_bits & 0x8000) << 16) | _SINGLE_INF_BITS | ((half_bits & 0x03FF) << 13)
    bits[special] = single.view(np.int32)


_FEW_RANGES = 64  # up to this many, plain floats check faster than three numpy reductions (~2 vs ~8 µs)


def check_ranges(codec: str, lo: np.ndarray, step: np.ndarray) -> None:
    if lo.size <= _FEW_RANGES:
        ok = all(math.isfinite(value) for value in lo.tolist()) and all(
            math.isfinite(value) and value >= 0 for value in step.tolist())
    else:
        ok = bool(np.isfinite(lo).all() and np.isfinite(step).all() and (step >= 0).all())
    if not ok:
        raise WireError(f"{codec} codec: corrupt quantisation range (non-finite or negative step)")


def to_blocks(vector: np.ndarray, block: int) -> np.ndarray:
    """``vector`` as rows of ``block`` values; the last row is padded with its own last value so the
    padding does not widen that block's range."""
    rows = -(-vector.size // block)
    padded = np.pad(vector.astype(np.float64), (0, rows * block - vector.size), mode="edge")
    return padded.reshape(rows, block)


class Fp16Codec(KnobParams):
    """IEEE fp16, little-endian; stateless. Finite values beyond ±65504 are refused (they would
    become Inf silently)."""

    name = "fp16"
    lossless = False
    _knobs: ClassVar[dict[str, Knob]] = {}

    def encode(self, vector: np.ndarray, state: dict[str, np.ndarray] | None,
               params: Mapping[str, Any]) -> tuple[bytes, dict[str, np.ndarray] | None]:
        read_params(self.name, params, self._knobs)
        vector = check_vector(self.name, vector, finite=False)
        finite = vector[np.isfinite(vector)]
        if finite.size and float(np.abs(finite).max()) > FP16_MAX:
            raise WireError(f"fp16 codec: |value| up to {float(np.abs(finite).max()):.4g} exceeds fp16's "
                            f"{FP16_MAX:g}; use dense or q8 for this update")
        return vector.astype(_F16).tobytes(), state

    def decode(self, data: bytes, size: int, params: Mapping[str, Any]) -> np.ndarray:
        read_params(self.name, params, self._knobs)
        size = check_size(self.name, size)
        if len(data) != 2 * size:
            raise WireError(f"fp16 codec: {len(data)} bytes for {size} fp16 values (expected {2 * size})")
        return fp16_bytes_to_float32(data)

    def account(self, data: bytes, size: int) -> PayloadBits:
        words = np.frombuffer(data, dtype="<u2")
        return PayloadBits(8 * len(data), 0, 0, 0.0, 8 * len(data), empirical_entropy_bits(words))

    def __repr__(self) -> str:
        return "Fp16Codec()"


_Q8_HEADER = struct.Struct("<BI")  # tag, block length
_Q8_TAG = 0x51  # 'Q'


class Q8Codec(KnobParams):
    """8-bit uniform quantisation per block of ``block`` values (0 = one block for the whole vector),
    ``stochastic`` rounding (default true: unbiased), optional ``seed`` for reproducible noise."""

    name = "q8"
    lossless = False
    _knobs: ClassVar[dict[str, Knob]] = {
        "block": Knob(int, 4096, non_negative, ">= 0"),
        "stochastic": Knob(bool, True),
        "seed": Knob(int, None, non_negative, ">= 0"),
    }

    def encode(self, vector: np.ndarray, state: dict[str, np.ndarray] | None,
               params: Mapping[str, Any]) -> tuple[bytes, dict[str, np.ndarray] | None]:
        p = read_params(self.name, params, self._knobs)
        vector = check_vector(self.name, vector)
        block = p["block"] or max(vector.size, 1)
        if vector.size == 0:
            return _Q8_HEADER.pack(_Q8_TAG, block), state
        codes, lo, step = quantize_blocks(to_blocks(vector, block), 8, p["stochastic"], rng_for(p["seed"]))
        ranges = np.stack([lo, step], axis=1).astype(_F32).tobytes()
        return _Q8_HEADER.pack(_Q8_TAG, block) + ranges + codes.reshape(-1)[: vector.size].tobytes(), state

    def _parse(self, data: bytes, size: int) -> tuple[int, np.ndarray, np.ndarray, np.ndarray]:
        if len(data) < _Q8_HEADER.size:
            raise WireError(f"q8 codec: {len(data)} bytes is shorter than its header")
        tag, block = _Q8_HEADER.unpack_from(data)
        if tag != _Q8_TAG or block == 0:
            raise WireError(f"q8 codec: bad header (tag {tag:#x}, block {block})")
        rows = -(-size // block)
        expected = _Q8_HEADER.size + 8 * rows + size
        if len(data) != expected:
            raise WireError(f"q8 codec: {len(data)} bytes for {size} values in blocks of {block} (expected {expected})")
        ranges = np.frombuffer(data, dtype=_F32, count=2 * rows, offset=_Q8_HEADER.size).reshape(rows, 2)
        codes = np.frombuffer(data, dtype=np.uint8, offset=_Q8_HEADER.size + 8 * rows)
        return block, ranges[:, 0].astype(np.float32), ranges[:, 1].astype(np.float32), codes

    def decode(self, data: bytes, size: int, params: Mapping[str, Any]) -> np.ndarray:
        read_params(self.name, params, self._knobs)
        size = check_size(self.name, size)
        block, lo, step, codes = self._parse(data, size)
        check_ranges(self.name, lo, step)
        return dequantize_codes(codes, block, lo, step)

    def account(self, data: bytes, size: int) -> PayloadBits:
        _, lo, _, codes = self._parse(data, size)
        header = 8 * (_Q8_HEADER.size + 8 * lo.size)
        return PayloadBits(8 * len(data), header, 0, 0.0, 8 * codes.size, empirical_entropy_bits(codes))

    def __repr__(self) -> str:
        return "Q8Codec()"


__all__ = ["Fp16Codec", "Q8Codec", "decode_values", "dequantize_blocks", "dequantize_codes", "encode_values",
           "fp16_bytes_to_float32", "quantize_blocks", "to_blocks"]
