"""Pseudorandom masks expanded from 32-byte seeds with the ChaCha20 stream cipher (``cryptography``).

Each seed is derived for one round and one purpose (HKDF info binds run and round), so a fixed nonce is safe:
no (key, nonce) pair encrypts twice.
"""
from __future__ import annotations

import numpy as np
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms

from ..errors import ConfigError

SEED_BYTES = 32
_NONCE = bytes(16)  # ChaCha20 in cryptography: 4-byte counter + 12-byte nonce, both zero (see module docstring)


def expand_mask(seed: bytes, length: int, ring_bits: int) -> np.ndarray:
    """``length`` uniform values in Z_{2^ring_bits} (uint64) from ``seed``."""
    if len(seed) != SEED_BYTES:
        raise ConfigError(f"mask seed must be {SEED_BYTES} bytes, got {len(seed)}")
    if length < 0 or not 1 <= ring_bits <= 64:
        raise ConfigError(f"bad mask shape: length {length}, ring bits {ring_bits}")
    stream = Cipher(algorithms.ChaCha20(seed, _NONCE), mode=None).encryptor().update(bytes(8 * length))
    values = np.frombuffer(stream, dtype="<u8").astype(np.uint64)
    if ring_bits < 64:
        values &= np.uint64((1 << ring_bits) - 1)  # low bits of a uniform word are uniform
    return values
