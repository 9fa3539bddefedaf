"""Publishing through a broker outage: wait for the broker, publish again, give up after a bound.

The transport's ``publish`` blocks until the broker's PUBACK; while the connection is down paho
keeps the message and sends it itself after the reconnect, so a publish that outlives a short
outage just succeeds. A long outage ends that wait with ``PublishTimeout``; ``publish_through_outage``
then waits for the connection to come back and publishes once more, until ``bound_s`` has passed.

No copy is queued while the connection is known to be down (each would go out after the reconnect):
the publish waits for the connection first. Only a publish that timed out leaves a copy behind in
paho (the transport no longer sees its PUBACK, so the next attempt is a new publish), and the broker
may get the message twice. That is harmless for what the aggregator publishes this way: retained
announcements, where the later copy of the same round replaces the earlier one.

Pure apart from the callables it is given: a test drives it with a fake clock and instant sleeps.
"""
from __future__ import annotations

import logging
import time
from collections.abc import Callable

from edgetrain.sdk.errors import BrokerUnavailable, PublishTimeout
from edgetrain.sdk.transport import Transport

_log = logging.getLogger(__name__)
ANNOUNCE_TIMEOUT_S = 30.0  # one attempt's wait for an announcement's PUBACK (a whole model can be large)
ACK_TIMEOUT_S = 10.0  # an ack's wait for its PUBACK on a live connection


def publish_through_outage(publish: Callable[[float], None], *, what: str, broker_url: str, bound_s: float,
                           attempt_timeout_s: float, is_connected: Callable[[], bool],
                           clock: Callable[[], float] = time.monotonic, sleep: Callable[[float], None] = time.sleep,
                           log: logging.Logger = _log, poll_s: float = 0.2, log_every_s: float = 10.0) -> int:
    """Call ``publish(timeout_s)`` until it returns; the number of calls made.

    ``publish`` raises ``PublishTimeout`` when no PUBACK came within ``timeout_s`` (``attempt_timeout_s``,
    doubled after each timeout on a live connection); it is called again once ``is_connected()`` holds,
    and builds its message afresh each time (so a deadline in it can start from the attempt that got
    through). Other ``TransportError``s (the broker refused the message, it is too big) propagate at
    once: waiting does not cure them. After ``bound_s`` seconds without a PUBACK: ``BrokerUnavailable``
    naming ``broker_url`` and the time waited. ``sleep`` may raise to abandon the wait (a stop request).
    """
    start = clock()
    attempts = 0
    attempt_s = attempt_timeout_s
    next_log = start
    delayed = False  # an outage got in the way: say when it is over
    while True:
        waited = clock() - start
        if waited >= bound_s:
            raise BrokerUnavailable(f"broker {broker_url} still unavailable after waiting {waited:.1f} s to publish "
                                    f"{what} (the bound is {bound_s:g} s); giving up")
        if not is_connected():
            delayed = True
            if clock() >= next_log:  # at once, then every log_every_s: the operator sees what it waits for
                log.warning("broker %s is down; %s waits for it (%.1f s so far, giving up after %g s)",
                            broker_url, what, waited, bound_s)
                next_log = clock() + log_every_s
            sleep(min(poll_s, bound_s - waited))
            continue
        attempts += 1
        try:
            publish(min(attempt_s, bound_s - waited))
        except PublishTimeout as exc:
            delayed = True
            log.warning("%s not acknowledged by broker %s (attempt %d, %.1f s so far): %s", what, broker_url,
                        attempts, clock() - start, exc)
            if is_connected():  # a slow link or a half-open connection: publish again at once, and wait
                attempt_s *= 2  # twice as long, so that a slow link gets a few copies, not one per timeout
            next_log = clock()  # disconnected: the loop waits for the reconnect and says so at once
            continue
        if delayed:
            log.info("%s published to broker %s after %.1f s (%d attempt(s))", what, broker_url, clock() - start,
                     attempts)
        return attempts


def publish_best_effort(publish: Callable[[float], None], *, what: str, timeout_s: float, connected: bool,
                        log: logging.Logger = _log) -> bool:
    """Call ``publish(timeout_s)`` once: True once acknowledged; on ``PublishTimeout`` a warning and False.

    Disconnected: no wait at all, as nothing acknowledges while the broker is down; paho still holds the
    message and sends it after the reconnect.
    """
    try:
        publish(timeout_s if connected else 0.0)
    except PublishTimeout as exc:
        log.warning("%s not acknowledged by the broker; carrying on: %s", what, exc)
        return False
    return True


class OutagePublisher:
    """The aggregator's publishes over ``transport``: announcements wait out a broker outage for up to
    ``bound_s`` (``sleep`` may raise to end the wait early), acks are best effort. The per-attempt
    timeouts are read from ``ANNOUNCE_TIMEOUT_S`` and ``ACK_TIMEOUT_S`` on each call."""

    def __init__(self, transport: Transport, bound_s: float, sleep: Callable[[float], None] = time.sleep,
                 log: logging.Logger = _log, clock: Callable[[], float] = time.monotonic) -> None:
        self.transport = transport
        self.bound_s = bound_s
        self.sleep = sleep
        self.log = log
        self.clock = clock

    def announce(self, topic: str, build: Callable[[], bytes], what: str) -> tuple[int, float]:
        """Publish ``build()`` retained until acknowledged: (its size, ``clock()`` when that attempt began).
        ``build`` runs on each attempt, so a deadline in the frame can run from the attempt that got through."""
        size, began = 0, 0.0

        def publish(timeout_s: float) -> None:
            nonlocal size, began
            began = self.clock()
            frame = build()
            size = len(frame)
            self.transport.publish(topic, frame, retain=True, timeout_s=timeout_s)

        publish_through_outage(publish, what=what, broker_url=self.transport.config.url, bound_s=self.bound_s,
                               attempt_timeout_s=ANNOUNCE_TIMEOUT_S, is_connected=lambda: self.transport.is_connected,
                               clock=self.clock, sleep=self.sleep, log=self.log)
        return size, began

    def ack(self, topic: str, frame: bytes, what: str) -> bool:
        """Publish ``frame`` once, best effort: True once acknowledged."""
        return publish_best_effort(lambda timeout_s: self.transport.publish(topic, frame, timeout_s=timeout_s),
                                   what=what, timeout_s=ACK_TIMEOUT_S, connected=self.transport.is_connected,
                                   log=self.log)
