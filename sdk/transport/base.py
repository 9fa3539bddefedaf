"""The transport seam: what ``Device``, ``Aggregator`` and ``OutagePublisher`` need of a message transport.

Two implementations satisfy ``Transport``: ``MqttTransport`` (paho, a real broker) and
``MemoryTransport`` over a ``MemoryBroker`` (in-process, for tests), as httpx's ``MockTransport`` is the
twin of its HTTP transport. The seam promises nothing about threads beyond this:

- a ``Handler`` runs in the transport's *delivery context* (paho's network thread for MQTT; the
  publisher's own thread for the memory twin; one event loop's thread for a future selector-driven
  implementation), so it must be quick, hand its work to a queue, and never call the blocking
  ``publish``/``subscribe``: a transport refuses that with ``TransportError`` rather than deadlock;
- ``on_reconnect`` hooks run where they may block (they re-publish), never inside a handler;
- ``on_failure`` hooks run once, when the transport gives up for good (``failure`` then says why), in the
  delivery context: they must be quick too (set an event).
"""
from __future__ import annotations

import logging
from typing import Callable, Protocol, runtime_checkable

from ..broker_config import BrokerConfig
from ..errors import ClientIdInUse, PublishTimeout, TransportError
from ..outbox import Outbox

Handler = Callable[[str, bytes], None]  # (topic, payload)
FailureHook = Callable[[TransportError], None]


@runtime_checkable
class Transport(Protocol):
    """A publish/subscribe connection under one client id, with at-least-once (QoS 1) delivery."""

    client_id: str
    on_reconnect: list[Callable[[], None]]  # run after every re-connection (not the first connection)
    on_failure: list[FailureHook]  # run once when the transport stops for good (see ``failure``)

    @property
    def config(self) -> BrokerConfig:
        """Where the broker is; its ``url`` names it in errors and logs."""

    @property
    def is_connected(self) -> bool:
        """Whether a publish now can be acknowledged without waiting for a reconnect."""

    @property
    def failure(self) -> TransportError | None:
        """Why the transport stopped for good (no reconnect follows), or None while it works."""

    def connect(self, timeout_s: float = 10.0) -> None:
        """Connect (subscriptions registered before are made now); ``BrokerUnavailable`` on failure."""

    def close(self) -> None:
        """Leave cleanly: the broker drops the last will."""

    def discard_session(self) -> None:
        """Drop what the broker keeps for this client id from an earlier connection (call before ``connect``)."""

    def subscribe(self, topic_filter: str, handler: Handler, qos: int = 1, timeout_s: float = 10.0) -> None:
        """Deliver messages matching ``topic_filter`` (``+``/``#`` wildcards) to ``handler``, on every connection."""

    def publish(self, topic: str, payload: bytes, *, qos: int = 1, retain: bool = False,
                timeout_s: float = 10.0) -> None:
        """Publish; block until the broker acknowledges (QoS 1), else ``PublishTimeout``; a refusal is a
        ``TransportError``."""

    def attach_outbox(self, outbox: Outbox, timeout_s: float = 10.0) -> None:
        """Re-publish ``outbox``'s entries once connected and after every reconnect."""


def client_id_in_use(client_id: str, broker_url: str, evidence: str) -> ClientIdInUse:
    """The error of a transport whose client id another connection took over (both transports say it alike)."""
    return ClientIdInUse(
        f"client id {client_id!r} is in use: another connection to broker {broker_url} took over its session "
        f"({evidence}). Two processes share one id; give each its own (edgetrain device --device-id). This one "
        "stops instead of taking the session back.")


def run_failure_hooks(hooks: list[FailureHook], failure: TransportError, log: logging.Logger) -> None:
    """Tell each hook; one that raises is logged and the others still run (this is the delivery context)."""
    log.error("%s", failure)
    for hook in list(hooks):
        try:
            hook(failure)
        except Exception:
            log.exception("failure hook %r raised", hook)


def outbox_flush(transport: Transport, outbox: Outbox, timeout_s: float, log: logging.Logger) -> Callable[[], None]:
    """The hook both transports run on (re)connect: re-publish the outbox's entries in order; a publish
    that times out stops the flush (the next reconnect retries), a refused entry is skipped."""
    def flush() -> None:
        for entry in outbox.pending():
            try:
                transport.publish(entry.topic, entry.payload, timeout_s=timeout_s)
            except PublishTimeout as exc:
                log.warning("outbox flush stopped, will retry on reconnect: %s", exc)
                return
            except TransportError as exc:  # this entry is refused; the others may pass
                log.warning("outbox entry %r not re-published: %s", entry.key, exc)
    return flush
