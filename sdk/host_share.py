"""What the device identities of one host share, so a thousand of them fit (issue 14, ARCHITECTURE "Scale").

Every identity subscribes to the same retained announcement topic, so each receives its own copy of the
same frame (~860 KB for the cnn) every round. Held, decoded and signature-checked once per identity, that
is 500 copies of the model per host and 500 Ed25519 verifications per round. Here:

- ``AnnouncementFrames`` keeps the bytes of the latest few announcement frames; an identity's copy that
  equals one of them (a byte comparison: the frames themselves are at hand, so no digest is needed to know
  they are the same) is replaced by the kept object before it is queued, and the frame is decoded and its
  signature verified once, the result (message or error) handed to every identity that received it;
- ``SharedModels`` holds one read-only parameter vector per (run id, model version): an identity's replica
  is a reference to it. A version names one model for the whole run (``aggregator.downlink``), so
  identities that reach it by a full model or by a delta on the same base hold the same bits; the arrays
  are read-only, so a writer fails loudly instead of changing every identity's model (the runtimes copy
  them in with ``set_parameters``). Versions nobody refers to any more are freed (weak references).

Identities still behave like separate devices on the wire: each one's own decisions (selected, already
answered, needs a resync) are taken from its own state exactly as before.
"""
from __future__ import annotations

import threading
import weakref
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from . import wire
from .errors import ConfigError, WireError

_TYPE_OFFSET = 3  # magic (2 bytes) | version u8 | message type u8 (sdk.wire.frame)
KEPT_FRAMES = 4  # the current announcement, the one before (a delta's base), and a retry or two


@dataclass
class _Decoded:
    """One kept frame's decoding: the message or the error, and the signature check once done."""

    message: wire.Message | None = None
    error: WireError | None = None
    verified: bool = False
    refusal: WireError | None = None  # the signature check's error, once checked and failed
    lock: threading.Lock = field(default_factory=threading.Lock)


class AnnouncementFrames:
    """The latest ``capacity`` announcement frames a host received, each decoded and verified once.

    ``intern`` runs on the transport's loop thread (before queueing), ``decode``/``verify`` on the host's
    worker thread; one lock guards the table."""

    def __init__(self, capacity: int = KEPT_FRAMES) -> None:
        if capacity < 1:
            raise ConfigError(f"the announcement frame cache needs room for >= 1 frame, got {capacity}")
        self.capacity = capacity
        self._frames: OrderedDict[int, tuple[bytes, _Decoded]] = OrderedDict()  # id(kept bytes) -> entry
        self._lock = threading.Lock()
        self.decoded = 0  # frames actually decoded (the rest came from the cache); for tests and profiles

    def intern(self, payload: bytes) -> bytes:
        """The kept bytes object equal to ``payload`` (keeping ``payload`` itself when none is)."""
        with self._lock:
            for kept, _ in self._frames.values():
                if len(kept) == len(payload) and kept == payload:
                    return kept
            self._frames[id(payload)] = (payload, _Decoded())
            while len(self._frames) > self.capacity:
                self._frames.popitem(last=False)
            return payload

    def _entry(self, payload: bytes) -> _Decoded | None:
        with self._lock:
            kept = self._frames.get(id(payload))
            return kept[1] if kept is not None and kept[0] is payload else None

    def decode(self, payload: bytes, feed: Callable[[bytes], wire.Message | None]) -> wire.Message | None:
        """``feed(payload)`` (an identity's reassembler), done once for a kept whole frame; WireError as
        ``feed`` raises it, to every identity that asks. A chunk frame is fed every time: chunk state is
        per identity."""
        entry = self._entry(payload)
        if entry is None or _is_chunk(payload):
            return feed(payload)
        with entry.lock:
            if entry.message is None and entry.error is None:
                try:
                    entry.message = feed(payload)
                except WireError as exc:
                    entry.error = exc
                self.decoded += 1
        if entry.error is not None:
            raise entry.error
        return entry.message

    def verify(self, announcement: wire.Announcement, key: Ed25519PublicKey) -> None:
        """``wire.signing.verify``, once per kept decoded announcement (and key)."""
        entry = self._entry_of(announcement)
        if entry is None:
            wire.signing.verify(announcement, key)
            return
        with entry.lock:
            if not entry.verified:
                try:
                    wire.signing.verify(announcement, key)
                except WireError as exc:
                    entry.refusal = exc
                entry.verified = True
        if entry.refusal is not None:
            raise entry.refusal

    def _entry_of(self, message: wire.Message) -> _Decoded | None:
        with self._lock:
            for _, entry in self._frames.values():
                if entry.message is message:
                    return entry
        return None


def _is_chunk(frame: bytes) -> bool:
    """Whether the frame's type byte (after magic and version) says CHUNK; ``feed`` checks the rest."""
    return len(frame) > _TYPE_OFFSET and frame[_TYPE_OFFSET] == wire.MessageType.CHUNK


class SharedModels:
    """One read-only parameter vector per (run id, model version), held while some identity refers to it."""

    def __init__(self) -> None:
        self._models: weakref.WeakValueDictionary[tuple[str, int], np.ndarray] = weakref.WeakValueDictionary()

    def get(self, run_id: str, version: int) -> np.ndarray | None:
        return self._models.get((run_id, version))

    def put(self, run_id: str, version: int, params: np.ndarray) -> np.ndarray:
        """Keep ``params`` (made read-only) as this version's model; the vector already kept, if any."""
        kept = self._models.get((run_id, version))
        if kept is not None:
            return kept
        params.flags.writeable = False
        self._models[(run_id, version)] = params
        return params

    def __len__(self) -> int:
        return len(self._models)


@dataclass(frozen=True)
class HostShare:
    """What a host's identities share (see the module docstring); one per device host."""

    frames: AnnouncementFrames = field(default_factory=AnnouncementFrames)
    models: SharedModels = field(default_factory=SharedModels)
