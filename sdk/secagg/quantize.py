"""Fixed-point quantisation of float updates into the ring Z_{2^b} where masks are added.

Each value is clipped to [-clip, clip] and mapped to an integer in [0, 2^value_bits - 1] by rounding to the
nearest step (step = 2·clip / (2^value_bits - 1)). The sum of n such integers is at most n·(2^value_bits - 1)
< 2^(value_bits + ceil(log2 n)), so with ring_bits = value_bits + ceil(log2 max_devices) the sum of up to
max_devices inputs never wraps: the unmasked sum mod 2^ring_bits is the true integer sum. Error: rounding moves
each value by at most step/2, so the dequantised sum of n clipped vectors is within n·step/2 of their float sum
per coordinate (plus float64 rounding, below 2^-52 relative since ring_bits <= 62).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from ..errors import ConfigError

MAX_RING_BITS = 62  # uint64 arithmetic with headroom; float64 dequantisation stays exact to 2^-52 relative


@dataclass(frozen=True)
class FixedPoint:
    """The quantisation of one secure round: ``clip`` range, ``value_bits`` per value, ``max_devices`` summed."""

    clip: float
    value_bits: int
    max_devices: int

    def __post_init__(self) -> None:
        if not (isinstance(self.clip, (int, float)) and math.isfinite(self.clip) and self.clip > 0):
            raise ConfigError(f"secure aggregation clip must be a finite number > 0, got {self.clip!r}")
        if isinstance(self.value_bits, bool) or not isinstance(self.value_bits, int) or self.value_bits < 2:
            raise ConfigError(f"secure aggregation value_bits must be an int >= 2, got {self.value_bits!r}")
        if isinstance(self.max_devices, bool) or not isinstance(self.max_devices, int) or self.max_devices < 1:
            raise ConfigError(f"secure aggregation max_devices must be an int >= 1, got {self.max_devices!r}")
        if self.ring_bits > MAX_RING_BITS:
            raise ConfigError(f"value_bits {self.value_bits} + ceil(log2 {self.max_devices} devices) = "
                              f"{self.ring_bits} ring bits exceeds {MAX_RING_BITS}: the sum could overflow")

    @property
    def ring_bits(self) -> int:
        """b such that the sum of ``max_devices`` quantised values fits in Z_{2^b} without wrapping."""
        return self.value_bits + math.ceil(math.log2(self.max_devices))

    @property
    def ring_mask(self) -> np.uint64:
        return np.uint64((1 << self.ring_bits) - 1)

    @property
    def step(self) -> float:
        return 2.0 * self.clip / ((1 << self.value_bits) - 1)

    def quantise(self, vector: np.ndarray) -> np.ndarray:
        """``vector`` clipped and mapped to uint64 integers in [0, 2^value_bits - 1]."""
        values = np.asarray(vector, dtype=np.float64)
        if values.ndim != 1 or not np.all(np.isfinite(values)):
            raise ConfigError("secure aggregation input must be a finite 1-D vector")
        clipped = np.clip(values, -self.clip, self.clip)
        return np.rint((clipped + self.clip) / self.step).astype(np.uint64)

    def dequantise_sum(self, total: np.ndarray, count: int) -> np.ndarray:
        """The float sum of ``count`` vectors whose quantised sum is ``total``."""
        if not 1 <= count <= self.max_devices:
            raise ConfigError(f"cannot dequantise a sum of {count} inputs: between 1 and {self.max_devices}")
        return np.asarray(total, dtype=np.uint64).astype(np.float64) * self.step - count * self.clip

    def sum_error_bound(self, count: int) -> float:
        """Largest per-coordinate gap between the dequantised sum and the float sum of ``count`` clipped vectors."""
        return count * self.step / 2 * (1 + 1e-9)
