"""Sketched updates of Konečný et al. 2016 ("Federated Learning: Strategies for Improving
Communication Efficiency", arXiv:1610.05492): random subsampling, a randomized Hadamard rotation,
and unbiased probabilistic quantisation to 1-8 bits.

``sketch``: keep each entry with probability ``keep`` (the mask travels as a 64-bit seed, never as
indices), rotate the kept values in power-of-two blocks of ``block`` (the tail padded to the next
power of two, so padding costs at most ``block`` values instead of up to 2x for one global pad),
quantise each block stochastically between its min and max with ``bits`` bits. The decoder
regenerates mask and signs from the seed, inverts, and divides by ``keep``: E[decode] = x.

``random_mask``: the same seeded mask, values sent as fp16 (or fp32), rescaled by ``1/keep``.
"""
from __future__ import annotations

import math
import struct
from collections.abc import Iterator, Mapping
from typing import Any, ClassVar

import numpy as np

from ..errors import WireError
from .bitio import pack_uint, packed_size, unpack_uint8
from .entropy import PayloadBits, empirical_entropy_bits
from .hadamard import flip_random_signs, next_power_of_two, random_signs, rotate, walsh_hadamard_unscaled
from .params import KnobParams, Knob, check_size, check_vector, non_negative, read_params
from .quant import check_ranges, decode_values, dequantize_blocks, encode_values, quantize_blocks

_MASK_STREAM, _SIGN_STREAM, _ROUNDING_STREAM = 1, 2, 3
_SEED_MASK = (1 << 63) - 1


def fresh_seed(seed: int | None) -> int:
    """``seed`` if given, else 63 bits of OS entropy (each round gets its own mask and signs)."""
    return seed if seed is not None else int(np.random.SeedSequence().entropy) & _SEED_MASK


def seeded_mask(seed: int, size: int, keep: float) -> np.ndarray:
    """Indices kept by a Bernoulli(``keep``) mask drawn from ``seed``; both sides draw the same."""
    if keep >= 1.0:
        return np.arange(size, dtype=np.int64)
    return np.flatnonzero(np.random.default_rng([seed, _MASK_STREAM]).random(size) < keep)


def _check_keep(codec: str, keep: float) -> None:
    if not (0.0 < keep <= 1.0):  # also catches NaN from corrupt bytes
        raise WireError(f"{codec} codec: keep fraction {keep!r} outside (0, 1]")


def _segments(count: int, block: int) -> tuple[int, int, int]:
    """Full blocks, tail length and the tail's padded (power-of-two) length for ``count`` values."""
    full, tail = divmod(count, block)
    return full, tail, (next_power_of_two(tail) if tail else 0)


_SKETCH_HEADER = struct.Struct("<BBBBdQ")  # tag, bits, log2(block), rotate, keep, seed
_SKETCH_TAG = 0x53  # 'S'


def _power_of_two(value: int) -> bool:
    return value >= 1 and value & (value - 1) == 0


def _unrotated_block_values(codes: np.ndarray, lo: np.ndarray, step: np.ndarray, keep: float) -> np.ndarray:
    """``H (lo + step c) / (sqrt(n) keep)`` for each row of codes ``c`` (before ``D``'s signs), float32:
    ``H c`` exactly, times one float32 factor per block; the first entry also carries ``lo n``, in float64."""
    width = codes.shape[1]
    transformed = walsh_hadamard_unscaled(codes)
    factor = 1.0 / (math.sqrt(width) * keep)
    first = (lo * width + step * transformed[:, 0].astype(np.float64)) * factor
    transformed *= (step * factor).astype(np.float32)[:, None]
    transformed[:, 0] = first
    return transformed


