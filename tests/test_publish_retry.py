"""``aggregator.publish_retry`` on a fake clock: announcements wait out an outage without queueing
copies while the broker is down, give up after the bound naming the broker and the wait, and acks
are best effort. Instant: every sleep and timeout advances the fake clock only."""
from __future__ import annotations

import logging
from pathlib import Path

import pytest

from edgetrain.aggregator import publish_retry
from edgetrain.aggregator.publish_retry import (
    OutagePublisher,
    publish_best_effort,
    publish_through_outage,
)
from edgetrain.sdk.errors import BrokerUnavailable, ConfigError, PublishTimeout, TransportError
from edgetrain.sdk.transport import MemoryBroker, MemoryTransport

URL = "mqtt://broker.example:1883"
POLL_S = 0.2  # publish_through_outage's default poll: a reconnect is seen within one


class FakeBroker:
    """A fake clock and a broker that is down during ``[down_from, back_at)``. ``publish`` waits for
    the PUBACK like ``Transport.publish``: it comes ``latency_s`` after the publish if the connection
    stays up that long, else ``latency_s`` after the reconnect (paho re-sends its held copy then);
    later than ``timeout_s``: ``PublishTimeout``, the clock advanced by the timeout."""

    def __init__(self, down_from: float = float("inf"), back_at: float = float("inf"), latency_s: float = 0.5) -> None:
        self.now = 0.0
        self.down_from, self.back_at, self.latency_s = down_from, back_at, latency_s
        self.calls: list[tuple[float, float, bool]] = []  # (time, timeout, connected then)
        self.sleeps: list[float] = []

    def clock(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        assert seconds > 0
        self.sleeps.append(seconds)
        self.now += seconds

    def is_connected(self) -> bool:
        return not self.down_from <= self.now < self.back_at

    def publish(self, timeout_s: float) -> None:
        self.calls.append((self.now, timeout_s, self.is_connected()))
        up_throughout = self.is_connected() and not self.now < self.down_from < self.now + self.latency_s
        puback_at = (self.now if up_throughout else self.back_at) + self.latency_s
        if puback_at <= self.now + timeout_s:
            self.now = puback_at
            return
        self.now += timeout_s
        raise PublishTimeout(f"no PUBACK from broker {URL} within {timeout_s} s")


def _run(broker: FakeBroker, bound_s: float = 60.0, attempt_timeout_s: float = 5.0, **kwargs: object) -> int:
    return publish_through_outage(broker.publish, what="round 3 announcement", broker_url=URL, bound_s=bound_s,
                                  attempt_timeout_s=attempt_timeout_s, is_connected=broker.is_connected,
                                  clock=broker.clock, sleep=broker.sleep, **kwargs)  # type: ignore[arg-type]


def test_a_live_broker_gets_one_publish_and_no_wait() -> None:
    broker = FakeBroker()
    assert _run(broker) == 1
    assert broker.calls == [(0.0, 5.0, True)] and broker.sleeps == []


def test_a_broker_already_down_gets_nothing_until_it_is_back(caplog: pytest.LogCaptureFixture) -> None:
    broker = FakeBroker(down_from=0.0, back_at=42.0)
    with caplog.at_level(logging.INFO, logger="edgetrain.aggregator.publish_retry"):
        assert _run(broker, log_every_s=10.0) == 1
    # Nothing was handed to paho while the connection was down: no copy queued to go out twice.
    assert broker.calls == [(pytest.approx(42.0, abs=POLL_S), 5.0, True)]
    waits = [r for r in caplog.records if "is down" in r.getMessage()]
    assert len(waits) == 5  # at once, then every 10 s: 0, 10, 20, 30, 40
    assert all(r.levelno == logging.WARNING and URL in r.getMessage() for r in waits)
    assert "published to broker" in caplog.records[-1].getMessage()


def test_a_short_outage_within_the_wait_needs_no_second_publish() -> None:
    broker = FakeBroker(down_from=0.1, back_at=3.0)  # drops right after the publish, back before its timeout
    assert _run(broker) == 1
    assert broker.calls == [(0.0, 5.0, True)] and broker.now == pytest.approx(3.5)


def test_an_outage_mid_publish_is_waited_out_then_published_once_more() -> None:
    broker = FakeBroker(down_from=0.1, back_at=12.0)
    assert _run(broker) == 2
    # The first publish timed out; the second waited for the reconnect: none was made while down.
    assert broker.calls == [(0.0, 5.0, True), (pytest.approx(12.0, abs=POLL_S), 5.0, True)]


def test_a_timeout_on_a_live_connection_publishes_again_at_once() -> None:
    broker = FakeBroker(latency_s=6.0)  # a PUBACK later than the attempt's timeout
    calls: list[float] = []

    def publish(timeout_s: float) -> None:
        calls.append(broker.now)
        if len(calls) == 2:
            broker.latency_s = 0.5
        broker.publish(timeout_s)

    attempts = publish_through_outage(publish, what="x", broker_url=URL, bound_s=60.0, attempt_timeout_s=5.0,
                                      is_connected=broker.is_connected, clock=broker.clock, sleep=broker.sleep)
    assert attempts == 2 and broker.sleeps == [] and calls == [0.0, 5.0]


def test_a_slow_link_gets_ever_longer_waits_not_a_copy_per_timeout() -> None:
    broker = FakeBroker(latency_s=33.0)  # connected throughout, every PUBACK 33 s after its publish
    assert _run(broker, bound_s=100.0) == 4
    assert [(t, timeout) for t, timeout, _ in broker.calls] == [(0.0, 5.0), (5.0, 10.0), (15.0, 20.0), (35.0, 40.0)]


def test_a_broker_that_never_returns_raises_broker_unavailable_naming_it_and_the_wait() -> None:
    broker = FakeBroker(down_from=0.0)
    with pytest.raises(BrokerUnavailable) as info:
        _run(broker, bound_s=30.0)
    message = str(info.value)
    assert URL in message and "30.0 s" in message and "round 3 announcement" in message
    assert broker.now == pytest.approx(30.0)  # gave up at the bound, not a poll later
    assert broker.calls == []


def test_the_last_attempt_is_cut_to_what_is_left_of_the_bound() -> None:
    broker = FakeBroker(latency_s=float("inf"))  # a half-open connection: looks up, never acknowledges
    with pytest.raises(BrokerUnavailable, match="20.0 s"):
        _run(broker, bound_s=20.0)
    assert [timeout for _, timeout, _ in broker.calls] == [5.0, 10.0, pytest.approx(5.0)]


def test_a_refused_publish_is_not_retried() -> None:
    broker = FakeBroker()
    calls = []

    def publish(timeout_s: float) -> None:
        calls.append(timeout_s)
        raise TransportError(f"broker {URL} refused the publish: not authorized")

    with pytest.raises(TransportError, match="not authorized"):
        publish_through_outage(publish, what="x", broker_url=URL, bound_s=60.0, attempt_timeout_s=5.0,
                               is_connected=broker.is_connected, clock=broker.clock, sleep=broker.sleep)
    assert len(calls) == 1


def test_a_stop_request_ends_the_wait() -> None:
    broker = FakeBroker(down_from=0.0)

    class Stopped(Exception):
        pass

    def sleep(seconds: float) -> None:
        raise Stopped

    with pytest.raises(Stopped):
        publish_through_outage(broker.publish, what="x", broker_url=URL, bound_s=60.0, attempt_timeout_s=5.0,
                               is_connected=broker.is_connected, clock=broker.clock, sleep=sleep)


def test_best_effort_warns_and_does_not_wait_while_disconnected(caplog: pytest.LogCaptureFixture) -> None:
    timeouts: list[float] = []

    def publish(timeout_s: float) -> None:
        timeouts.append(timeout_s)
        raise PublishTimeout("no PUBACK")

    with caplog.at_level(logging.WARNING, logger="edgetrain.aggregator.publish_retry"):
        assert not publish_best_effort(publish, what="ack of dev-1's u1", timeout_s=10.0, connected=False)
        assert not publish_best_effort(publish, what="ack of dev-1's u2", timeout_s=10.0, connected=True)
    assert timeouts == [0.0, 10.0]
    assert [r.getMessage().split(" not acknowledged")[0] for r in caplog.records] == ["ack of dev-1's u1",
                                                                                      "ack of dev-1's u2"]
    assert publish_best_effort(lambda timeout_s: None, what="ack", timeout_s=10.0, connected=True)


def test_outage_publisher_rebuilds_the_frame_per_attempt_and_reads_the_timeouts(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(publish_retry, "ANNOUNCE_TIMEOUT_S", 3.0)
    monkeypatch.setattr(publish_retry, "ACK_TIMEOUT_S", 1.0)
    clock = FakeBroker(down_from=1.0, back_at=20.0)  # the fake clock and when the PUBACKs come
    memory = MemoryBroker(URL)  # the in-memory transport, taken down and brought back on the fake clock
    transport = MemoryTransport(memory, "aggregator")
    transport.publish_fault = lambda topic, payload, timeout_s: clock.publish(timeout_s)  # each PUBACK's wait
    received: list[tuple[str, bytes]] = []
    watcher = MemoryTransport(memory, "watcher")
    watcher.subscribe("f/#", lambda topic, payload: received.append((topic, payload)))
    for client in (transport, watcher):
        client.connect()

    def sleep(seconds: float) -> None:
        clock.sleep(seconds)
        if clock.is_connected() and not memory.is_up:
            memory.come_back()

    publisher = OutagePublisher(transport, bound_s=60.0, sleep=sleep, clock=clock.clock)
    built: list[float] = []

    def build() -> bytes:
        built.append(clock.now)
        return f"deadline {clock.now + 10:.0f}".encode()

    assert publisher.announce("f/announce", build, "round 1 announcement") == (len(b"deadline 10"), 0.0)
    clock.now = 1.0
    memory.go_down()
    assert not publisher.ack("f/ack/dev-0", b"ack", "ack of dev-0's u1")  # no wait while down...
    assert clock.now == 1.0
    size, began = publisher.announce("f/announce", build, "round 2 announcement")
    # Round 2's frame was built once the broker was back, and that attempt's start is what counts.
    assert built == [0.0, pytest.approx(20.0, abs=POLL_S)] and began == built[1] and size == len(b"deadline 30")
    # Announcements waited for their PUBACK with ANNOUNCE_TIMEOUT_S; the ack, held while the broker was
    # down, went out after the reconnect (as paho sends its held copy), before round 2's announcement; the
    # watcher's re-subscription on reconnect got the retained round 1 again, as from Mosquitto.
    assert [timeout for _, timeout, _ in clock.calls] == [3.0, 3.0]
    assert received == [("f/announce", b"deadline 10"), ("f/announce", b"deadline 10"), ("f/ack/dev-0", b"ack"),
                        ("f/announce", b"deadline 30")]
    assert memory.retained("f/announce") == b"deadline 30"


def test_the_bound_is_configured_and_checked(tmp_path: Path) -> None:
    from edgetrain.aggregator.cli import aggregator_config
    from edgetrain.aggregator.config import AggregatorConfig
    from tests.fleet import round_args

    assert AggregatorConfig(fleet="f", out_dir=tmp_path, rounds=1).broker_outage_s == 300.0
    config = aggregator_config(round_args("--broker-outage", "42.5"), tmp_path, "f", resume=False)
    assert config.broker_outage_s == 42.5
    for bad in (0.0, -1.0, float("nan")):
        with pytest.raises(ConfigError, match="broker_outage_s"):
            AggregatorConfig(fleet="f", out_dir=tmp_path, rounds=1, broker_outage_s=bad)
    with pytest.raises(SystemExit):  # argparse refuses it before any config is made
        round_args("--broker-outage", "0")
