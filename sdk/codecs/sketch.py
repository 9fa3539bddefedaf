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

import functools
import math
import struct
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from types import ModuleType
from typing import Any, ClassVar

import numpy as np

from ..errors import WireError
from .bitio import check_padding_bits, pack_uint, packed_size, unpack_uint8
from .entropy import PayloadBits, empirical_entropy_bits
from .hadamard import (compiled_kernels, compiled_kernels_failed, flip_by_sign_words, flip_random_signs,
                       next_power_of_two, random_sign_words, random_signs, rotate, sign_key, signs_from_words,
                       walsh_hadamard_unscaled)
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
# The tag names the format. 0x73 ('s', format 2): the signs of D are the bits of SplitMix64 words
# (hadamard.random_sign_words). 0x53 ('S', format 1, sent by releases before it): one sign per byte
# (hadamard.random_signs). Both decode; encoders send format 2. A decoder that knows only format 1
# refuses format 2 by its tag, never misreads it.
_SKETCH_TAG = 0x73
_SKETCH_TAG_BYTE_SIGNS = 0x53
_KERNEL_MIN_WIDTH = 256  # the compiled kernels fuse the signs into the last pass, a word (64) per lane run


def _power_of_two(value: int) -> bool:
    return value >= 1 and value & (value - 1) == 0


def _unrotated_block_values(codes: np.ndarray, lo: np.ndarray, step: np.ndarray, keep: float, bits: int) -> np.ndarray:
    """``H (lo + step c) / (sqrt(n) keep)`` for each row of codes ``c`` (before ``D``'s signs), float32:
    ``H c`` exactly, times one float32 factor per block; the first entry also carries ``lo n``, in float64."""
    width = codes.shape[1]
    transformed = walsh_hadamard_unscaled(codes)
    factor = 1.0 / (math.sqrt(width) * keep)
    # (H c)_0 is the row's code sum; float32 sums are exact below 2**24, beyond it count it in integers
    # (lo n and step (H c)_0 cancel, so its rounding would be magnified), as the compiled kernels do.
    code_sums = (codes.sum(axis=1, dtype=np.int64).astype(np.float64) if width * ((1 << bits) - 1) >= 1 << 24
                 else transformed[:, 0].astype(np.float64))
    first = (lo * width + step * code_sums) * factor
    transformed *= (step * factor).astype(np.float32)[:, None]
    transformed[:, 0] = first
    return transformed


@dataclass(frozen=True)
class _Segment:
    """``rows`` blocks of ``width`` values starting at value ``start`` (and range row ``first_row``)."""

    start: int
    first_row: int
    rows: int
    width: int


@dataclass(frozen=True)
class _Layout:
    """How ``kept_count`` values travel in blocks: the segments, the values sent (the kept ones plus the
    tail's padding), the rows (one range each) and, for the compiled kernels, the segments they take."""

    segments: tuple[_Segment, ...]
    values: int
    rows: int
    kernel_segments: tuple[_Segment, ...]
    kernel_table: np.ndarray  # (start, first range row, rows, width) of each kernel segment, int64, read-only


@dataclass(frozen=True)
class _SketchPayload:
    """A sketch payload's header and fields, checked against the size it must decode to."""

    bits: int
    block: int
    rotate: bool
    keep: float
    seed: int
    byte_signs: bool  # format 1 (tag 0x53): one sign per generator byte
    kept_at: np.ndarray | None  # positions kept, None when all are
    kept_count: int
    layout: _Layout
    ranges: np.ndarray  # (rows, 2) float32: lo, step
    packed: np.ndarray  # the packed codes, uint8, a view of the payload

    @property
    def segments(self) -> tuple[_Segment, ...]:
        return self.layout.segments

    @property
    def values(self) -> int:
        """Values sent: the kept ones plus the tail's padding."""
        return self.layout.values

    def codes(self) -> np.ndarray:
        return unpack_uint8(self.packed, self.bits, self.values)


