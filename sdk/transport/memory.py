"""The in-memory twin of the MQTT transport, for tests: ``MemoryBroker`` + ``MemoryTransport``.

As httpx's ``MockTransport`` stands in for its HTTP transport, ``MemoryTransport`` satisfies the same
``Transport`` protocol as ``MqttTransport`` and keeps the broker behaviour edgetrain relies on:
topic filters with ``+``/``#`` (``matching``, the same code the MQTT transport dispatches with), retained
messages (an empty retained payload clears one; retained messages arrive again on every (re)subscription,
as Mosquitto sends them), persistent sessions (QoS 1 messages for a client that is away wait for it), the
last will on an abrupt end (``sever``) and not on ``close``, one connection per client id (a second
``connect`` under the id takes the session over; the older transport stops with ``ClientIdInUse``), broker
outages (``go_down``/``come_back``: reconnect hooks run, held publishes go out) and injected publish failures
(``publish_fault``).

Delivery is synchronous: a publish returns after every subscriber's handlers ran, on the publisher's thread.
That keeps tests deterministic (what a publish causes has happened when it returns), needs no thread per
client, and is the shape of a selector-driven transport, where handlers run on whichever thread drives the
loop. Handlers keep the seam's rule (quick, no blocking ``publish``/``subscribe`` from inside one): a
transport refuses a publish or subscribe made from inside one of its own handlers, as the MQTT one does.
The twin never waits: a publish while disconnected is held (paho holds it too, and sends it after the
reconnect) and fails at once with ``PublishTimeout``, as if its timeout had passed.
"""
from __future__ import annotations

import logging
import threading
from dataclasses import dataclass, field
from typing import Callable

from ..broker_config import BrokerConfig
from ..errors import BrokerUnavailable, ConfigError, PublishTimeout, TransportError
from ..outbox import Outbox
from .base import FailureHook, Handler, client_id_in_use, outbox_flush, run_failure_hooks
from .matching import check_filter, check_topic, topic_matches

_log = logging.getLogger(__name__)
DEFAULT_URL = "mqtt://memory.invalid"  # .invalid (RFC 2606) never resolves: no real client reaches it by mistake
PublishFault = Callable[[str, bytes, float], None]  # (topic, payload, timeout_s); raises to fail the publish


@dataclass(frozen=True)
class MemoryMessage:
    """One message the broker accepted, in order: what crossed the wire."""

    topic: str
    payload: bytes
    qos: int
    retain: bool
    sender: str  # the publisher's client id, or "<will>" for a last will


@dataclass
class _Session:
    """What the broker keeps per client id: its filters, its connection, what waits for it while away."""

    filters: dict[str, int] = field(default_factory=dict)  # topic filter -> QoS
    queued: list[tuple[str, bytes]] = field(default_factory=list)
    online: MemoryTransport | None = None
    persistent: bool = True


