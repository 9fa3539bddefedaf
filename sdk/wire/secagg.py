"""The secure-aggregation messages (SecAgg+; ``sdk.secagg``), one per stage and direction.

Device -> aggregator on ``secagg/<device>``: ``SecAggAdvertise`` (two X25519 public keys), ``SecAggShares``
(one AEAD ciphertext per neighbour), ``SecAggMaskedInput`` (the masked quantised vector), ``SecAggUnmaskShares``
(the Shamir shares the server asked for). Aggregator -> device on ``secagg-in/<device>``: ``SecAggRoster``
(everyone's keys and the round's parameters), ``SecAggShareDelivery`` (the ciphertexts addressed to the device),
``SecAggUnmaskRequest`` (who survived, who dropped). Every field is checked here and every count bounded
(``MAX_SECAGG_DEVICES``) before a receiver allocates; payload sizes must match the counts in the header.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, replace

from .messages import _as_float, _check_bytes, _check_count, _check_run_id, _check_str, _fail, _set

MAX_SECAGG_DEVICES = 5_000  # device ids in one roster: keeps the JSON header under its 1 MiB bound
MAX_DEVICE_ID_CHARS = 64
KEY_HEX_CHARS = 64  # a 32-byte X25519 key, seed or HMAC-SHA256 tag
ROSTER_KEY_BYTES = 64  # cipher public key | mask public key, per device
SHARE_PLAINTEXT_BYTES = 2 * 68  # a self-mask-seed share and a mask-key share (sdk.secagg.shamir.SHARE_BYTES)
SHARE_CIPHERTEXT_BYTES = 12 + SHARE_PLAINTEXT_BYTES + 16  # nonce | ciphertext | Poly1305 tag
UNMASK_SHARE_BYTES = 68
MAX_SECAGG_VALUE_BITS = 62


def _check_hex(owner: object, name: str, chars: int = KEY_HEX_CHARS) -> None:
    value = getattr(owner, name)
    _check_str(owner, name)
    if len(value) != chars or any(c not in "0123456789abcdef" for c in value):
        raise _fail(owner, name, f"expected {chars} lowercase hex digits")


def _check_ids(owner: object, name: str) -> None:
    value = getattr(owner, name)
    if not isinstance(value, (list, tuple)):
        raise _fail(owner, name, f"expected a list of device ids, got {type(value).__name__}")
    if len(value) > MAX_SECAGG_DEVICES:
        raise _fail(owner, name, f"{len(value)} device ids, at most {MAX_SECAGG_DEVICES} allowed")
    if not all(isinstance(d, str) and 0 < len(d) <= MAX_DEVICE_ID_CHARS for d in value):
        raise _fail(owner, name, f"every device id must be a string of 1..{MAX_DEVICE_ID_CHARS} characters")
    if len(set(value)) != len(value):
        raise _fail(owner, name, "a device id appears twice")
    _set(owner, name, tuple(value))


def _check_sender(owner: object) -> None:
    _check_run_id(owner)
    _check_count(owner, "round_id")
    _check_str(owner, "device_id")
    if len(getattr(owner, "device_id")) > MAX_DEVICE_ID_CHARS:
        raise _fail(owner, "device_id", f"at most {MAX_DEVICE_ID_CHARS} characters")


def _check_payload_size(owner: object, expected: int, what: str) -> None:
    _check_bytes(owner, "payload")
    if len(getattr(owner, "payload")) != expected:
        raise _fail(owner, "payload", f"{len(getattr(owner, 'payload'))} bytes, expected {expected} ({what})")


@dataclass(frozen=True)
class SecAggAdvertise:
    """Device -> aggregator, stage 0: the device's per-round X25519 public keys (hex)."""

    run_id: str
    round_id: int
    device_id: str
    cipher_public_key: str
    mask_public_key: str

    def __post_init__(self) -> None:
        _check_sender(self)
        _check_hex(self, "cipher_public_key")
        _check_hex(self, "mask_public_key")


