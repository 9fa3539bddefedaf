"""Sparse Ternary Compression, Sattler et al. 2019 ("Robust and Communication-Efficient Federated
Learning from Non-IID Data", IEEE TNNLS, arXiv:1903.02891).

Add the residual to the update, keep the top ``1 - sparsity`` fraction by magnitude, replace each
kept value by ``±mu`` where ``mu`` is their mean magnitude, and carry everything not sent (the
dropped entries and the ternarisation error) to the next call (error feedback). On the wire: the
positions as Rice-coded gaps (the Golomb coding of the paper, parameter searched per payload),
``mu`` as float32, one sign bit per position.

State (safetensors-ready): ``residual`` float32 (size,).
"""
from __future__ import annotations

import math
import struct
from collections.abc import Mapping
from typing import Any, ClassVar

import numpy as np

from ..errors import WireError
from .bitio import decode_positions, encode_positions, pack_uint, packed_size, unpack_uint
from .dgc import sparse_vector
from .entropy import PayloadBits, empirical_entropy_bits, index_set_bound_bits
from .params import KnobParams, Knob, check_size, check_vector, in_open_unit, kept_count, read_params, state_array

_STC_TAG = 0x54  # 'T'
_MU = struct.Struct("<f")


def top_k_positions(magnitude: np.ndarray, k: int) -> np.ndarray:
    """Sorted indices of the ``k`` largest entries (exact, O(n) by partition)."""
    n = magnitude.size
    if k >= n:
        return np.arange(n, dtype=np.int64)
    return np.sort(np.argpartition(magnitude, n - k)[n - k :]).astype(np.int64)


class StcCodec(KnobParams):
    """Sparse ternary compression with error feedback; param ``sparsity`` (default 0.99)."""

    name = "stc"
    lossless = False
    _knobs: ClassVar[dict[str, Knob]] = {"sparsity": Knob(float, 0.99, in_open_unit, "in (0, 1)")}

    def encode(self, vector: np.ndarray, state: dict[str, np.ndarray] | None,
               params: Mapping[str, Any]) -> tuple[bytes, dict[str, np.ndarray]]:
        p = read_params(self.name, params, self._knobs)
        update = check_vector(self.name, vector)
        size = update.size
        accumulated = state_array(self.name, state, "residual", size)
        accumulated += update
        k = kept_count(1.0 - p["sparsity"], size)
        positions = top_k_positions(np.abs(accumulated), k)
        chosen = accumulated[positions]
        mu = np.float32(np.abs(chosen).mean()) if k else np.float32(0.0)
        positive = chosen > 0
        residual = accumulated  # updated in place: what was not sent stays for the next call
        residual[positions] -= np.where(positive, mu, -mu).astype(np.float32)
        payload = (bytes([_STC_TAG]) + encode_positions(positions, size) + _MU.pack(mu)
                   + pack_uint(positive.astype(np.uint8), 1))
        return payload, {"residual": residual}

    def _parse(self, data: bytes, size: int) -> tuple[np.ndarray, float, np.ndarray, int]:
        if len(data) < 1 or data[0] != _STC_TAG:
            raise WireError("stc codec: payload does not start with the stc tag")
        positions, mu_at = decode_positions(data, 1, size)
        signs_at = mu_at + _MU.size
        expected = signs_at + packed_size(positions.size, 1)
        if len(data) != expected:
            raise WireError(f"stc codec: {len(data)} bytes, the positions imply {expected}")
        (mu,) = _MU.unpack_from(data, mu_at)
        if not (math.isfinite(mu) and mu >= 0):
            raise WireError(f"stc codec: magnitude {mu!r} is not a finite non-negative number")
        positive = unpack_uint(memoryview(data)[signs_at:], 1, positions.size).astype(bool)
        return positions, mu, positive, mu_at

    def decode(self, data: bytes, size: int, params: Mapping[str, Any]) -> np.ndarray:
        read_params(self.name, params, self._knobs)
        size = check_size(self.name, size)
        positions, mu, positive, _ = self._parse(data, size)
        return sparse_vector(size, positions, np.where(positive, np.float32(mu), np.float32(-mu)))

    def account(self, data: bytes, size: int) -> PayloadBits:
        positions, _, positive, mu_at = self._parse(data, size)
        return PayloadBits(8 * len(data), 8, 8 * (mu_at - 1), index_set_bound_bits(size, positions.size),
                           8 * (len(data) - mu_at), 32 + empirical_entropy_bits(positive))

    def __repr__(self) -> str:
        return "StcCodec()"