class SketchCodec(KnobParams):
    """Subsample (seeded mask) + randomized Hadamard rotation + stochastic ``bits``-bit quantisation."""

    name = "sketch"
    lossless = False
    _knobs: ClassVar[dict[str, Knob]] = {
        "bits": Knob(int, 2, lambda b: 1 <= b <= 8, "in 1..8"),
        "keep": Knob(float, 1.0, lambda k: 0.0 < k <= 1.0, "in (0, 1]"),
        "block": Knob(int, 1 << 16, lambda b: _power_of_two(b) and b <= 1 << 24, "a power of two <= 2**24"),
        "rotate": Knob(bool, True),
        "seed": Knob(int, None, non_negative, ">= 0"),
    }

    def encode(self, vector: np.ndarray, state: dict[str, np.ndarray] | None,
               params: Mapping[str, Any]) -> tuple[bytes, dict[str, np.ndarray] | None]:
        p = read_params(self.name, params, self._knobs)
        vector = check_vector(self.name, vector)
        seed = fresh_seed(p["seed"]) & _SEED_MASK
        kept = vector[seeded_mask(seed, vector.size, p["keep"])]
        header = _SKETCH_HEADER.pack(_SKETCH_TAG, p["bits"], p["block"].bit_length() - 1, p["rotate"], p["keep"], seed)
        rng = np.random.default_rng([seed, _ROUNDING_STREAM])
        ranges, codes = [], []
        for rows, _ in self._rows(kept, p["block"], p["rotate"], seed):
            c, lo, step = quantize_blocks(rows, p["bits"], True, rng)
            ranges.append(np.stack([lo, step], axis=1))
            codes.append(c.reshape(-1))
        if not codes:
            return header, state
        packed = pack_uint(np.concatenate(codes), p["bits"])
        return header + np.concatenate(ranges).astype("<f4").tobytes() + packed, state

    @staticmethod
    def _rows(kept: np.ndarray, block: int, rotate_on: bool, seed: int) -> Iterator[tuple[np.ndarray, int]]:
        """(rows, start) for the full blocks, then the zero-padded tail, rotated when ``rotate_on``."""
        full, tail, padded = _segments(kept.size, block)
        signs = random_signs(seed, _SIGN_STREAM, full * block + padded) if rotate_on else None
        parts = []
        if full:
            parts.append((kept[: full * block].reshape(full, block), 0))
        if tail:
            parts.append((np.pad(kept[full * block :], (0, padded - tail)).reshape(1, padded), full * block))
        for rows, start in parts:
            yield (rotate(rows, signs[start : start + rows.size]) if signs is not None else rows), start

    def _parse(self, data: bytes, size: int) -> tuple[int, bool, float, int, np.ndarray | None, int, np.ndarray,
                                                      np.ndarray]:
        """(block, rotate, keep, seed, kept positions or None when all are kept, how many, ranges, uint8 codes)."""
        if len(data) < _SKETCH_HEADER.size:
            raise WireError(f"sketch codec: {len(data)} bytes is shorter than its header")
        tag, bits, log_block, rotate_on, keep, seed = _SKETCH_HEADER.unpack_from(data)
        if tag != _SKETCH_TAG or not 1 <= bits <= 8 or log_block > 24 or rotate_on > 1 or seed > _SEED_MASK:
            raise WireError(f"sketch codec: bad header (tag {tag:#x}, bits {bits}, log2 block {log_block})")
        _check_keep(self.name, keep)
        block = 1 << log_block
        kept_at = seeded_mask(seed, size, keep) if keep < 1.0 else None  # all kept: no index array at all
        kept_count = size if kept_at is None else kept_at.size
        full, tail, padded = _segments(kept_count, block)
        segments = full + (1 if tail else 0)
        values = full * block + padded
        expected = _SKETCH_HEADER.size + 8 * segments + packed_size(values, bits)
        if len(data) != expected:
            raise WireError(f"sketch codec: {len(data)} bytes, header implies {expected}")
        ranges = np.frombuffer(data, dtype="<f4", count=2 * segments, offset=_SKETCH_HEADER.size).reshape(-1, 2)
        codes = unpack_uint8(memoryview(data)[_SKETCH_HEADER.size + 8 * segments :], bits, values)
        return block, bool(rotate_on), keep, seed, kept_at, kept_count, ranges.astype(np.float32), codes

    def decode(self, data: bytes, size: int, params: Mapping[str, Any]) -> np.ndarray:
        """Codes -> values -> inverse rotation -> 1/keep, one float32 rounding per value where rotated: the
        rotation is linear, so ``H (lo + step c) = lo H 1 + step H c`` with ``H 1 = n e_0``; ``H c`` of the
        integer codes is exact in float32, then one scale per block and the sign flips of ``D``."""
        read_params(self.name, params, self._knobs)
        size = check_size(self.name, size)
        block, rotate_on, keep, seed, kept_at, kept_count, ranges, codes = self._parse(data, size)
        check_ranges(self.name, ranges[:, 0], ranges[:, 1])
        full, tail, padded = _segments(kept_count, block)
        kept = np.empty(full * block + padded, dtype=np.float32)
        segments = [(0, 0, full, block)] + ([(full * block, full, 1, padded)] if tail else [])
        for start, r0, rows, width in segments:
            if rows == 0:
                continue
            block_codes = codes[start : start + rows * width].reshape(rows, width)
            lo, step = ranges[r0 : r0 + rows, 0].astype(np.float64), ranges[r0 : r0 + rows, 1].astype(np.float64)
            if rotate_on:
                part = _unrotated_block_values(block_codes, lo, step, keep)
            else:  # float64 like the quantiser: lo + step c may cancel, and this path is not the hot one
                part = (dequantize_blocks(block_codes, lo, step).astype(np.float64) / keep).astype(np.float32)
            kept[start : start + rows * width] = part.reshape(-1)
        if rotate_on:
            flip_random_signs(kept, seed, _SIGN_STREAM)
        if kept_at is None:
            return kept[:size]
        out = np.zeros(size, dtype=np.float32)
        out[kept_at] = kept[:kept_count]
        return out

    def account(self, data: bytes, size: int) -> PayloadBits:
        ranges, codes = self._parse(data, size)[-2:]
        bits = _SKETCH_HEADER.unpack_from(data)[1]
        header_bits = 8 * (_SKETCH_HEADER.size + 8 * len(ranges))
        # The mask is a seed: shared randomness, no index set is sent, so no index bound applies (0).
        return PayloadBits(8 * len(data), header_bits - 64, 64, 0.0, 8 * len(data) - header_bits,
                           empirical_entropy_bits(codes) if bits > 0 else 0.0)

    def __repr__(self) -> str:
        return "SketchCodec()"