@dataclass(frozen=True)
class SecAggRoster:
    """Aggregator -> device, stage 1: the devices that advertised (payload: their cipher | mask public keys,
    in ``devices`` order), the Shamir ``threshold``, ``neighbours`` k of the graph, its public ``graph_seed``,
    the server's X25519 key (MAC key agreement) and the quantisation (``clip``, ``value_bits``, ``max_devices``)
    of a ``num_params`` vector."""

    run_id: str
    round_id: int
    device_id: str
    devices: tuple[str, ...]
    threshold: int
    neighbours: int
    graph_seed: str
    server_public_key: str
    num_params: int
    clip: float
    value_bits: int
    max_devices: int
    deadline_unix_s: float
    payload: bytes

    def __post_init__(self) -> None:
        _check_sender(self)
        _check_ids(self, "devices")
        for name in ("threshold", "neighbours", "num_params", "value_bits", "max_devices"):
            _check_count(self, name)
        if not 1 <= self.threshold <= len(self.devices):
            raise _fail(self, "threshold", f"{self.threshold} is not between 1 and {len(self.devices)} devices")
        if not 2 <= self.value_bits <= MAX_SECAGG_VALUE_BITS or self.num_params < 1 or self.max_devices < 1:
            raise _fail(self, "value_bits", "value_bits must be 2..62, num_params and max_devices >= 1")
        _check_hex(self, "graph_seed")
        _check_hex(self, "server_public_key")
        clip = _as_float(self, "clip", self.clip)
        deadline = _as_float(self, "deadline_unix_s", self.deadline_unix_s)
        if not (math.isfinite(clip) and clip > 0 and math.isfinite(deadline)):
            raise _fail(self, "clip", "clip must be finite and > 0, the deadline finite")
        _set(self, "clip", clip)
        _set(self, "deadline_unix_s", deadline)
        _check_payload_size(self, ROSTER_KEY_BYTES * len(self.devices), "two 32-byte keys per device")


@dataclass(frozen=True)
class SecAggShares:
    """Device -> aggregator, stage 1: one ChaCha20-Poly1305 ciphertext of the device's two shares per
    neighbour in ``recipients``, concatenated in that order."""

    run_id: str
    round_id: int
    device_id: str
    recipients: tuple[str, ...]
    payload: bytes

    def __post_init__(self) -> None:
        _check_sender(self)
        _check_ids(self, "recipients")
        _check_payload_size(self, SHARE_CIPHERTEXT_BYTES * len(self.recipients), "one ciphertext per recipient")


@dataclass(frozen=True)
class SecAggShareDelivery:
    """Aggregator -> device ``device_id``, stage 2: the ciphertexts ``senders`` addressed to it, in order."""

    run_id: str
    round_id: int
    device_id: str
    senders: tuple[str, ...]
    payload: bytes

    def __post_init__(self) -> None:
        _check_sender(self)
        _check_ids(self, "senders")
        _check_payload_size(self, SHARE_CIPHERTEXT_BYTES * len(self.senders), "one ciphertext per sender")


@dataclass(frozen=True)
class SecAggMaskedInput:
    """Device -> aggregator, stage 2: the masked vector (uint64 little-endian, one per parameter) and an
    HMAC-SHA256 ``tag`` (hex) under the key the device agreed with the server's roster key."""

    run_id: str
    round_id: int
    device_id: str
    tag: str
    payload: bytes

    def __post_init__(self) -> None:
        _check_sender(self)
        _check_hex(self, "tag")
        _check_bytes(self, "payload")
        if not self.payload or len(self.payload) % 8:
            raise _fail(self, "payload", f"{len(self.payload)} bytes is not a whole, non-empty uint64 vector")


@dataclass(frozen=True)
class SecAggUnmaskRequest:
    """Aggregator -> device, stage 3: ``survivors`` sent masked inputs (reveal their self-mask shares),
    ``dropped`` did not (reveal their mask-key shares). A device refuses a request naming one device in both."""

    run_id: str
    round_id: int
    device_id: str
    survivors: tuple[str, ...]
    dropped: tuple[str, ...]

    def __post_init__(self) -> None:
        _check_sender(self)
        _check_ids(self, "survivors")
        _check_ids(self, "dropped")
        if set(self.survivors) & set(self.dropped):
            raise _fail(self, "dropped", "a device cannot both survive and drop out")


@dataclass(frozen=True)
class SecAggUnmaskShares:
    """Device -> aggregator, stage 3: Shamir shares of the self-mask seeds of ``self_mask_owners`` then of the
    mask keys of ``key_owners`` (68 bytes each, in that order), and an HMAC ``tag`` as in the masked input."""

    run_id: str
    round_id: int
    device_id: str
    self_mask_owners: tuple[str, ...]
    key_owners: tuple[str, ...]
    tag: str
    payload: bytes

    def __post_init__(self) -> None:
        _check_sender(self)
        _check_ids(self, "self_mask_owners")
        _check_ids(self, "key_owners")
        _check_hex(self, "tag")
        count = len(self.self_mask_owners) + len(self.key_owners)
        _check_payload_size(self, UNMASK_SHARE_BYTES * count, "one share per owner")


SecAggMessage = (SecAggAdvertise | SecAggRoster | SecAggShares | SecAggShareDelivery | SecAggMaskedInput
                 | SecAggUnmaskRequest | SecAggUnmaskShares)



def owned_payload(message: object) -> object:
    """``message`` with its payload copied out of the frame it was decoded from (``decode`` lends a memoryview;
    ``cryptography`` takes only bytes for keys, and a roster's keys must outlive the frame)."""
    payload = getattr(message, "payload", None)
    if isinstance(payload, memoryview):
        return replace(message, payload=bytes(payload))
    return message
