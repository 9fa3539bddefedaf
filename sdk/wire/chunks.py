"""Chunking: a frame larger than the transport should carry in one publish travels as CHUNK frames.

Each chunk frame's payload is a slice of the original frame; its header names the message
(``message_id``), the slice (``index`` of ``count``) and the whole (``total_bytes``, ``total_crc32``).
MQTT QoS 1 delivers at least once and, across subscriptions or reconnects, not necessarily in order,
so the reassembler accepts chunks in any order and ignores exact duplicates.
"""
from __future__ import annotations

import math
import threading
import time
import uuid
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any, Mapping

from ..errors import ConfigError, WireError
from .checksum import crc32
from .frame import FRAME_OVERHEAD_BYTES, MessageType, _dump_header, build_frame, decode, decode_raw, read_frame
from .messages import Message

MAX_MESSAGE_ID_CHARS = 128
_CHUNK_FIELDS = frozenset({"message_id", "index", "count", "total_bytes", "total_crc32"})
_REMEMBERED_COMPLETE_IDS = 4096  # late QoS 1 redeliveries of finished messages are ignored, not re-collected


def _chunk_header(message_id: str, index: int, count: int, total_bytes: int, total_crc32: int) -> dict[str, Any]:
    return {"message_id": message_id, "index": index, "count": count,
            "total_bytes": total_bytes, "total_crc32": total_crc32}


def split(frame: bytes, max_chunk_bytes: int, message_id: str | None = None) -> list[bytes]:
    """``[frame]`` when it fits in ``max_chunk_bytes``, else CHUNK frames each no larger than that."""
    if isinstance(max_chunk_bytes, bool) or not isinstance(max_chunk_bytes, int) or max_chunk_bytes <= 0:
        raise ConfigError(f"max_chunk_bytes must be a positive int, got {max_chunk_bytes!r}")
    if len(frame) <= max_chunk_bytes:
        return [bytes(frame)]
    message_id = uuid.uuid4().hex if message_id is None else message_id
    if not isinstance(message_id, str) or not 0 < len(message_id) <= MAX_MESSAGE_ID_CHARS:
        raise ConfigError(f"message_id must be a string of 1..{MAX_MESSAGE_ID_CHARS} characters, got {message_id!r}")
    total_bytes, total_crc32 = len(frame), crc32(frame)
    # Size the slices for the widest header: index and count never have more digits than total_bytes.
    widest_header = _dump_header(_chunk_header(message_id, total_bytes, total_bytes, total_bytes, 0xFFFFFFFF))
    slice_bytes = max_chunk_bytes - FRAME_OVERHEAD_BYTES - len(widest_header)
    if slice_bytes < 1:
        raise ConfigError(f"max_chunk_bytes {max_chunk_bytes} leaves no room for data: a chunk frame's "
                          f"overhead is {FRAME_OVERHEAD_BYTES + len(widest_header)} bytes")
    count = math.ceil(total_bytes / slice_bytes)
    view = memoryview(frame)
    return [
        build_frame(MessageType.CHUNK, _chunk_header(message_id, i, count, total_bytes, total_crc32),
                    view[i * slice_bytes : (i + 1) * slice_bytes])
        for i in range(count)
    ]


@dataclass(frozen=True)
class _ChunkHeader:
    message_id: str
    index: int
    count: int
    total_bytes: int
    total_crc32: int

    @classmethod
    def parse(cls, header: Mapping[str, Any]) -> "_ChunkHeader":
        if set(header) != _CHUNK_FIELDS:
            raise WireError(f"bad header: chunk header has fields {sorted(header)}, expected {sorted(_CHUNK_FIELDS)}")
        message_id = header["message_id"]
        if not isinstance(message_id, str) or not 0 < len(message_id) <= MAX_MESSAGE_ID_CHARS:
            raise WireError(f"bad header: chunk message_id must be 1..{MAX_MESSAGE_ID_CHARS} characters")
        numbers = [header[k] for k in ("index", "count", "total_bytes", "total_crc32")]
        if any(isinstance(n, bool) or not isinstance(n, int) or n < 0 for n in numbers):
            raise WireError(f"bad header: chunk {message_id!r} has a non-integer or negative index/count/total")
        chunk = cls(message_id, *numbers)
        if chunk.count < 1 or chunk.total_crc32 > 0xFFFFFFFF:
            raise WireError(f"bad header: chunk {message_id!r} has count {chunk.count}, crc {chunk.total_crc32}")
        if chunk.count > max(1, chunk.total_bytes):  # every slice carries at least one byte
            raise WireError(f"bad header: chunk {message_id!r} claims count {chunk.count} for "
                            f"{chunk.total_bytes} bytes")
        if chunk.index >= chunk.count:
            raise WireError(f"inconsistent chunk: {message_id!r} index {chunk.index} out of range "
                            f"for count {chunk.count}")
        return chunk


