"""The versioned binary frame every message travels in.

Layout (integers little-endian)::

    magic b"ET" | version u8 | message type u8 | header length u32 | payload length u64
    | header (UTF-8 JSON object) | payload (raw bytes) | crc32 u32 over everything before it

The header holds every message field except ``payload``; tensor bytes in the payload are
little-endian (the codec's job). Decoding checks, in order: size, magic, version, type, lengths,
checksum, header; anything wrong raises WireError whose message starts with the reason.
"""
from __future__ import annotations

import enum
import json
import struct
from dataclasses import dataclass
from typing import Any, Mapping

from ..codecs import get_codec, parse_codec_spec
from ..errors import ConfigError, UnknownCodec, WireError
from .checksum import crc32
from .messages import Ack, Announcement, DeviceMetrics, Message, Status, Update, from_header, header_fields
from .secagg import (SecAggAdvertise, SecAggMaskedInput, SecAggRoster, SecAggShareDelivery, SecAggShares,
                     SecAggUnmaskRequest, SecAggUnmaskShares)
from .work import PartialSum, WorkOrder

MAGIC = b"ET"
# 2: typed round protocol (run id, task, RoundSettings, codec specs, base version, signature in the
# announcement; run id in updates and status). A version-1 peer and this code refuse each other's frames.
WIRE_VERSION = 2
MAX_HEADER_BYTES = 1 << 20  # headers are small JSON; a bigger one is corruption or abuse

_PREFIX = struct.Struct("<2sBBIQ")
_CRC = struct.Struct("<I")
FRAME_OVERHEAD_BYTES = _PREFIX.size + _CRC.size  # bytes around header + payload


class MessageType(enum.IntEnum):
    ANNOUNCEMENT = 1
    UPDATE = 2
    ACK = 3
    STATUS = 4
    DEVICE_METRICS = 5
    WORK_ORDER = 6  # coordinator -> aggregation workers (sdk.wire.work)
    PARTIAL_SUM = 7  # aggregation worker -> coordinator
    CHUNK = 16  # a slice of a larger frame (see sdk.wire.chunks)
    # secure aggregation (sdk.wire.secagg), one per stage and direction
    SECAGG_ADVERTISE = 20
    SECAGG_ROSTER = 21
    SECAGG_SHARES = 22
    SECAGG_SHARE_DELIVERY = 23
    SECAGG_MASKED_INPUT = 24
    SECAGG_UNMASK_REQUEST = 25
    SECAGG_UNMASK_SHARES = 26


_TYPE_OF_CLASS: dict[type, MessageType] = {
    Announcement: MessageType.ANNOUNCEMENT,
    Update: MessageType.UPDATE,
    Ack: MessageType.ACK,
    Status: MessageType.STATUS,
    DeviceMetrics: MessageType.DEVICE_METRICS,
    WorkOrder: MessageType.WORK_ORDER,
    PartialSum: MessageType.PARTIAL_SUM,
    SecAggAdvertise: MessageType.SECAGG_ADVERTISE,
    SecAggRoster: MessageType.SECAGG_ROSTER,
    SecAggShares: MessageType.SECAGG_SHARES,
    SecAggShareDelivery: MessageType.SECAGG_SHARE_DELIVERY,
    SecAggMaskedInput: MessageType.SECAGG_MASKED_INPUT,
    SecAggUnmaskRequest: MessageType.SECAGG_UNMASK_REQUEST,
    SecAggUnmaskShares: MessageType.SECAGG_UNMASK_SHARES,
}
_CLASS_OF_TYPE: dict[int, type] = {int(t): cls for cls, t in _TYPE_OF_CLASS.items()}
_KNOWN_TYPES = frozenset(int(t) for t in MessageType)


@dataclass(frozen=True)
class RawFrame:
    """A frame whose structure and checksum are verified but whose header is not yet a message."""

    message_type: int
    header: dict[str, Any]
    payload: bytes | memoryview  # a read-only view into the frame when the frame is immutable bytes


def _dump_header(header: Mapping[str, Any]) -> bytes:
    try:
        # ensure_ascii=False keeps non-ASCII ids readable and short; NaN is allowed for diverged losses.
        data = json.dumps(header, ensure_ascii=False, separators=(",", ":"), sort_keys=True).encode("utf-8")
    except (TypeError, ValueError, UnicodeEncodeError) as exc:
        raise WireError(f"bad header: cannot encode as UTF-8 JSON ({exc})") from None
    if len(data) > MAX_HEADER_BYTES:
        raise WireError(f"bad header: {len(data)} bytes exceeds the {MAX_HEADER_BYTES}-byte limit")
    return data


PAYLOAD_ALIGNMENT = 16  # payloads start at a multiple of this offset in their frame


def _pad_to_payload_alignment(header_bytes: bytes) -> bytes:
    """The header with trailing spaces (JSON whitespace: every reader parses it unchanged) up to the
    length that puts the payload at a multiple of ``PAYLOAD_ALIGNMENT`` bytes into the frame. A frame is
    a bytes object, whose data CPython aligns to 16, so the payload's float32/float64 values are aligned
    in place: numpy and BLAS read them where they lie (a misaligned view costs numpy's slow
    unaligned loops, ~8x on a dot product, or a copy). At most 15 bytes per frame."""
    pad = -(_PREFIX.size + len(header_bytes)) % PAYLOAD_ALIGNMENT
    if not pad or len(header_bytes) + pad > MAX_HEADER_BYTES:
        return header_bytes
    return header_bytes + b" " * pad


