"""One exception root for edgetrain, with grouped subclasses (the httpx pattern).

Catch ``EdgetrainError`` to handle anything edgetrain raises on purpose; catch a group
(``WireError``, ``TransportError``…) to handle one kind of failure. Each message names the
thing that is wrong (a file, a field, a device) and what is wrong with it.
"""
from __future__ import annotations


class EdgetrainError(Exception):
    """Root of every error edgetrain raises on purpose."""


class ConfigError(EdgetrainError, ValueError):
    """Bad configuration or arguments: a flag, a hyper-parameter, a partition spec."""


class DataError(EdgetrainError):
    """A data set file is missing, truncated or not what it claims to be."""


class BundleError(EdgetrainError):
    """A training bundle is missing a file, fails its hash check, or has an unknown format."""


class RuntimeBackendError(EdgetrainError):
    """An on-device runtime is unavailable or cannot do what was asked."""


class WireError(EdgetrainError):
    """A frame or message could not be decoded: truncated, wrong version, bad header,
    bad length, unknown codec, checksum mismatch, missing chunk."""


class UnknownCodec(WireError):
    """A codec spec names no registered codec, or cannot be parsed: the bytes cannot be decoded here."""


class BadSignature(WireError):
    """An announcement is unsigned, or its signature does not verify with the aggregator's public key."""


class TransportError(EdgetrainError):
    """Talking to the broker failed."""


class BrokerUnavailable(TransportError):
    """The broker cannot be reached (refused, DNS, TLS handshake, auth)."""


class PublishTimeout(TransportError):
    """A publish was not acknowledged by the broker in time."""


class ClientIdInUse(TransportError):
    """Another connection took over this client id (two processes share one id); the transport stops for good."""


class UpdateRejected(EdgetrainError):
    """The aggregator refused an update. ``reason`` is a short machine-readable code."""

    def __init__(self, reason: str, detail: str = "") -> None:
        self.reason = reason
        self.detail = detail
        super().__init__(f"{reason}: {detail}" if detail else reason)


class MeasurementUnavailable(EdgetrainError):
    """A benchmark figure (energy, temperature…) cannot be measured here; says why."""


class SecAggAborted(EdgetrainError):
    """A secure-aggregation round stopped for this party (``sdk.secagg``). ``reason`` is a short code
    (``too_few_devices``, ``share_auth_failed``, ``too_few_shares``…), ``detail`` says what and who."""

    def __init__(self, reason: str, detail: str = "") -> None:
        self.reason = reason
        self.detail = detail
        super().__init__(f"{reason}: {detail}" if detail else reason)
