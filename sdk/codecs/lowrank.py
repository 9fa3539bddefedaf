"""Konečný et al. 2016's "low rank" structured update, as a codec that needs no change to training.

In the paper each weight matrix's update is ``H = A B`` with ``A`` (d1 x k) drawn from a seed and
only ``B`` learned and sent. A codec sees an update that was trained unconstrained, so it sends the
``B`` that a seeded ``A`` implies: ``B = A^T H`` with ``A``'s entries ±1/sqrt(k) (Rademacher, so
both sides regenerate it bit for bit from the seed, no QR whose sign conventions vary by BLAS).
``E[A A^T] = I``, hence ``E[A B] = H``: unbiased, but with variance ~ d1/k times ``|H|^2``, so it is
useful averaged over many clients (as in the paper), not for one update alone. To get the
paper's accuracy the runtime would have to train ``B`` directly (not done here).

Needs the layer shapes: ``shapes=OUTxIN;OUT;...`` in manifest order (``;`` between tensors, ``x``
between dimensions). Tensors with more than two dimensions are treated as (d0, rest); 1-D tensors
and matrices whose smaller side is <= ``rank`` go as plain values. Payload (self-describing): tag,
rank, seed, the shapes, then one values field per tensor (fp16 when it fits).
"""
from __future__ import annotations

import math
import struct
from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

import numpy as np

from ..errors import ConfigError, WireError
from .entropy import PayloadBits, empirical_entropy_bits
from .params import KnobParams, Knob, check_size, check_vector, non_negative, read_params
from .quant import decode_values, encode_values
from .sketch import fresh_seed

_HEADER = struct.Struct("<BHQH")  # tag, rank, seed, number of tensors
_TAG = 0x4C  # 'L'
_MAX_DIMS = 8


def parse_shapes(text: str) -> list[tuple[int, ...]]:
    """``"1024x784;1024;10x1024"`` -> ``[(1024, 784), (1024,), (10, 1024)]``; ConfigError otherwise."""
    try:
        shapes = [tuple(int(d) for d in part.split("x")) for part in text.split(";")]
    except ValueError:
        raise ConfigError(f"low_rank codec: shapes={text!r} must look like 1024x784;1024;10x1024") from None
    if not shapes or any(not s or len(s) > _MAX_DIMS or min(s) < 1 for s in shapes):
        raise ConfigError(f"low_rank codec: shapes={text!r} has an empty or non-positive dimension")
    return shapes


def format_shapes(shapes: Sequence[tuple[int, ...]]) -> str:
    """The ``shapes=`` text for ``shapes`` (a scalar counts as one value); ``parse_shapes`` reads it back."""
    return ";".join("x".join(map(str, shape)) or "1" for shape in shapes)


def _matrix_sides(shape: tuple[int, ...]) -> tuple[int, int]:
    """(long side, short side) of the tensor viewed as a matrix (d0, rest)."""
    rows, cols = shape[0], math.prod(shape[1:])
    return max(rows, cols), min(rows, cols)


def _projection(seed: int, index: int, long_side: int, rank: int) -> np.ndarray:
    bits = np.random.default_rng([seed, index]).integers(0, 2, size=(long_side, rank), dtype=np.int8)
    return (2 * bits - 1).astype(np.float32) * np.float32(1.0 / math.sqrt(rank))