def build_frame(message_type: int, header: Mapping[str, Any], payload: bytes | memoryview = b"") -> bytes:
    """Frame ``header`` + ``payload`` as ``message_type`` (no message-level checks)."""
    header_bytes = _dump_header(header)
    if payload:
        header_bytes = _pad_to_payload_alignment(header_bytes)
    prefix = _PREFIX.pack(MAGIC, WIRE_VERSION, int(message_type), len(header_bytes), len(payload))
    crc = crc32(payload, crc32(header_bytes, crc32(prefix)))
    return b"".join((prefix, header_bytes, payload, _CRC.pack(crc)))


def _reject_duplicate_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    result = dict(pairs)
    if len(result) != len(pairs):
        raise WireError("bad header: repeated key in a JSON object")
    return result


# One decoder for every frame: json.loads with a hook builds a new JSONDecoder per call.
_HEADER_DECODER = json.JSONDecoder(object_pairs_hook=_reject_duplicate_keys)


def read_frame(frame: bytes | bytearray | memoryview) -> RawFrame:
    """Check a frame's structure and checksum and parse its header; WireError on anything wrong."""
    if not isinstance(frame, (bytes, bytearray, memoryview)):
        raise WireError(f"not a frame: expected bytes, got {type(frame).__name__}")
    view = memoryview(frame)
    if view.ndim != 1 or view.format != "B":
        try:
            view = view.cast("B")
        except TypeError as exc:  # a non-contiguous view cannot be one frame
            raise WireError(f"not a frame: {exc}") from None
    size = len(view)
    if size < FRAME_OVERHEAD_BYTES:
        raise WireError(f"truncated frame: {size} bytes, a frame has at least {FRAME_OVERHEAD_BYTES}")
    magic, version, message_type, header_len, payload_len = _PREFIX.unpack_from(view)
    if magic != MAGIC:
        raise WireError(f"wrong magic {bytes(magic)!r} (expected {MAGIC!r}): not an edgetrain frame")
    if version != WIRE_VERSION:
        raise WireError(f"wrong version: the frame is wire version {version}, this edgetrain speaks wire version "
                        f"{WIRE_VERSION}; upgrade the older of the two peers")
    if message_type not in _KNOWN_TYPES:
        raise WireError(f"unknown message type {message_type}")
    if header_len > MAX_HEADER_BYTES:
        raise WireError(f"bad length: header length {header_len} exceeds the {MAX_HEADER_BYTES}-byte limit")
    expected = FRAME_OVERHEAD_BYTES + header_len + payload_len
    if size < expected:
        raise WireError(f"truncated frame: {size} bytes, the lengths in its prefix need {expected}")
    if size > expected:
        raise WireError(f"bad length: {size} bytes, the lengths in its prefix add up to {expected}")
    (stored_crc,) = _CRC.unpack_from(view, size - _CRC.size)
    actual_crc = crc32(view[: size - _CRC.size])
    if stored_crc != actual_crc:
        raise WireError(f"checksum mismatch: frame says crc32 {stored_crc:#010x}, content has {actual_crc:#010x}")
    header_end = _PREFIX.size + header_len
    try:
        header = _HEADER_DECODER.decode(bytes(view[_PREFIX.size : header_end]).decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:  # JSONDecodeError is a ValueError
        raise WireError(f"bad header: not UTF-8 JSON ({exc})") from None
    if not isinstance(header, dict):
        raise WireError(f"bad header: expected a JSON object, got {type(header).__name__}")
    payload = view[header_end : size - _CRC.size]
    # An immutable frame lends its bytes (no copy of a 0.86 MB update on the aggregator's hot path);
    # a mutable one (bytearray, writable view) is copied, so writing to it later cannot change a
    # message whose checksum was verified.
    if not (view.readonly and isinstance(view.obj, bytes)):
        payload = bytes(payload)
    return RawFrame(int(message_type), header, payload)


def _check_codec(message: Message) -> None:
    """An update's codec must be one this side can decode (only the name has to be registered; the
    aggregator's validation checks the parameters). An announcement's specs are ``CodecSpec`` values,
    checked when it was built."""
    spec = getattr(message, "codec", None)
    if not isinstance(spec, str):
        return
    try:
        name, _ = parse_codec_spec(spec)
    except ConfigError as exc:
        raise UnknownCodec(f"unknown codec: bad codec spec in {type(message).__name__}.codec ({exc})") from None
    try:
        get_codec(name)
    except UnknownCodec as exc:
        raise UnknownCodec(f"{type(message).__name__}.codec: {exc}") from None


def encode(message: Message) -> bytes:
    """The frame for ``message``; an unregistered codec raises WireError here, before anything is sent."""
    message_type = _TYPE_OF_CLASS.get(type(message))
    if message_type is None:
        raise WireError(f"cannot encode {type(message).__name__}: not a wire message")
    _check_codec(message)
    return build_frame(message_type, header_fields(message), getattr(message, "payload", b""))


def decode(frame: bytes | bytearray | memoryview) -> Message:
    """The message in one whole frame. Chunk frames go to ``Reassembler.feed`` instead."""
    return decode_raw(read_frame(frame))


def decode_raw(raw: RawFrame) -> Message:
    """The message in a frame ``read_frame`` already checked."""
    if raw.message_type == MessageType.CHUNK:
        raise WireError("chunk frame: one slice of a larger message; feed it to a Reassembler")
    message = from_header(_CLASS_OF_TYPE[raw.message_type], raw.header, raw.payload)
    _check_codec(message)
    return message
