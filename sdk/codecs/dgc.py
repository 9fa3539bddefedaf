"""Deep Gradient Compression, Lin et al., ICLR 2018 ("Deep Gradient Compression: Reducing the
Communication Bandwidth for Distributed Training", arXiv:1712.01887).

Per call (one gradient, or one FL delta): local gradient clipping, momentum correction
(``u = m u + g``, ``v = v + u``), top-k of ``|v|`` with the threshold estimated from a random
sample (0.1-1% of the entries, as in the paper) and corrected when it selects too many or too few,
send ``v`` at those positions, keep the rest as the local accumulation (error feedback), and zero
``u`` and ``v`` where sent (momentum factor masking). The sparsity warms up exponentially from 75%
to the target over ``warmup_steps`` calls (a continuous form of the paper's 75%, 93.75%, 98.4%,
99.6%, 99.9%). Values travel as fp16 when they fit; what fp16 rounding loses stays in ``v`` so
nothing is ever dropped: sent + new ``v`` = old ``v`` + ``u`` exactly.

State (safetensors-ready): ``u`` and ``v`` float32 (size,), ``step`` int64 (1,).
Payload: tag byte, Rice-coded positions (see ``bitio``), values (``quant.encode_values``).
"""
from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any, ClassVar

import numpy as np

from ..errors import WireError
from .bitio import decode_positions, encode_positions
from .entropy import PayloadBits, empirical_entropy_bits, index_set_bound_bits
from .params import (
    KnobParams,
    Knob,
    check_size,
    check_vector,
    in_open_unit,
    kept_count,
    non_negative,
    read_params,
    state_array,
    state_counter,
)
from .quant import decode_values, encode_values

_DGC_TAG = 0x44  # 'D'
WARMUP_START_DENSITY = 0.25  # the paper's first warm-up stage: 75% sparsity
MIN_SAMPLE = 1000  # below this a sampled threshold is too noisy to be worth it


def warmup_density(step: int, target_density: float, warmup_steps: int) -> float:
    """Fraction of entries sent at ``step``: 25% decaying exponentially to the target."""
    if warmup_steps <= 0 or step >= warmup_steps or target_density >= WARMUP_START_DENSITY:
        return target_density
    fraction = step / warmup_steps
    return WARMUP_START_DENSITY * (target_density / WARMUP_START_DENSITY) ** fraction


def sampled_top_k(magnitude: np.ndarray, k: int, sample_ratio: float, rng: np.random.Generator) -> np.ndarray:
    """Sorted indices of (about) the ``k`` largest entries, as DGC selects them.

    A threshold is read off a random sample; entries above it are the candidates. Too many: the
    exact top-k among the candidates (cheap, they are few). Too few: an exact selection over all.
    Ties at the threshold may leave fewer than ``k`` only in the exact fallback's absence.
    """
    n = magnitude.size
    if k >= n:
        return np.arange(n, dtype=np.int64)
    sample_size = max(MIN_SAMPLE, math.ceil(sample_ratio * n))
    if sample_size < n:
        sample = magnitude[rng.integers(0, n, size=sample_size)]
        rank = max(1, math.ceil(k / n * sample_size))
        threshold = np.partition(sample, sample_size - rank)[sample_size - rank]
        candidates = np.flatnonzero(magnitude >= threshold)
        if candidates.size >= k:
            if candidates.size > k:
                keep = np.argpartition(magnitude[candidates], candidates.size - k)[candidates.size - k :]
                candidates = candidates[np.sort(keep)]
            return candidates.astype(np.int64)
    chosen = np.argpartition(magnitude, n - k)[n - k :]
    return np.sort(chosen).astype(np.int64)


def sparse_vector(size: int, positions: np.ndarray, values: np.ndarray) -> np.ndarray:
    out = np.zeros(size, dtype=np.float32)
    out[positions] = values
    return out


