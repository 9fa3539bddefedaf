"""Key agreement and authenticated encryption for SecAgg (all primitives from ``cryptography``).

Each device makes two X25519 key pairs per round (Bonawitz et al. CCS 2017, section 4): the *cipher* pair
agrees the AEAD keys of the share channel with each neighbour (and the MAC key with the server); the *mask*
pair agrees the pairwise mask seeds. Every agreed secret goes through HKDF-SHA256 whose ``info`` names the
purpose, run and round, so no key serves two purposes or two rounds.
"""
from __future__ import annotations

import hmac
import os
from dataclasses import dataclass

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives import hmac as crypto_hmac
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from cryptography.hazmat.primitives.serialization import Encoding, NoEncryption, PrivateFormat, PublicFormat

from ..errors import WireError

PUBLIC_KEY_BYTES = 32
PRIVATE_KEY_BYTES = 32
NONCE_BYTES = 12
TAG_BYTES = 16
MAC_BYTES = 32


def new_private_key() -> X25519PrivateKey:
    return X25519PrivateKey.generate()


def public_bytes(key: X25519PrivateKey) -> bytes:
    return key.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)


def private_bytes(key: X25519PrivateKey) -> bytes:
    return key.private_bytes(Encoding.Raw, PrivateFormat.Raw, NoEncryption())


def load_public(data: bytes) -> X25519PublicKey:
    if len(data) != PUBLIC_KEY_BYTES:
        raise WireError(f"bad public key: {len(data)} bytes, an X25519 key has {PUBLIC_KEY_BYTES}")
    return X25519PublicKey.from_public_bytes(data)


def load_private(data: bytes) -> X25519PrivateKey:
    if len(data) != PRIVATE_KEY_BYTES:
        raise WireError(f"bad private key: {len(data)} bytes, an X25519 key has {PRIVATE_KEY_BYTES}")
    return X25519PrivateKey.from_private_bytes(data)


@dataclass(frozen=True)
class RoundContext:
    """What binds every derived key to one round: ``run_id`` and ``round_id``."""

    run_id: str
    round_id: int

    def info(self, purpose: str, *parties: str) -> bytes:
        # Lengths prefix every part so ("ab","c") and ("a","bc") never derive the same key.
        parts = ("edgetrain-secagg-v1", purpose, self.run_id, str(self.round_id), *parties)
        return b"".join(len(p.encode()).to_bytes(2, "little") + p.encode() for p in parts)


def derive(private: X25519PrivateKey, peer_public: bytes, context: RoundContext, purpose: str,
           *parties: str) -> bytes:
    """32 bytes from X25519(private, peer) through HKDF-SHA256 for ``purpose`` between ``parties``."""
    try:
        shared = private.exchange(load_public(peer_public))
    except ValueError as exc:  # a low-order public key gives the all-zero secret: refused by cryptography
        raise WireError(f"bad public key: key agreement failed ({exc})") from None
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=None,
                info=context.info(purpose, *parties)).derive(shared)


def encrypt(key: bytes, plaintext: bytes, associated: bytes) -> bytes:
    """nonce | ChaCha20-Poly1305 ciphertext | tag."""
    nonce = os.urandom(NONCE_BYTES)
    return nonce + ChaCha20Poly1305(key).encrypt(nonce, plaintext, associated)


def decrypt(key: bytes, ciphertext: bytes, associated: bytes) -> bytes:
    """The plaintext, or WireError when the ciphertext or its associated data was altered."""
    if len(ciphertext) < NONCE_BYTES + TAG_BYTES:
        raise WireError(f"bad ciphertext: {len(ciphertext)} bytes is shorter than nonce and tag")
    try:
        return ChaCha20Poly1305(key).decrypt(ciphertext[:NONCE_BYTES], ciphertext[NONCE_BYTES:], associated)
    except InvalidTag:
        raise WireError("share authentication failed: the ciphertext or its routing was altered") from None


def mac(key: bytes, *parts: bytes) -> bytes:
    """HMAC-SHA256 over the length-prefixed ``parts``."""
    signer = crypto_hmac.HMAC(key, hashes.SHA256())
    for part in parts:
        signer.update(len(part).to_bytes(8, "little"))
        signer.update(part)
    return signer.finalize()


def mac_matches(key: bytes, tag: bytes, *parts: bytes) -> bool:
    return hmac.compare_digest(mac(key, *parts), tag)
