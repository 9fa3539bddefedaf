"""Ed25519 signatures on announcements, so a device obeys only its own aggregator, even on a broker
without ACLs (Bernstein et al. 2012, "High-speed high-security signatures"; via ``cryptography``).

What is signed: the whole announcement frame as ``encode`` would build it with an empty
``signature`` field — magic, wire version, message type, every header field (run id, round, model
version, task, selection, deadline, settings, codec specs, base version) and the model payload. The
signature then travels in that field as hex. The device rebuilds the same bytes from the decoded
message (encoding is canonical: sorted keys, fixed separators, exact float repr) and verifies them.

Keys are PEM files: the private key (PKCS#8, mode 0600) stays with the aggregator; the public key
(SubjectPublicKeyInfo) is what devices are configured with.
"""
from __future__ import annotations

import dataclasses
import os
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from ..errors import BadSignature, ConfigError
from .frame import MessageType, build_frame
from .messages import Announcement, header_fields

MAX_KEY_FILE_BYTES = 16 << 10  # a PEM Ed25519 key is ~120 bytes


def signed_bytes(announcement: Announcement) -> bytes:
    """The bytes a signature covers: the announcement's frame with an empty ``signature`` field."""
    header = header_fields(dataclasses.replace(announcement, signature=""))
    return build_frame(MessageType.ANNOUNCEMENT, header, announcement.payload)


def sign(announcement: Announcement, key: Ed25519PrivateKey) -> Announcement:
    """``announcement`` with its ``signature`` set by ``key``."""
    return dataclasses.replace(announcement, signature=key.sign(signed_bytes(announcement)).hex())


def verify(announcement: Announcement, key: Ed25519PublicKey) -> None:
    """Return if ``key`` signed ``announcement``; BadSignature (a WireError) otherwise."""
    if not announcement.signature:
        raise BadSignature(f"round {announcement.round_id}: announcement is unsigned and this device "
                           "obeys only signed ones")
    try:
        key.verify(bytes.fromhex(announcement.signature), signed_bytes(announcement))
    except InvalidSignature:
        raise BadSignature(f"round {announcement.round_id}: announcement signature does not verify with "
                           "the aggregator's public key (forged or altered)") from None


def _read_key_file(path: Path, what: str) -> bytes:
    try:
        if path.stat().st_size > MAX_KEY_FILE_BYTES:
            raise ConfigError(f"{what} {path}: {path.stat().st_size} bytes is too large for a key file")
        return path.read_bytes()
    except OSError as exc:
        raise ConfigError(f"{what} {path}: cannot read ({exc.strerror or exc})") from None


def load_private_key(path: Path) -> Ed25519PrivateKey:
    """The aggregator's signing key from a PEM file (PKCS#8, unencrypted)."""
    try:
        key = serialization.load_pem_private_key(_read_key_file(path, "signing key"), password=None)
    except (ValueError, TypeError) as exc:
        raise ConfigError(f"signing key {path}: not an unencrypted PEM private key ({exc})") from None
    if not isinstance(key, Ed25519PrivateKey):
        raise ConfigError(f"signing key {path}: a {type(key).__name__}, expected an Ed25519 key")
    return key


def load_public_key(path: Path) -> Ed25519PublicKey:
    """The aggregator's public key (PEM) a device verifies announcements with."""
    try:
        key = serialization.load_pem_public_key(_read_key_file(path, "aggregator key"))
    except (ValueError, TypeError) as exc:
        raise ConfigError(f"aggregator key {path}: not a PEM public key ({exc})") from None
    if not isinstance(key, Ed25519PublicKey):
        raise ConfigError(f"aggregator key {path}: a {type(key).__name__}, expected an Ed25519 public key")
    return key


def public_key_path(private_key_path: Path) -> Path:
    """Where ``generate_key_pair`` writes the public half: ``<private>.pub``."""
    return private_key_path.with_name(private_key_path.name + ".pub")


def generate_key_pair(private_key_path: Path) -> Ed25519PrivateKey:
    """A new signing key at ``private_key_path`` (mode 0600) and its public half beside it (``.pub``)."""
    key = Ed25519PrivateKey.generate()
    private_pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                    serialization.NoEncryption())
    public_pem = key.public_key().public_bytes(serialization.Encoding.PEM,
                                               serialization.PublicFormat.SubjectPublicKeyInfo)
    private_key_path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(private_key_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as fh:
        fh.write(private_pem)
    public_key_path(private_key_path).write_bytes(public_pem)
    return key
