"""Masking a quantised input, and removing the masks from the sum (Bonawitz et al. CCS 2017, section 4).

Device u sends y_u = x_u + PRG(b_u) + sum over neighbours v of sign(u, v)·PRG(s_uv)  (mod 2^b), where
sign(u, v) = +1 when u < v and -1 when u > v (ids compared as strings). Since s_uv = s_vu, each pair's two
terms cancel in the sum over devices that both sent masked inputs; the server removes the self-masks
PRG(b_u) of the survivors and, for a device that dropped after its neighbours masked with it, the pairwise
terms its surviving neighbours added.
"""
from __future__ import annotations

from typing import Mapping

import numpy as np

from .prg import expand_mask


def pair_sign(device: str, other: str) -> int:
    """+1 when ``device`` adds the pair's mask, -1 when it subtracts it."""
    return 1 if device < other else -1


def add_mask(accumulator: np.ndarray, seed: bytes, sign: int, ring_bits: int) -> None:
    """``accumulator += sign · PRG(seed)`` in place, mod 2^64 (reduced mod 2^ring_bits by the caller)."""
    mask = expand_mask(seed, len(accumulator), ring_bits)
    if sign > 0:
        accumulator += mask
    else:
        accumulator -= mask  # uint64 wraps: subtraction mod 2^64 is subtraction mod 2^b after the final reduce


def mask_input(quantised: np.ndarray, device: str, self_seed: bytes, pair_seeds: Mapping[str, bytes],
               ring_bits: int) -> np.ndarray:
    """y_u for ``device`` from its quantised input, self-mask seed and per-neighbour pairwise seeds."""
    masked = np.array(quantised, dtype=np.uint64, copy=True)
    add_mask(masked, self_seed, 1, ring_bits)
    for other, seed in pair_seeds.items():
        add_mask(masked, seed, pair_sign(device, other), ring_bits)
    return masked & np.uint64((1 << ring_bits) - 1)
