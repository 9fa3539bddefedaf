"""device --wait-for-broker: a device started before its broker waits for it, gives up with a clear error
after the given time, and a stop request ends the wait."""
from __future__ import annotations

import socket
import threading
import time

import pytest

from edgetrain.sdk.broker_config import BrokerConfig
from edgetrain.sdk.broker_wait import wait_for_broker
from edgetrain.sdk.errors import BrokerUnavailable


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_waits_until_the_broker_port_opens() -> None:
    port = _free_port()
    listener = socket.socket()
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)

    def open_later() -> None:
        time.sleep(1.0)
        listener.bind(("127.0.0.1", port))
        listener.listen()

    opener = threading.Thread(target=open_later)
    opener.start()
    started = time.monotonic()
    try:
        assert wait_for_broker(BrokerConfig(f"mqtt://127.0.0.1:{port}"), 20.0, threading.Event())
    finally:
        opener.join()
        listener.close()
    assert 0.9 <= time.monotonic() - started < 10


def test_gives_up_naming_the_broker_and_the_flag() -> None:
    port = _free_port()
    with pytest.raises(BrokerUnavailable, match=rf"127.0.0.1:{port} still unreachable after 1.5 s \(--wait-for-broker\)"):
        wait_for_broker(BrokerConfig(f"mqtt://127.0.0.1:{port}"), 1.5, threading.Event())


def test_a_stop_request_ends_the_wait() -> None:
    stop = threading.Event()
    threading.Timer(0.5, stop.set).start()
    started = time.monotonic()
    assert not wait_for_broker(BrokerConfig(f"mqtt://127.0.0.1:{_free_port()}"), 30.0, stop)
    assert time.monotonic() - started < 5
