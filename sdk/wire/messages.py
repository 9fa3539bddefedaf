"""The five messages devices and the aggregator exchange. Field names are the protocol: every field
except ``payload`` travels in a frame's JSON header, so renaming one breaks peers.

Constructors validate and normalise (lists -> tuples, ints -> floats where a float is meant, mappings
-> plain dicts of JSON values) and raise WireError naming the field, so a message decoded from a frame
is exactly as trustworthy as one built in code.
"""
from __future__ import annotations

import functools
import math
from dataclasses import MISSING, dataclass, fields
from typing import Any, Mapping

from ..codecs import CodecSpec
from ..errors import ConfigError, WireError
from ..round_settings import TASKS, RoundSettings

PAYLOAD_KINDS = ("params", "delta", "none")
PLATFORM_FIELDS = ("machine", "python_version", "runtime", "edgetrain_version")  # Status: what the device is
SIGNATURE_HEX_CHARS = 128  # an Ed25519 signature is 64 bytes
MAX_RUN_ID_CHARS = 64
MAX_LABEL_CHARS = 64  # a machine name or a version string; longer is a bug or an attack
_MAX_JSON_DEPTH = 32  # status info is a small config tree; deeper is a bug or an attack


def _fail(owner: object, name: str, problem: str) -> WireError:
    return WireError(f"{type(owner).__name__}.{name}: {problem}")


def _set(owner: object, name: str, value: Any) -> None:
    object.__setattr__(owner, name, value)  # normalising a frozen dataclass in __post_init__


def _check_str(owner: object, name: str, allow_empty: bool = False) -> None:
    value = getattr(owner, name)
    if not isinstance(value, str):
        raise _fail(owner, name, f"expected a string, got {type(value).__name__}")
    if not allow_empty and not value:
        raise _fail(owner, name, "must not be empty")


def _check_count(owner: object, name: str) -> None:
    value = getattr(owner, name)
    # bool is an int subclass; True as a round id is a bug, not a number.
    if isinstance(value, bool) or not isinstance(value, int):
        raise _fail(owner, name, f"expected an int, got {type(value).__name__}")
    if value < 0:
        raise _fail(owner, name, f"must be >= 0, got {value}")


def _check_bool(owner: object, name: str) -> None:
    value = getattr(owner, name)
    if not isinstance(value, bool):
        raise _fail(owner, name, f"expected a bool, got {type(value).__name__}")


