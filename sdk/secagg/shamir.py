"""Shamir t-of-n secret sharing (Shamir, "How to share a secret", CACM 1979) over the prime field GF(2^521 - 1).

Shares 32-byte secrets (a self-mask seed, an X25519 private key). Only the polynomial arithmetic is written
here; the coefficients come from the OS's CSPRNG (``secrets``). Any ``threshold`` shares reconstruct the
secret; fewer reveal nothing about it (every value is equally likely). Not constant-time: the shares a device
holds are not secrets of the device that holds them, and the server reconstructs in the open.
"""
from __future__ import annotations

import secrets
import struct
from dataclasses import dataclass
from typing import Sequence

from ..errors import ConfigError, WireError

PRIME = (1 << 521) - 1  # a Mersenne prime, larger than any 32-byte secret
SECRET_BYTES = 32
_Y_BYTES = 66  # ceil(521 / 8)
SHARE_BYTES = 2 + _Y_BYTES  # x as u16 little-endian, then y little-endian
MAX_SHARES = 65_535


@dataclass(frozen=True)
class Share:
    """The value ``y`` of the sharing polynomial at ``x`` (1 <= x <= 65535)."""

    x: int
    y: int

    def to_bytes(self) -> bytes:
        return struct.pack("<H", self.x) + self.y.to_bytes(_Y_BYTES, "little")

    @classmethod
    def from_bytes(cls, data: bytes) -> Share:
        """A share read off the wire; WireError when it cannot be one."""
        if len(data) != SHARE_BYTES:
            raise WireError(f"bad share: {len(data)} bytes, a share has {SHARE_BYTES}")
        (x,) = struct.unpack_from("<H", data)
        y = int.from_bytes(data[2:], "little")
        if x == 0 or y >= PRIME:
            raise WireError(f"bad share: x must be >= 1 and y below the field prime (x={x})")
        return cls(x, y)


def split_secret(secret: bytes, threshold: int, xs: Sequence[int]) -> list[Share]:
    """Shares of ``secret`` at the points ``xs`` (distinct, 1..65535); any ``threshold`` of them reconstruct it."""
    if len(secret) != SECRET_BYTES:
        raise ConfigError(f"a shared secret must be {SECRET_BYTES} bytes, got {len(secret)}")
    if len(set(xs)) != len(xs) or not all(1 <= x <= MAX_SHARES for x in xs):
        raise ConfigError("share points must be distinct integers in 1..65535")
    if not 1 <= threshold <= len(xs):
        raise ConfigError(f"threshold {threshold} must be between 1 and the {len(xs)} shares")
    coefficients = [int.from_bytes(secret, "little")] + [secrets.randbelow(PRIME) for _ in range(threshold - 1)]
    return [Share(x, _evaluate(coefficients, x)) for x in xs]


def _evaluate(coefficients: Sequence[int], x: int) -> int:
    result = 0
    for coefficient in reversed(coefficients):  # Horner
        result = (result * x + coefficient) % PRIME
    return result


def combine_shares(shares: Sequence[Share], threshold: int) -> bytes:
    """The secret from at least ``threshold`` shares (Lagrange interpolation at 0); ConfigError with fewer."""
    if len(shares) < threshold:
        raise ConfigError(f"{len(shares)} shares cannot reconstruct a {threshold}-of-n secret")
    chosen = list(shares)[:threshold]
    xs = [share.x for share in chosen]
    if len(set(xs)) != len(xs):
        raise ConfigError("two shares at the same point cannot both be used")
    secret = 0
    for i, share in enumerate(chosen):
        numerator, denominator = 1, 1
        for j, other in enumerate(xs):
            if i != j:
                numerator = numerator * (-other) % PRIME
                denominator = denominator * (share.x - other) % PRIME
        secret = (secret + share.y * numerator * pow(denominator, -1, PRIME)) % PRIME
    if secret >= 1 << (8 * SECRET_BYTES):  # wrong or tampered shares interpolate to a value no secret has
        raise ConfigError("the shares do not reconstruct a 32-byte secret: at least one is wrong")
    return secret.to_bytes(SECRET_BYTES, "little")