@functools.lru_cache(maxsize=64)
def _layout(kept_count: int, block: int) -> _Layout:
    """The full blocks, then the tail padded to a power of two (cached: an aggregator decodes the same
    layout for every update of a run)."""
    full, tail, padded = _segments(kept_count, block)
    segments = ((_Segment(0, 0, full, block),) if full else ()) + ((_Segment(full * block, full, 1, padded),)
                                                                   if tail else ())
    fast = tuple(seg for seg in segments if seg.width >= _KERNEL_MIN_WIDTH)
    table = np.array([(seg.start, seg.first_row, seg.rows, seg.width) for seg in fast], dtype=np.int64).reshape(-1, 4)
    table.flags.writeable = False
    return _Layout(segments, sum(seg.rows * seg.width for seg in segments), sum(seg.rows for seg in segments), fast,
                   table)


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
        return encode_sketch(vector, read_params(self.name, params, self._knobs)), state

    def _parse(self, data: bytes, size: int) -> _SketchPayload:
        if len(data) < _SKETCH_HEADER.size:
            raise WireError(f"sketch codec: {len(data)} bytes is shorter than its header")
        tag, bits, log_block, rotate_on, keep, seed = _SKETCH_HEADER.unpack_from(data)
        if (tag not in (_SKETCH_TAG, _SKETCH_TAG_BYTE_SIGNS) or not 1 <= bits <= 8 or log_block > 24 or rotate_on > 1
                or seed > _SEED_MASK):
            raise WireError(f"sketch codec: bad header (tag {tag:#x}, bits {bits}, log2 block {log_block})")
        _check_keep(self.name, keep)
        block = 1 << log_block
        kept_at = seeded_mask(seed, size, keep) if keep < 1.0 else None  # all kept: no index array at all
        kept_count = size if kept_at is None else kept_at.size
        layout = _layout(kept_count, block)
        expected = _SKETCH_HEADER.size + 8 * layout.rows + packed_size(layout.values, bits)  # a range per row
        if len(data) != expected:
            raise WireError(f"sketch codec: {len(data)} bytes, header implies {expected}")
        ranges = np.frombuffer(data, dtype="<f4", count=2 * layout.rows, offset=_SKETCH_HEADER.size).reshape(-1, 2)
        packed = np.frombuffer(data, dtype=np.uint8, offset=_SKETCH_HEADER.size + 8 * layout.rows)
        return _SketchPayload(bits, block, bool(rotate_on), keep, seed, tag == _SKETCH_TAG_BYTE_SIGNS, kept_at,
                              kept_count, layout, np.asarray(ranges, dtype=np.float32), packed)

    def decode(self, data: bytes, size: int, params: Mapping[str, Any]) -> np.ndarray:
        """Codes -> values -> inverse rotation -> 1/keep, one float32 rounding per value where rotated: the
        rotation is linear, so ``H (lo + step c) = lo H 1 + step H c`` with ``H 1 = n e_0``; ``H c`` of the
        integer codes is exact in float32, then one scale per block and the sign flips of ``D``. Compiled
        kernels (``hadamard.compiled_kernels``) do the rotated segments where numba is installed, numpy
        otherwise: the same operations, the same bits."""
        read_params(self.name, params, self._knobs)
        size = check_size(self.name, size)
        payload = self._parse(data, size)
        check_ranges(self.name, payload.ranges[:, 0], payload.ranges[:, 1])
        kept = _decode_values(payload)
        if payload.kept_at is None:
            return kept[:size]
        out = np.zeros(size, dtype=np.float32)
        out[payload.kept_at] = kept[: payload.kept_count]
        return out

    def warm_up(self, params: Mapping[str, Any]) -> None:
        """Compile, or load from numba's cache, the kernel that updates of this spec will use: ~10 s the
        first time on a machine, ~0.6 s after (sketch-startup.txt), paid here (at the aggregator's start)
        rather than by the first update of round 1."""
        p = read_params(self.name, params, self._knobs)
        if p["rotate"] and compiled_kernels() is not None:
            vector = np.zeros(2 * _KERNEL_MIN_WIDTH, dtype=np.float32)
            small = {**params, "keep": 1.0, "seed": 0}
            self.decode(self.encode(vector, None, small)[0], vector.size, small)

    def account(self, data: bytes, size: int) -> PayloadBits:
        payload = self._parse(data, size)
        header_bits = 8 * (_SKETCH_HEADER.size + 8 * len(payload.ranges))
        # The mask is a seed: shared randomness, no index set is sent, so no index bound applies (0).
        return PayloadBits(8 * len(data), header_bits - 64, 64, 0.0, 8 * len(data) - header_bits,
                           empirical_entropy_bits(payload.codes()))

    def __repr__(self) -> str:
        return "SketchCodec()"


def encode_sketch(vector: np.ndarray, p: Mapping[str, Any], byte_signs: bool = False) -> bytes:
    """The sketch payload of ``vector`` for the read knobs ``p``; ``byte_signs`` writes format 1 (the
    signs of releases before format 2), which only tests and the benchmark against the old decoder need."""
    vector = check_vector(SketchCodec.name, vector)
    seed = fresh_seed(p["seed"]) & _SEED_MASK
    kept = vector[seeded_mask(seed, vector.size, p["keep"])]
    tag = _SKETCH_TAG_BYTE_SIGNS if byte_signs else _SKETCH_TAG
    header = _SKETCH_HEADER.pack(tag, p["bits"], p["block"].bit_length() - 1, p["rotate"], p["keep"], seed)
    rng = np.random.default_rng([seed, _ROUNDING_STREAM])
    ranges, codes = [], []
    for rows in _encoder_rows(kept, p["block"], p["rotate"], seed, byte_signs):
        c, lo, step = quantize_blocks(rows, p["bits"], True, rng)
        ranges.append(np.stack([lo, step], axis=1))
        codes.append(c.reshape(-1))
    if not codes:
        return header
    return header + np.concatenate(ranges).astype("<f4").tobytes() + pack_uint(np.concatenate(codes), p["bits"])