_MASK_HEADER = struct.Struct("<BdQ")  # tag, keep, seed
_MASK_TAG = 0x4D  # 'M'


class RandomMaskCodec(KnobParams):
    """Konečný et al.'s random mask: a seeded Bernoulli(``keep``) subset, values only (fp16 by
    default, ``values=fp32`` for full precision), rescaled by ``1/keep`` so the decode is unbiased."""

    name = "random_mask"
    lossless = False
    _knobs: ClassVar[dict[str, Knob]] = {
        "keep": Knob(float, 0.1, lambda k: 0.0 < k <= 1.0, "in (0, 1]"),
        "values": Knob(str, "fp16", lambda v: v in ("fp16", "fp32"), "fp16 or fp32"),
        "seed": Knob(int, None, non_negative, ">= 0"),
    }

    def encode(self, vector: np.ndarray, state: dict[str, np.ndarray] | None,
               params: Mapping[str, Any]) -> tuple[bytes, dict[str, np.ndarray] | None]:
        p = read_params(self.name, params, self._knobs)
        vector = check_vector(self.name, vector)
        seed = fresh_seed(p["seed"]) & _SEED_MASK
        values, _ = encode_values(vector[seeded_mask(seed, vector.size, p["keep"])], p["values"] == "fp16")
        return _MASK_HEADER.pack(_MASK_TAG, p["keep"], seed) + values, state

    def _parse(self, data: bytes, size: int) -> tuple[float, np.ndarray, np.ndarray]:
        if len(data) < _MASK_HEADER.size:
            raise WireError(f"random_mask codec: {len(data)} bytes is shorter than its header")
        tag, keep, seed = _MASK_HEADER.unpack_from(data)
        if tag != _MASK_TAG or seed > _SEED_MASK:
            raise WireError(f"random_mask codec: bad header (tag {tag:#x})")
        _check_keep(self.name, keep)
        kept_at = seeded_mask(seed, size, keep)
        values, end = decode_values(data, _MASK_HEADER.size, kept_at.size)
        if end != len(data):
            raise WireError(f"random_mask codec: {len(data) - end} bytes after the values")
        return keep, kept_at, values

    def decode(self, data: bytes, size: int, params: Mapping[str, Any]) -> np.ndarray:
        read_params(self.name, params, self._knobs)
        size = check_size(self.name, size)
        keep, kept_at, values = self._parse(data, size)
        out = np.zeros(size, dtype=np.float32)
        out[kept_at] = (values.astype(np.float64) / keep).astype(np.float32)
        return out

    def account(self, data: bytes, size: int) -> PayloadBits:
        _, _, values = self._parse(data, size)
        value_bits = 8 * (len(data) - _MASK_HEADER.size - 1)
        fp16 = value_bits == 16 * values.size
        symbols = values.astype(np.float16).view(np.uint16) if fp16 else values.view(np.uint32)
        return PayloadBits(8 * len(data), 8 * (_MASK_HEADER.size + 1) - 64, 64, 0.0, value_bits,
                           empirical_entropy_bits(symbols))

    def __repr__(self) -> str:
        return "RandomMaskCodec()"
