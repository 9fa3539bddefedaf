"""The aggregator's bounded inbox: the network thread only queues; what overflows is dropped and counted.

An unbounded queue let an update flood grow the aggregator to gigabytes (issue 12, defect 5). Bounded
in messages and bytes; a dropped update was not acked, so an honest device sends it again from its
outbox (after a reconnect or the round's next announcement), and the drop shows in the round's
metrics (``inbox_dropped``).
"""
from __future__ import annotations

import collections
import threading

from edgetrain.sdk.errors import ConfigError


class Inbox:
    """FIFO of (topic, payload) bounded by ``max_messages`` and ``max_bytes``; thread-safe."""

    def __init__(self, max_messages: int, max_bytes: int) -> None:
        if max_messages < 1 or max_bytes < 1:
            raise ConfigError(f"inbox bounds must be >= 1, got {max_messages} messages, {max_bytes} bytes")
        self.max_messages = max_messages
        self.max_bytes = max_bytes
        self._items: collections.deque[tuple[str, bytes]] = collections.deque()
        self._ready = threading.Condition()
        self.queued_bytes = 0
        self.dropped = 0
        self.dropped_bytes = 0

    def put(self, topic: str, payload: bytes) -> bool:
        """Queue one message; False (and counted) when it would exceed a bound."""
        with self._ready:
            if len(self._items) >= self.max_messages or self.queued_bytes + len(payload) > self.max_bytes:
                self.dropped += 1
                self.dropped_bytes += len(payload)
                return False
            self._items.append((topic, payload))
            self.queued_bytes += len(payload)
            self._ready.notify()
            return True

    def get(self, timeout_s: float) -> tuple[str, bytes] | None:
        """The oldest message, waiting up to ``timeout_s``; None when none came."""
        with self._ready:
            if not self._items and not self._ready.wait_for(lambda: bool(self._items), timeout_s):
                return None
            topic, payload = self._items.popleft()
            self.queued_bytes -= len(payload)
            return topic, payload

    def empty(self) -> bool:
        with self._ready:
            return not self._items

    def take_dropped(self) -> tuple[int, int]:
        """(messages, bytes) dropped since the last call; counts from zero again."""
        with self._ready:
            counts = (self.dropped, self.dropped_bytes)
            self.dropped = self.dropped_bytes = 0
            return counts