@dataclass
class _Pending:
    count: int
    total_bytes: int
    total_crc32: int
    last_chunk_s: float
    source: str = ""
    slices: dict[int, bytes] = field(default_factory=dict)
    held_bytes: int = 0


def _ranges(indices: list[int]) -> str:
    """``[0, 1, 2, 5, 7, 8]`` -> ``"0-2, 5, 7-8"`` so a huge gap stays a short message."""
    parts: list[str] = []
    start = prev = indices[0]
    for i in indices[1:] + [None]:  # type: ignore[list-item]
        if i is not None and i == prev + 1:
            prev = i
            continue
        parts.append(str(start) if start == prev else f"{start}-{prev}")
        if i is not None:
            start = prev = i
    return ", ".join(parts)


def _missing(pending: _Pending, shown: int = 64) -> str:
    """The first ``shown`` missing indices as ranges: O(held slices), never O(claimed count)."""
    missing: list[int] = []
    for i in range(pending.count):  # count <= total_bytes <= max_pending_bytes; stop early anyway
        if i not in pending.slices:
            missing.append(i)
            if len(missing) >= shown:
                break
    more = pending.count - len(pending.slices) - len(missing)
    return _ranges(missing) + (f" and {more} more" if more > 0 else "")


class Reassembler:
    """Collects chunk frames into messages; whole frames pass straight through.

    ``timeout_s`` counts from a message's latest new chunk (a slow but moving upload is not dropped);
    ``expire`` removes messages idle longer than that. ``max_pending_bytes`` caps the memory held by
    incomplete messages, ``max_pending_bytes_per_source`` those of one ``source`` (the device whose topic
    the chunks came on), so one flooding sender cannot use up what others need. Message ids are per
    source. Thread-safe: the transport's network thread may feed while another expires.
    """

    def __init__(self, timeout_s: float = 60.0, max_pending_bytes: int = 512 * 1024 * 1024,
                 max_pending_bytes_per_source: int | None = None) -> None:
        if not timeout_s > 0:
            raise ConfigError(f"timeout_s must be > 0, got {timeout_s!r}")
        if isinstance(max_pending_bytes, bool) or not isinstance(max_pending_bytes, int) or max_pending_bytes <= 0:
            raise ConfigError(f"max_pending_bytes must be a positive int, got {max_pending_bytes!r}")
        per_source = max_pending_bytes if max_pending_bytes_per_source is None else max_pending_bytes_per_source
        if isinstance(per_source, bool) or not isinstance(per_source, int) or per_source <= 0:
            raise ConfigError(f"max_pending_bytes_per_source must be a positive int, got {per_source!r}")
        self.timeout_s = float(timeout_s)
        self.max_pending_bytes = max_pending_bytes
        self.max_pending_bytes_per_source = per_source
        self._source_bytes: dict[str, int] = {}
        self._pending: dict[str, _Pending] = {}
        self._pending_bytes = 0
        self._completed: OrderedDict[str, None] = OrderedDict()
        self._lock = threading.Lock()

    @property
    def pending_bytes(self) -> int:
        """Bytes held by incomplete messages."""
        return self._pending_bytes

    @property
    def pending_message_ids(self) -> tuple[str, ...]:
        with self._lock:
            return tuple(self._pending)

    def _drop(self, message_id: str) -> _Pending:
        pending = self._pending.pop(message_id)
        self._pending_bytes -= pending.held_bytes
        left = self._source_bytes.get(pending.source, 0) - pending.held_bytes
        if left > 0:
            self._source_bytes[pending.source] = left
        else:
            self._source_bytes.pop(pending.source, None)
        return pending

    def feed(self, data: bytes, now_s: float | None = None, source: str = "") -> Message | None:
        """The decoded message once ``data`` completes one (a whole frame completes itself), else None.

        Inconsistent chunks raise WireError and drop what was collected for that message id.
        """
        raw = read_frame(data)
        if raw.message_type != MessageType.CHUNK:
            return decode_raw(raw)
        chunk = _ChunkHeader.parse(raw.header)
        now_s = time.monotonic() if now_s is None else now_s
        with self._lock:
            frame = self._store(chunk, raw.payload, now_s, source)
        # Joining checked the totals; decoding (inner crc, header, codec) runs outside the lock.
        return None if frame is None else decode(frame)

    def _store(self, chunk: _ChunkHeader, data: bytes, now_s: float, source: str) -> bytes | None:
        """Keep one slice; return the whole frame when this slice completes it."""
        mid = f"{source}/{chunk.message_id}" if source else chunk.message_id
        if mid in self._completed:
            return None  # redelivery of a message already handed out
        if not data:
            raise WireError(f"inconsistent chunk: {mid!r} index {chunk.index} carries no data")
        pending = self._pending_for(chunk, mid, now_s, source)
        previous = pending.slices.get(chunk.index)
        if previous is not None:
            if previous == data:
                return None  # QoS 1 redelivery
            self._drop(mid)
            raise WireError(f"inconsistent chunk: {mid!r} index {chunk.index} arrived twice with different "
                            "contents (message dropped)")
        self._check_room(mid, pending, len(data), source)
        pending.slices[chunk.index] = data
        pending.held_bytes += len(data)
        self._pending_bytes += len(data)
        self._source_bytes[source] = self._source_bytes.get(source, 0) + len(data)
        pending.last_chunk_s = now_s
        return self._complete(mid, pending) if len(pending.slices) == pending.count else None

    def _pending_for(self, chunk: _ChunkHeader, mid: str, now_s: float, source: str) -> _Pending:
        """The message's reassembly state: new (its claimed size bounded first), or the existing one when
        this chunk agrees with it."""
        pending = self._pending.get(mid)
        if pending is None:
            if chunk.total_bytes > self.max_pending_bytes:
                raise WireError(f"message {mid!r} of {chunk.total_bytes} bytes exceeds max_pending_bytes "
                                f"{self.max_pending_bytes}")
            pending = self._pending[mid] = _Pending(chunk.count, chunk.total_bytes, chunk.total_crc32, now_s, source)
        elif (pending.count, pending.total_bytes, pending.total_crc32) != (chunk.count, chunk.total_bytes,
                                                                            chunk.total_crc32):
            self._drop(mid)
            raise WireError(
                f"inconsistent chunk: {mid!r} index {chunk.index} says count={chunk.count}, "
                f"total_bytes={chunk.total_bytes}, crc={chunk.total_crc32:#010x}; earlier chunks said "
                f"count={pending.count}, total_bytes={pending.total_bytes}, crc={pending.total_crc32:#010x} "
                "(message dropped)")
        return pending

    def _check_room(self, mid: str, pending: _Pending, size: int, source: str) -> None:
        """Refuse (and drop the message) a slice over its message's size or the per-source / total bounds."""
        if pending.held_bytes + size > pending.total_bytes:
            self._drop(mid)
            raise WireError(f"inconsistent chunk: {mid!r} slices add up to more than total_bytes "
                            f"{pending.total_bytes} (message dropped)")
        if self._pending_bytes + size > self.max_pending_bytes:
            self._drop(mid)  # it cannot complete without this slice; free what it holds
            raise WireError(f"pending chunks would exceed max_pending_bytes {self.max_pending_bytes}; "
                            f"message {mid!r} dropped")
        if self._source_bytes.get(source, 0) + size > self.max_pending_bytes_per_source:
            self._drop(mid)
            raise WireError(f"pending chunks from {source!r} would exceed max_pending_bytes_per_source "
                            f"{self.max_pending_bytes_per_source}; message {mid!r} dropped")

    def _complete(self, mid: str, pending: _Pending) -> bytes:
        """The reassembled frame, checked against the size and CRC every chunk claimed."""
        self._drop(mid)
        self._completed[mid] = None
        if len(self._completed) > _REMEMBERED_COMPLETE_IDS:
            self._completed.popitem(last=False)
        frame = b"".join(pending.slices[i] for i in range(pending.count))
        if len(frame) != pending.total_bytes or crc32(frame) != pending.total_crc32:
            raise WireError(f"checksum mismatch: reassembled message {mid!r} ({len(frame)} bytes) does not match "
                            f"its total_bytes {pending.total_bytes} / total_crc32 {pending.total_crc32:#010x}")
        return frame

    def expire(self, now_s: float | None = None) -> list[WireError]:
        """Drop messages with no new chunk for ``timeout_s``; one error each, naming the missing indices."""
        now_s = time.monotonic() if now_s is None else now_s
        errors: list[WireError] = []
        with self._lock:
            for mid, pending in list(self._pending.items()):
                idle_s = now_s - pending.last_chunk_s
                if idle_s > self.timeout_s:
                    self._drop(mid)
                    errors.append(WireError(
                        f"missing chunk: message {mid!r} dropped after {idle_s:.1f} s without a new chunk; "
                        f"missing chunk index(es) {_missing(pending)} of {pending.count}"))
        return errors