class MemoryBroker:
    """An MQTT broker in process memory; thread-safe. ``messages`` records every accepted message."""

    def __init__(self, url: str = DEFAULT_URL) -> None:
        self.config = BrokerConfig(url)
        self.messages: list[MemoryMessage] = []
        self._retained: dict[str, bytes] = {}
        self._sessions: dict[str, _Session] = {}
        self._up = True
        self._lock = threading.RLock()

    @property
    def is_up(self) -> bool:
        return self._up

    def retained(self, topic: str) -> bytes | None:
        """The retained payload on ``topic``, or None."""
        with self._lock:
            return self._retained.get(topic)

    def has_session(self, client_id: str) -> bool:
        with self._lock:
            return client_id in self._sessions

    def go_down(self) -> None:
        """A broker outage: every connection drops (no last wills: the broker itself went away)."""
        with self._lock:
            self._up = False
            for session in self._sessions.values():
                if session.online is not None:
                    session.online._lost_connection()

    def come_back(self) -> None:
        """The broker is back: every transport that was connected reconnects (subscriptions re-made, held
        publishes sent, ``on_reconnect`` hooks run), all on the caller's thread."""
        with self._lock:
            self._up = True
            waiting = [s.online for s in self._sessions.values() if s.online is not None]
        for transport in waiting:
            transport._reconnect()
        for transport in waiting:
            transport._after_reconnect()

    # -- used by MemoryTransport ----------------------------------------------------------------------
    def _attach(self, transport: MemoryTransport, clean_start: bool, persistent: bool) -> list[tuple[str, bytes]]:
        """Connect ``transport``: take over any connection under its id; what its session queued."""
        with self._lock:
            if not self._up:
                raise BrokerUnavailable(f"cannot reach broker {self.config.url}: it is down")
            session = self._sessions.get(transport.client_id)
            if session is None or clean_start:
                session = _Session()
            previous, session.online, session.persistent = session.online, transport, persistent
            self._sessions[transport.client_id] = session
            session.filters.update(transport._filters())
            queued, session.queued = session.queued, []
        if previous is not None and previous is not transport:
            previous._taken_over()
        return queued

    def _detach(self, transport: MemoryTransport, will: tuple[str, bytes, bool] | None) -> None:
        """``transport`` left; publish ``will`` (an abrupt end) and keep a persistent session."""
        with self._lock:
            session = self._sessions.get(transport.client_id)
            if session is not None and session.online is transport:
                session.online = None
                if not session.persistent:
                    del self._sessions[transport.client_id]
        if will is not None:
            self._route(MemoryMessage(will[0], will[1], 1, will[2], "<will>"))

    def _discard(self, client_id: str) -> None:
        with self._lock:
            session = self._sessions.get(client_id)
            if session is not None and session.online is None:
                del self._sessions[client_id]

    def _subscribe(self, transport: MemoryTransport, topic_filter: str, qos: int) -> list[tuple[str, bytes]]:
        """Record the filter in ``transport``'s session; the retained messages it matches."""
        with self._lock:
            session = self._sessions.get(transport.client_id)
            if session is not None and session.online is transport:
                session.filters[topic_filter] = qos
            return [(t, p) for t, p in self._retained.items() if topic_matches(topic_filter, t)]

    def _route(self, message: MemoryMessage) -> None:
        """Accept ``message``: retain it, queue it for sessions that are away, deliver it to the others."""
        deliveries: list[MemoryTransport] = []
        with self._lock:
            self.messages.append(message)
            if message.retain:
                if message.payload:
                    self._retained[message.topic] = message.payload
                else:  # MQTT: an empty retained message clears the topic's retained one
                    self._retained.pop(message.topic, None)
            for session in self._sessions.values():
                if not any(topic_matches(f, message.topic) for f in session.filters):
                    continue
                if session.online is not None:
                    deliveries.append(session.online)
                elif message.qos >= 1:
                    session.queued.append((message.topic, message.payload))
        for transport in deliveries:  # outside the lock: a handler may take its own locks
            transport._deliver(message.topic, message.payload)


_in_handler = threading.local()  # .transports: ids of the transports whose handler this thread is running


