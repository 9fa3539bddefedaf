"""``device --wait-for-broker``: a board often boots before its network or its broker is up; rather than
fail at once, the device waits (checking a TCP connection to the broker's port) for up to a given time."""
from __future__ import annotations

import logging
import socket
import threading
import time
from typing import Callable

from .broker_config import BrokerConfig
from .errors import BrokerUnavailable

_log = logging.getLogger(__name__)
RETRY_MAX_S = 5.0  # the longest pause between two tries
REPORT_EVERY_S = 10.0  # how often a wait logs that it still waits


def wait_for_broker(broker: BrokerConfig, timeout_s: float, stop: threading.Event,
                    clock: Callable[[], float] = time.monotonic) -> bool:
    """Block until the broker's port accepts a TCP connection: True; False when ``stop`` is set first.

    Raises BrokerUnavailable naming the broker once ``timeout_s`` passes. The MQTT connection (and TLS)
    comes after, from the transport: this only waits for the network and the broker to be up.
    """
    deadline = clock() + timeout_s
    pause, next_report = 0.5, clock()
    while True:
        left = deadline - clock()
        try:
            with socket.create_connection((broker.host, broker.port), timeout=max(0.1, min(5.0, left))):
                if pause > 0.5:
                    _log.info("broker %s:%d is up", broker.host, broker.port)
                return True
        except OSError as exc:
            reason = exc.strerror or type(exc).__name__
        if clock() >= deadline:
            raise BrokerUnavailable(f"broker {broker.host}:{broker.port} still unreachable after {timeout_s:g} s "
                                    f"(--wait-for-broker): {reason}")
        if clock() >= next_report:
            _log.info("waiting for broker %s:%d (%s); %.0f s left", broker.host, broker.port, reason,
                      deadline - clock())
            next_report = clock() + REPORT_EVERY_S
        if stop.wait(min(pause, max(0.0, deadline - clock()))):
            return False
        pause = min(RETRY_MAX_S, pause * 2)