class DgcCodec(KnobParams):
    """Deep Gradient Compression; params ``sparsity`` (0.999), ``momentum`` (0.9), ``clip_norm``
    (0 = off), ``warmup_steps`` (0), ``sample_ratio`` (0.01), ``values`` (fp16|fp32), ``seed``."""

    name = "dgc"
    lossless = False
    _knobs: ClassVar[dict[str, Knob]] = {
        "sparsity": Knob(float, 0.999, in_open_unit, "in (0, 1)"),
        "momentum": Knob(float, 0.9, lambda m: 0.0 <= m < 1.0, "in [0, 1)"),
        "clip_norm": Knob(float, 0.0, non_negative, ">= 0 (0 turns clipping off)"),
        "warmup_steps": Knob(int, 0, non_negative, ">= 0"),
        "sample_ratio": Knob(float, 0.01, lambda r: 0.0 < r <= 1.0, "in (0, 1]"),
        "values": Knob(str, "fp16", lambda v: v in ("fp16", "fp32"), "fp16 or fp32"),
        "seed": Knob(int, 0, non_negative, ">= 0"),
    }

    def encode(self, vector: np.ndarray, state: dict[str, np.ndarray] | None,
               params: Mapping[str, Any]) -> tuple[bytes, dict[str, np.ndarray]]:
        p = read_params(self.name, params, self._knobs)
        gradient = check_vector(self.name, vector)
        size = gradient.size
        u = state_array(self.name, state, "u", size)
        v = state_array(self.name, state, "v", size)
        step = state_counter(self.name, state, "step")
        if p["clip_norm"] > 0:
            # Local clipping before accumulation (the paper clips each node's gradient, Sec. 3.3).
            norm = float(np.linalg.norm(gradient.astype(np.float64)))
            if norm > p["clip_norm"]:
                gradient = (gradient * np.float32(p["clip_norm"] / norm)).astype(np.float32)
        u *= np.float32(p["momentum"])
        u += gradient
        v += u
        density = warmup_density(step, 1.0 - p["sparsity"], p["warmup_steps"])
        k = kept_count(density, size)
        rng = np.random.default_rng([p["seed"], step])
        positions = sampled_top_k(np.abs(v), k, p["sample_ratio"], rng) if size else np.zeros(0, np.int64)
        value_bytes, sent = encode_values(v[positions], p["values"] == "fp16")
        # fp16(x) is within a factor 2 of x, so this subtraction is exact (Sterbenz): no mass is lost.
        v[positions] -= sent
        u[positions] = 0.0  # momentum factor masking
        payload = bytes([_DGC_TAG]) + encode_positions(positions, size) + value_bytes
        return payload, {"u": u, "v": v, "step": np.array([step + 1], dtype=np.int64)}

    def _parse(self, data: bytes, size: int) -> tuple[np.ndarray, np.ndarray, int, int]:
        if len(data) < 1 or data[0] != _DGC_TAG:
            raise WireError("dgc codec: payload does not start with the dgc tag")
        positions, values_at = decode_positions(data, 1, size)
        values, end = decode_values(data, values_at, positions.size)
        if end != len(data):
            raise WireError(f"dgc codec: {len(data) - end} unexpected bytes after the values")
        return positions, values, values_at, end

    def decode(self, data: bytes, size: int, params: Mapping[str, Any]) -> np.ndarray:
        read_params(self.name, params, self._knobs)
        size = check_size(self.name, size)
        positions, values, _, _ = self._parse(data, size)
        return sparse_vector(size, positions, values)

    def account(self, data: bytes, size: int) -> PayloadBits:
        positions, values, values_at, _ = self._parse(data, size)
        return sparse_account(data, size, positions.size, values_at, values)

    def __repr__(self) -> str:
        return "DgcCodec()"


def sparse_account(data: bytes, size: int, count: int, values_at: int, values: np.ndarray) -> PayloadBits:
    """Bits of a tag + positions + values payload against log2 C(size, count) and the values' entropy."""
    value_bits = 8 * (len(data) - values_at)
    fp16 = value_bits == 8 + 16 * values.size
    symbols = values.astype(np.float16).view(np.uint16) if fp16 else values.view(np.uint32)
    return PayloadBits(8 * len(data), 8, 8 * (values_at - 1), index_set_bound_bits(size, count),
                       value_bits, empirical_entropy_bits(symbols))