class MemoryTransport:
    """A client of a ``MemoryBroker`` with ``MqttTransport``'s constructor shape and behaviour.

    ``publish_fault``, when set, is called as ``fault(topic, payload, timeout_s)`` before a publish on a
    live connection is accepted; raising (``PublishTimeout``, ``TransportError``…) fails that publish and
    nothing is delivered.
    """

    def __init__(self, broker: MemoryBroker, client_id: str, *, clean_start: bool = False,
                 session_expiry_s: int = 3600, will: tuple[str, bytes, bool] | None = None) -> None:
        if not client_id:
            raise ConfigError("client_id is empty; a persistent session needs a stable id")
        if not 0 <= session_expiry_s <= 0xFFFFFFFF:
            raise ConfigError(f"session_expiry_s must be in [0, 2**32 - 1], got {session_expiry_s}")
        if will is not None:
            try:
                check_topic(will[0])
            except TransportError:
                raise ConfigError(f"transport {client_id!r}: will topic {will[0]!r} must be a plain topic") from None
        self.broker = broker
        self.client_id = client_id
        self.on_reconnect: list[Callable[[], None]] = []
        self.on_failure: list[FailureHook] = []
        self.publish_fault: PublishFault | None = None
        self._clean_start = clean_start
        self._persistent = session_expiry_s > 0
        self._will = will
        self._subscriptions: dict[str, tuple[Handler, int]] = {}
        self._held: list[tuple[str, bytes, int, bool]] = []  # published while disconnected: sent on reconnect
        self._after_first_connect: list[Callable[[], None]] = []
        self._connected = False
        self._connected_once = False
        self._failure: TransportError | None = None
        self._lock = threading.Lock()

    # -- Transport --------------------------------------------------------------------------------
    @property
    def config(self) -> BrokerConfig:
        return self.broker.config

    @property
    def is_connected(self) -> bool:
        return self._connected

    @property
    def failure(self) -> TransportError | None:
        return self._failure

    def connect(self, timeout_s: float = 10.0) -> None:
        """Connect; the session's queued messages and the retained ones the filters match arrive now."""
        if self._failure is not None:
            raise self._failure
        if self._connected:
            return
        clean = self._clean_start and not self._connected_once
        queued = self.broker._attach(self, clean, self._persistent)
        self._connected = True
        self._connected_once = True
        self._deliver_on_connect(queued)
        while self._after_first_connect:
            self._after_first_connect.pop(0)()

    def close(self) -> None:
        """Leave cleanly: no last will."""
        if self._connected:
            self._connected = False
            self.broker._detach(self, will=None)

    def __enter__(self) -> MemoryTransport:
        self.connect()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def discard_session(self) -> None:
        if self._connected:
            raise TransportError(f"transport {self.client_id!r}: discard_session() while connected would "
                                 "take over its own session; call it before connect()")
        self.broker._discard(self.client_id)

    def subscribe(self, topic_filter: str, handler: Handler, qos: int = 1, timeout_s: float = 10.0) -> None:
        check_filter(topic_filter)
        self._refuse_in_handler("subscribe")
        with self._lock:
            self._subscriptions[topic_filter] = (handler, qos)
        if self._connected:
            for topic, payload in self.broker._subscribe(self, topic_filter, qos):
                self._deliver(topic, payload)

    def publish(self, topic: str, payload: bytes, *, qos: int = 1, retain: bool = False,
                timeout_s: float = 10.0) -> None:
        if self._failure is not None:
            raise self._failure
        self._refuse_in_handler("publish")
        check_topic(topic)
        if qos not in (0, 1, 2):
            raise TransportError(f"cannot publish to {topic!r}: QoS {qos} is not 0, 1 or 2")
        if not self._connected:
            self._held.append((topic, bytes(payload), qos, retain))
            raise PublishTimeout(f"no PUBACK from broker {self.config.url} for {topic!r} within {timeout_s} s "
                                 "(connected: False)")
        if self.publish_fault is not None:
            self.publish_fault(topic, bytes(payload), timeout_s)
        self.broker._route(MemoryMessage(topic, bytes(payload), qos, retain, self.client_id))

    def attach_outbox(self, outbox: Outbox, timeout_s: float = 10.0) -> None:
        flush = outbox_flush(self, outbox, timeout_s, _log)
        self.on_reconnect.append(flush)
        if self._connected:
            flush()
        else:
            self._after_first_connect.append(flush)

    # -- test controls ------------------------------------------------------------------------------------
    def sever(self) -> None:
        """End abruptly, as a process that died: the broker publishes the last will; no reconnect follows."""
        if self._connected:
            self._connected = False
            self.broker._detach(self, will=self._will)

    # -- driven by MemoryBroker ----------------------------------------------------------------------------
    def _filters(self) -> dict[str, int]:
        with self._lock:
            return {f: q for f, (_, q) in self._subscriptions.items()}

    def _deliver(self, topic: str, payload: bytes) -> None:
        """Run every handler whose filter matches ``topic``; a raising handler is logged, not propagated."""
        with self._lock:
            handlers = [h for f, (h, _) in self._subscriptions.items() if topic_matches(f, topic)]
        if not handlers:
            _log.warning("message on %r has no handler; dropped", topic)
        inside = _inside_handlers()
        inside.add(id(self))
        try:
            for handler in handlers:
                try:
                    handler(topic, payload)
                except Exception:  # as on paho's network thread: a failing handler must not stop delivery
                    _log.exception("handler for %r raised", topic)
        finally:
            inside.discard(id(self))

    def _deliver_on_connect(self, queued: list[tuple[str, bytes]]) -> None:
        for topic, payload in queued:
            self._deliver(topic, payload)
        for topic_filter, qos in self._filters().items():  # re-subscribing: the broker sends the retained again
            for topic, payload in self.broker._subscribe(self, topic_filter, qos):
                self._deliver(topic, payload)

    def _lost_connection(self) -> None:
        self._connected = False

    def _reconnect(self) -> None:
        if self._failure is None and not self._connected:
            self._deliver_on_connect(self.broker._attach(self, False, self._persistent))
            self._connected = True

    def _after_reconnect(self) -> None:
        if not self._connected:
            return
        held, self._held = self._held, []
        for topic, payload, qos, retain in held:
            self.broker._route(MemoryMessage(topic, payload, qos, retain, self.client_id))
        for hook in list(self.on_reconnect):
            try:
                hook()
            except Exception:
                _log.exception("reconnect hook %r raised", hook)

    def _taken_over(self) -> None:
        """Another connection took this client id: stop for good, as ``MqttTransport`` does on 0x8E."""
        self._connected = False
        self._failure = client_id_in_use(self.client_id, self.config.url, "a new connection under the id")
        run_failure_hooks(self.on_failure, self._failure, _log)

    def _refuse_in_handler(self, what: str) -> None:
        if id(self) in _inside_handlers():
            raise TransportError(f"blocking {what} called from a message handler would deadlock the "
                                 "transport's delivery; hand the work to a queue")


def _inside_handlers() -> set[int]:
    if not hasattr(_in_handler, "transports"):
        _in_handler.transports = set()
    return _in_handler.transports  # type: ignore[no-any-return]