def _as_tall(flat: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """The tensor as a matrix with its long side first (so ``B`` has ``rank x short`` entries)."""
    matrix = flat.reshape(shape[0], -1)
    return matrix if matrix.shape[0] >= matrix.shape[1] else matrix.T


class LowRankCodec(KnobParams):
    """Seeded-A low-rank sketch per weight matrix; params ``rank`` (8), ``shapes`` (required), ``seed``."""

    name = "low_rank"
    lossless = False
    # Encoding needs the model's layer shapes; ``sdk.codecs.with_layout`` fills them in on either end.
    needs_shapes: ClassVar[bool] = True
    _knobs: ClassVar[dict[str, Knob]] = {
        "rank": Knob(int, 8, lambda r: 1 <= r <= 65535, "in 1..65535"),
        "shapes": Knob(str, None),
        "seed": Knob(int, None, non_negative, ">= 0"),
    }

    def encode(self, vector: np.ndarray, state: dict[str, np.ndarray] | None,
               params: Mapping[str, Any]) -> tuple[bytes, dict[str, np.ndarray] | None]:
        p = self._read(params)
        vector = check_vector(self.name, vector)
        if p["shapes"] is None:
            raise ConfigError("low_rank codec: needs shapes=OUTxIN;OUT;... (the manifest's parameter shapes)")
        shapes = parse_shapes(p["shapes"])
        if sum(math.prod(s) for s in shapes) != vector.size:
            raise ConfigError(f"low_rank codec: shapes cover {sum(math.prod(s) for s in shapes)} values, "
                              f"the update has {vector.size}")
        rank, seed = p["rank"], fresh_seed(p["seed"]) & ((1 << 63) - 1)
        parts = [_HEADER.pack(_TAG, rank, seed, len(shapes))]
        parts += [struct.pack(f"<B{len(s)}I", len(s), *s) for s in shapes]
        offset = 0
        for index, shape in enumerate(shapes):
            flat = vector[offset : offset + math.prod(shape)]
            offset += flat.size
            long_side, short_side = _matrix_sides(shape)
            if len(shape) >= 2 and rank < short_side:
                flat = (_projection(seed, index, long_side, rank).T @ _as_tall(flat, shape)).reshape(-1)
            parts.append(encode_values(flat, True)[0])
        return b"".join(parts), state

    def check_params(self, params: Mapping[str, Any]) -> dict[str, Any]:
        return self._read(params)

    def _read(self, params: Mapping[str, Any]) -> dict[str, Any]:
        shapes = params.get("shapes") if isinstance(params, Mapping) else None
        if isinstance(shapes, int) and not isinstance(shapes, bool):
            params = {**params, "shapes": str(shapes)}  # "shapes=10" parses as an int: one 1-D tensor
        return read_params(self.name, params, self._knobs)

    def _parse(self, data: bytes, size: int) -> tuple[int, int, list[tuple[int, ...]], list[np.ndarray], int]:
        if len(data) < _HEADER.size:
            raise WireError(f"low_rank codec: {len(data)} bytes is shorter than its header")
        tag, rank, seed, count = _HEADER.unpack_from(data)
        if tag != _TAG or rank == 0 or seed >= 1 << 63:
            raise WireError(f"low_rank codec: bad header (tag {tag:#x}, rank {rank})")
        at, shapes, total = _HEADER.size, [], 0
        for _ in range(count):
            if at >= len(data) or not 1 <= data[at] <= _MAX_DIMS or at + 1 + 4 * data[at] > len(data):
                raise WireError("low_rank codec: truncated or bad shape list")
            dims = struct.unpack_from(f"<{data[at]}I", data, at + 1)
            at += 1 + 4 * len(dims)
            total += math.prod(dims)
            if min(dims) == 0 or total > size:
                raise WireError(f"low_rank codec: shapes cover more than the {size} values expected")
            shapes.append(tuple(dims))
        if total != size:
            raise WireError(f"low_rank codec: shapes cover {total} values, expected {size}")
        fields, values_at = [], at
        for shape in shapes:
            _, short_side = _matrix_sides(shape)
            sent = rank * short_side if len(shape) >= 2 and rank < short_side else math.prod(shape)
            values, at = decode_values(data, at, sent)
            fields.append(values)
        if at != len(data):
            raise WireError(f"low_rank codec: {len(data) - at} unexpected bytes at the end")
        return rank, seed, shapes, fields, values_at

    def decode(self, data: bytes, size: int, params: Mapping[str, Any]) -> np.ndarray:
        self._read(params)
        size = check_size(self.name, size)
        rank, seed, shapes, fields, _ = self._parse(data, size)
        out, offset = np.empty(size, dtype=np.float32), 0
        for index, (shape, values) in enumerate(zip(shapes, fields, strict=True)):
            n = math.prod(shape)
            long_side, short_side = _matrix_sides(shape)
            if len(shape) >= 2 and rank < short_side:
                tall = _projection(seed, index, long_side, rank) @ values.reshape(rank, short_side)
                values = (tall if shape[0] >= n // shape[0] else tall.T).reshape(-1)
            out[offset : offset + n] = values
            offset += n
        return out

    def account(self, data: bytes, size: int) -> PayloadBits:
        _, _, _, fields, values_at = self._parse(data, size)
        value_bits = 8 * (len(data) - values_at)
        symbols = np.concatenate([f.view(np.uint32) for f in fields])
        return PayloadBits(8 * len(data), 8 * len(data) - value_bits, 0, 0.0, value_bits,
                           empirical_entropy_bits(symbols))

    def __repr__(self) -> str:
        return "LowRankCodec()"