def _as_float(owner: object, name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise _fail(owner, name, f"expected a number, got {type(value).__name__}")
    try:
        return float(value)
    except OverflowError as exc:  # an int too large for a double
        raise _fail(owner, name, f"number out of range ({exc})") from None


def _check_bytes(owner: object, name: str) -> None:
    value = getattr(owner, name)
    if not isinstance(value, (bytes, bytearray, memoryview)):
        raise _fail(owner, name, f"expected bytes, got {type(value).__name__}")
    # A read-only byte view of immutable bytes (``frame.read_frame`` lends the frame's payload) is
    # kept as it is: no copy, and nobody can change it. Anything mutable is copied.
    if isinstance(value, memoryview) and value.readonly and isinstance(value.obj, bytes) and (
            value.format == "B" and value.ndim == 1 and value.c_contiguous):
        return
    if not isinstance(value, bytes):
        _set(owner, name, bytes(value))


def _check_float_map(owner: object, name: str) -> None:
    """str -> float; NaN and inf are allowed because a diverging loss must still be reportable."""
    value = getattr(owner, name)
    # dict first: isinstance against typing's Mapping is an ABC subclass check (~1 us per update)
    if not isinstance(value, dict) and not isinstance(value, Mapping):
        raise _fail(owner, name, f"expected a mapping, got {type(value).__name__}")
    result: dict[str, float] = {}
    for key, item in value.items():
        if not isinstance(key, str):
            raise _fail(owner, name, f"keys must be strings, got {key!r}")
        result[key] = _as_float(owner, f"{name}[{key!r}]", item)
    _set(owner, name, result)


def _json_value(owner: object, path: str, value: Any, depth: int = 0) -> Any:
    """A copy of ``value`` made of dict/list/str/int/float/bool/None only, or WireError naming the path."""
    if depth > _MAX_JSON_DEPTH:
        raise _fail(owner, path, f"nested deeper than {_MAX_JSON_DEPTH} levels")
    if value is None or isinstance(value, (str, bool, int, float)):
        return value
    if isinstance(value, Mapping):
        out = {}
        for key, item in value.items():
            if not isinstance(key, str):
                raise _fail(owner, path, f"keys must be strings, got {key!r}")
            out[key] = _json_value(owner, f"{path}[{key!r}]", item, depth + 1)
        return out
    if isinstance(value, (list, tuple)):
        return [_json_value(owner, f"{path}[{i}]", item, depth + 1) for i, item in enumerate(value)]
    raise _fail(owner, path, f"{type(value).__name__} is not JSON-able")


def _check_json_map(owner: object, name: str) -> None:
    value = getattr(owner, name)
    if not isinstance(value, Mapping):
        raise _fail(owner, name, f"expected a mapping, got {type(value).__name__}")
    _set(owner, name, _json_value(owner, name, value))


def _check_run_id(owner: object) -> None:
    _check_str(owner, "run_id")
    run_id = getattr(owner, "run_id")
    if len(run_id) > MAX_RUN_ID_CHARS or not run_id.isascii() or not run_id.isprintable():
        raise _fail(owner, "run_id", f"must be at most {MAX_RUN_ID_CHARS} printable ASCII characters")


def _check_label(owner: object, name: str) -> None:
    """A short printable ASCII string or "" (a peer that predates the field sends nothing)."""
    _check_str(owner, name, allow_empty=True)
    value = getattr(owner, name)
    if len(value) > MAX_LABEL_CHARS or not value.isascii() or not value.isprintable():
        raise _fail(owner, name, f"must be at most {MAX_LABEL_CHARS} printable ASCII characters")


def _check_codec_spec(owner: object, name: str) -> None:
    value = getattr(owner, name)
    if isinstance(value, CodecSpec):
        return
    if not isinstance(value, str):
        raise _fail(owner, name, f"expected a codec spec string, got {type(value).__name__}")
    try:  # UnknownCodec is a WireError: re-raised naming the field, like a bad parameter
        _set(owner, name, CodecSpec.parse(value))
    except (ConfigError, WireError) as exc:
        raise _fail(owner, name, f"unknown codec or bad codec spec {value[:80]!r} ({exc})") from None


def _check_settings(owner: object) -> None:
    value = getattr(owner, "settings")
    if isinstance(value, RoundSettings):
        return
    try:
        _set(owner, "settings", RoundSettings.from_mapping(value))
    except ConfigError as exc:
        raise _fail(owner, "settings", str(exc)) from None


def _check_signature(owner: object) -> None:
    value = getattr(owner, "signature")
    _check_str(owner, "signature", allow_empty=True)
    if value and (len(value) != SIGNATURE_HEX_CHARS or any(c not in "0123456789abcdef" for c in value)):
        raise _fail(owner, "signature", f"expected {SIGNATURE_HEX_CHARS} lowercase hex digits or nothing")


@dataclass(frozen=True)
class Announcement:
    """Aggregator -> devices: round ``round_id`` of run ``run_id`` starts from ``model_version``;
    ``selected`` devices do ``task`` with ``settings`` and answer, encoded with ``uplink_codec``,
    before ``deadline_unix_s``. The payload is the model (``params``), the change from
    ``base_version`` (``delta``), or nothing (``none``), encoded with ``downlink_codec``.
    ``signature`` is the aggregator's Ed25519 signature (hex; ``sdk.wire.signing``), empty when unsigned.

    A new ``run_id`` tells a device to start its per-run state afresh (progress, codec residuals, outbox).
    """

    run_id: str
    round_id: int
    model_version: int
    strategy: str
    task: str
    selected: tuple[str, ...]
    deadline_unix_s: float
    settings: RoundSettings
    uplink_codec: CodecSpec
    payload_kind: str
    downlink_codec: CodecSpec
    base_version: int | None
    payload: bytes | memoryview  # read-only; a view into its frame once decoded
    signature: str = ""

    def __post_init__(self) -> None:
        _check_run_id(self)
        _check_count(self, "round_id")
        _check_count(self, "model_version")
        _check_str(self, "strategy")
        _check_str(self, "task")
        if self.task not in TASKS:
            raise _fail(self, "task", f"{self.task!r} is not one of {TASKS}")
        self._check_selected_and_deadline()
        _check_settings(self)
        _check_codec_spec(self, "uplink_codec")
        _check_codec_spec(self, "downlink_codec")
        self._check_payload()
        _check_signature(self)

    def _check_selected_and_deadline(self) -> None:
        if not isinstance(self.selected, (list, tuple)):
            raise _fail(self, "selected", f"expected a list of device ids, got {type(self.selected).__name__}")
        if not all(isinstance(d, str) and d for d in self.selected):
            raise _fail(self, "selected", "every device id must be a non-empty string")
        _set(self, "selected", tuple(self.selected))
        deadline = _as_float(self, "deadline_unix_s", self.deadline_unix_s)
        if not math.isfinite(deadline):
            raise _fail(self, "deadline_unix_s", f"must be finite, got {deadline}")
        _set(self, "deadline_unix_s", deadline)

    def _check_payload(self) -> None:
        _check_str(self, "payload_kind")
        if self.payload_kind not in PAYLOAD_KINDS:
            raise _fail(self, "payload_kind", f"{self.payload_kind!r} is not one of {PAYLOAD_KINDS}")
        if self.payload_kind == "delta":
            _check_count(self, "base_version")
        elif self.base_version is not None:
            raise _fail(self, "base_version", f"only a delta has a base version, this payload is {self.payload_kind!r}")
        _check_bytes(self, "payload")
        if self.payload_kind == "none" and self.payload:
            raise _fail(self, "payload", f"payload_kind 'none' but {len(self.payload)} payload bytes")


@dataclass(frozen=True)
class Update:
    """Device -> aggregator: the device's contribution to ``round_id``, computed from
    ``model_version`` of run ``run_id`` over ``num_examples`` examples. ``update_id`` is unique per attempt so the
    aggregator can drop QoS 1 redeliveries; ``codec`` is the spec that decodes ``payload``."""

    device_id: str
    round_id: int
    model_version: int
    update_id: str
    num_examples: int
    codec: str
    payload: bytes | memoryview  # read-only; a view into its frame once decoded
    metrics: Mapping[str, float]
    run_id: str  # the run whose round this answers: an update for another run is never aggregated

    def __post_init__(self) -> None:
        _check_run_id(self)
        _check_str(self, "device_id")
        _check_count(self, "round_id")
        _check_count(self, "model_version")
        _check_str(self, "update_id")
        _check_count(self, "num_examples")
        _check_str(self, "codec")
        _check_bytes(self, "payload")
        _check_float_map(self, "metrics")


@dataclass(frozen=True)
class Ack:
    """Aggregator -> device: whether update ``update_id`` was accepted; ``reason`` is a short code when not."""

    device_id: str
    round_id: int
    update_id: str
    accepted: bool
    reason: str = ""

    def __post_init__(self) -> None:
        _check_str(self, "device_id")
        _check_count(self, "round_id")
        _check_str(self, "update_id")
        _check_bool(self, "accepted")
        _check_str(self, "reason", allow_empty=True)


@dataclass(frozen=True)
class Status:
    """Device -> everyone: online or not (the offline one is the MQTT last will), plus free-form info
    (partition, energy). ``run_id`` is the run the device serves ("" before its first one);
    ``skip_reason`` says why it last skipped a round it was selected for or refused an announcement.
    What the device is — ``machine`` (``platform.machine()``), ``python_version``, ``runtime`` (the
    training backend) and ``edgetrain_version`` — is "" where unknown: the last will, or a wire-v2 peer
    that predates these fields."""

    device_id: str
    online: bool
    info: Mapping[str, Any]
    run_id: str = ""
    skip_reason: str = ""
    machine: str = ""
    python_version: str = ""
    runtime: str = ""
    edgetrain_version: str = ""

    def __post_init__(self) -> None:
        _check_str(self, "device_id")
        _check_bool(self, "online")
        _check_json_map(self, "info")
        if self.run_id:
            _check_run_id(self)
        _check_str(self, "run_id", allow_empty=True)
        _check_str(self, "skip_reason", allow_empty=True)
        for name in PLATFORM_FIELDS:
            _check_label(self, name)


@dataclass(frozen=True)
class DeviceMetrics:
    """Device -> aggregator: measurements for one round (latency_s, bytes_up, joules…)."""

    device_id: str
    round_id: int
    values: Mapping[str, float]

    def __post_init__(self) -> None:
        _check_str(self, "device_id")
        _check_count(self, "round_id")
        _check_float_map(self, "values")


Message = Announcement | Update | Ack | Status | DeviceMetrics


def _header_value(value: Any) -> Any:
    if isinstance(value, tuple):
        return list(value)
    if isinstance(value, CodecSpec):
        return str(value)
    if isinstance(value, RoundSettings):
        return value.to_dict()
    return value


def header_fields(message: Message) -> dict[str, Any]:
    """Every field except ``payload``, as JSON-able values (tuples become lists, codec specs their
    canonical text, settings a dict)."""
    return {f.name: _header_value(getattr(message, f.name)) for f in fields(message) if f.name != "payload"}


@functools.lru_cache(maxsize=None)
def _header_schema(cls: type) -> tuple[frozenset[str], frozenset[str], bool]:
    """(header field names, the required ones, whether ``cls`` has a payload), once per message class:
    ``dataclasses.fields`` rebuilds its tuple on every call, which cost every decoded update ~10 us."""
    names = frozenset(f.name for f in fields(cls)) - {"payload"}
    required = frozenset(f.name for f in fields(cls)
                         if f.name != "payload" and f.default is MISSING and f.default_factory is MISSING)
    return names, required, any(f.name == "payload" for f in fields(cls))


def has_payload(cls: type) -> bool:
    return _header_schema(cls)[2]


def from_header(cls: type, header: Mapping[str, Any], payload: bytes) -> Message:
    """Build ``cls`` from a decoded header (+ payload); missing or unknown fields raise WireError."""
    names, required, _ = _header_schema(cls)
    unknown = sorted(set(header) - names)
    if unknown:
        raise WireError(f"bad header: {cls.__name__} has no field(s) {', '.join(unknown)}")
    missing = sorted(required - set(header))
    if missing:
        raise WireError(f"bad header: {cls.__name__} is missing field(s) {', '.join(missing)}")
    kwargs = dict(header)
    if has_payload(cls):
        kwargs["payload"] = payload
    elif payload:
        raise WireError(f"bad length: {cls.__name__} carries no payload but the frame has {len(payload)} bytes")
    try:
        return cls(**kwargs)
    except WireError as exc:
        raise WireError(f"bad header: {exc}") from None