def _encoder_rows(kept: np.ndarray, block: int, rotate_on: bool, seed: int, byte_signs: bool) -> Iterator[np.ndarray]:
    """The full blocks, then the zero-padded tail, rotated (``H D x / sqrt(n)``) when ``rotate_on``."""
    full, tail, padded = _segments(kept.size, block)
    total = full * block + padded
    signs = None
    if rotate_on:
        signs = (random_signs(seed, _SIGN_STREAM, total) if byte_signs
                 else signs_from_words(random_sign_words(seed, _SIGN_STREAM, total), total))
    parts = []
    if full:
        parts.append((kept[: full * block].reshape(full, block), 0))
    if tail:
        parts.append((np.pad(kept[full * block :], (0, padded - tail)).reshape(1, padded), full * block))
    for rows, start in parts:
        yield rotate(rows, signs[start : start + rows.size]) if signs is not None else rows


def _decode_values(payload: _SketchPayload) -> np.ndarray:
    """The kept values (and the tail's padding), float32: each segment dequantised, and where rotated,
    transformed back and signed."""
    kept = np.empty(payload.values, dtype=np.float32)
    segments = payload.segments
    if not payload.rotate:
        _dequantize_segments(payload, segments, payload.codes(), kept)
        return kept
    if payload.byte_signs:  # format 1: the numpy path, then one sign per generator byte
        _unrotate_segments(payload, segments, payload.codes(), kept, None)
        flip_random_signs(kept, payload.seed, _SIGN_STREAM)
        return kept
    check_padding_bits(payload.packed, payload.bits, payload.values)  # the kernels do not unpack the tail's
    kernels = compiled_kernels()
    rest = segments
    if kernels is not None and payload.layout.kernel_segments:
        try:
            _unrotate_compiled(kernels, payload, kept)
            rest = tuple(seg for seg in segments if seg not in payload.layout.kernel_segments)
        except Exception as exc:  # noqa: BLE001 - numba failing to compile on an untested platform must not
            compiled_kernels_failed(exc)  # take the aggregator down: numpy decodes the same bits
    if rest:
        words = random_sign_words(payload.seed, _SIGN_STREAM, kept.size)
        _unrotate_segments(payload, rest, payload.codes(), kept, words)
    return kept


def _unrotate_compiled(kernels: ModuleType, payload: _SketchPayload, kept: np.ndarray) -> None:
    """The layout's kernel segments (widths >= _KERNEL_MIN_WIDTH) through the compiled kernels, in one call."""
    table, ranges = payload.layout.kernel_table, payload.ranges.astype(np.float64)
    key = np.uint64(sign_key(payload.seed, _SIGN_STREAM))
    kernels.unrotate(payload.packed, payload.bits, kernels.two_bit_table_cached(), kept, table, ranges, payload.keep, key)


def _dequantize_segments(payload: _SketchPayload, segments: tuple[_Segment, ...], codes: np.ndarray,
                         kept: np.ndarray) -> None:
    """Unrotated: float64 like the quantiser (lo + step c may cancel), this path is not the hot one."""
    for seg in segments:
        lo, step = _segment_ranges(payload, seg)
        block_codes = codes[seg.start : seg.start + seg.rows * seg.width].reshape(seg.rows, seg.width)
        part = dequantize_blocks(block_codes, lo, step).astype(np.float64) / payload.keep
        kept[seg.start : seg.start + seg.rows * seg.width] = part.astype(np.float32).reshape(-1)


def _unrotate_segments(payload: _SketchPayload, segments: tuple[_Segment, ...], codes: np.ndarray, kept: np.ndarray,
                       words: np.ndarray | None) -> None:
    """The numpy inverse rotation of ``segments`` (the compiled kernels' operations); signed by ``words``
    (format 2) unless None."""
    for seg in segments:
        out = kept[seg.start : seg.start + seg.rows * seg.width]
        lo, step = _segment_ranges(payload, seg)
        block_codes = codes[seg.start : seg.start + out.size].reshape(seg.rows, seg.width)
        out[:] = _unrotated_block_values(block_codes, lo, step, payload.keep, payload.bits).reshape(-1)
        if words is not None:
            flip_by_sign_words(out, words, seg.start)


def _segment_ranges(payload: _SketchPayload, seg: _Segment) -> tuple[np.ndarray, np.ndarray]:
    rows = payload.ranges[seg.first_row : seg.first_row + seg.rows]
    return rows[:, 0].astype(np.float64), rows[:, 1].astype(np.float64)


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
