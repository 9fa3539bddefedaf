"""The wire format both ends speak: messages, the versioned binary frame, and chunking.

The aggregator imports this from ``sdk``: the SDK defines the protocol, the server is its peer.
Typical use::

    frames = split(encode(update), max_chunk_bytes)      # sender: one publish per frame
    message = reassembler.feed(frame_bytes)              # receiver: None until a message is whole

Every malformed input raises ``sdk.errors.WireError``; its message starts with the reason
(truncated frame, wrong magic, wrong version, unknown message type, bad header, bad length,
unknown codec, checksum mismatch, inconsistent chunk, missing chunk); an announcement whose
signature does not verify raises ``BadSignature`` (``sdk.wire.signing``).
"""
from __future__ import annotations

from .chunks import MAX_MESSAGE_ID_CHARS, Reassembler, split
from .frame import (
    FRAME_OVERHEAD_BYTES,
    MAGIC,
    MAX_HEADER_BYTES,
    WIRE_VERSION,
    MessageType,
    RawFrame,
    build_frame,
    decode,
    encode,
    read_frame,
)
from .messages import PAYLOAD_KINDS, Ack, Announcement, DeviceMetrics, Message, Status, Update
from .work import PartialSum, WorkOrder
from . import signing

__all__ = [
    "FRAME_OVERHEAD_BYTES",
    "MAGIC",
    "MAX_HEADER_BYTES",
    "MAX_MESSAGE_ID_CHARS",
    "PAYLOAD_KINDS",
    "WIRE_VERSION",
    "Ack",
    "Announcement",
    "DeviceMetrics",
    "Message",
    "MessageType",
    "PartialSum",
    "RawFrame",
    "Reassembler",
    "Status",
    "Update",
    "WorkOrder",
    "build_frame",
    "decode",
    "encode",
    "read_frame",
    "signing",
    "split",
]
