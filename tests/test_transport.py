"""The transport seam: the MQTT transport against real private Mosquitto brokers, its in-memory twin
against the same contract, topic matching, duplicate client ids, the on-disk outbox, URL parsing."""
from __future__ import annotations

import ast
import logging
import os
import queue
import select
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Callable, Iterator

import pytest

from edgetrain.sdk import topics
import paho.mqtt.client as paho
from edgetrain.sdk.errors import BrokerUnavailable, ClientIdInUse, ConfigError, PublishTimeout, TransportError
from edgetrain.sdk.outbox import Outbox, OutboxEntry
from edgetrain.sdk.transport import (
    BrokerConfig,
    MemoryBroker,
    MemoryTransport,
    MqttTransport,
    Transport,
    check_filter,
    topic_matches,
)
from tests.fleet import FleetAssets, Sniffer, fleet_assets, spawn_device, wait_for  # noqa: F401
from tests.mosquitto import MosquittoBroker, TlsMaterial, free_port

REPO_ROOT = Path(__file__).resolve().parents[1]
FLEET = "f1"
WAIT_S = 10.0  # upper bound for anything event-driven; passing runs take milliseconds


class Inbox:
    """A handler that queues (topic, payload) for the test thread."""

    def __init__(self) -> None:
        self.messages: queue.Queue[tuple[str, bytes]] = queue.Queue()

    def __call__(self, topic: str, payload: bytes) -> None:
        self.messages.put((topic, payload))

    def get(self) -> tuple[str, bytes]:
        return self.messages.get(timeout=WAIT_S)

    def payloads_until(self, expected: set[bytes]) -> set[bytes]:
        seen: set[bytes] = set()
        while not expected <= seen:
            seen.add(self.get()[1])
        return seen


@pytest.fixture
def transports() -> Iterator[Callable[..., Transport]]:
    """``transports(config, client_id, **kw)`` makes a Transport closed after the test."""
    made: list[Transport] = []

    def make(config: BrokerConfig, client_id: str, **kwargs: object) -> Transport:
        kwargs.setdefault("reconnect_min_s", 0.1)
        kwargs.setdefault("reconnect_max_s", 1.0)
        transport = MqttTransport(config, client_id, **kwargs)  # type: ignore[arg-type]
        made.append(transport)
        return transport

    yield make
    for transport in made:
        transport.close()


def reconnected_event(transport: Transport) -> threading.Event:
    event = threading.Event()
    transport.on_reconnect.append(event.set)
    return event


# -- URLs ----------------------------------------------------------------------------------
@pytest.mark.parametrize("url, host, port, tls, user, password", [
    ("mqtt://localhost", "localhost", 1883, False, None, None),
    ("mqtts://broker.example:9999", "broker.example", 9999, True, None, None),
    ("mqtts://edge", "edge", 8883, True, None, None),
    ("mqtt://dev-1:p%40ss@10.0.0.2:1884/", "10.0.0.2", 1884, False, "dev-1", "p@ss"),
    ("mqtts://[::1]", "::1", 8883, True, None, None),
])
def test_parse_accepts(url: str, host: str, port: int, tls: bool, user: str | None,
                       password: str | None) -> None:
    config = BrokerConfig.parse(url)
    assert (config.host, config.port, config.use_tls) == (host, port, tls)
    assert (config.username, config.password) == (user, password)
    assert "@" not in config.url and (password is None or password not in repr(config))


@pytest.mark.parametrize("url", ["", "localhost:1883", "http://h", "tcp://h:1883", "mqtt://",
                                 "mqtt://h:99999", "mqtt://h:port", "mqtt://h/topic",
                                 "mqtt://h?x=1"])
def test_parse_refuses(url: str) -> None:
    with pytest.raises(ConfigError, match="broker URL"):
        BrokerConfig.parse(url)


def test_config_refuses_inconsistent_fields(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="credentials"):
        BrokerConfig("mqtt://u:p@h")
    with pytest.raises(ConfigError, match="both"):
        BrokerConfig.parse("mqtt://u:p@h", username="v")
    with pytest.raises(ConfigError, match="mqtts"):
        BrokerConfig("mqtt://h", ca_file="ca.crt")
    with pytest.raises(ConfigError, match="keepalive"):
        BrokerConfig("mqtt://h", keepalive_s=0)
    with pytest.raises(ConfigError, match="client_id"):
        MqttTransport(BrokerConfig("mqtt://h"), "")
    with pytest.raises(ConfigError, match="mqtts://h:8883"):
        MqttTransport(BrokerConfig.parse("mqtts://h", ca_file=tmp_path / "missing.crt"), "dev-1")
    with pytest.raises(ConfigError, match="dev-1"):
        MqttTransport(BrokerConfig("mqtt://h"), "dev-1", will=("status/#", b"offline", True))


# -- outbox --------------------------------------------------------------------------------
def test_outbox_survives_restart_and_a_corrupt_entry(tmp_path: Path,
                                                     caplog: pytest.LogCaptureFixture) -> None:
    outbox = Outbox(tmp_path / "outbox")
    outbox.put("round-1", "t/1", b"old")
    outbox.put("round-2", "t/2", bytes(range(256)))
    outbox.put("round-3", "t/3", b"")
    outbox.put("round-1", "t/1", b"new")  # a replacement counts as the newest entry
    outbox.remove("round-2")
    outbox.remove("never-put")
    (tmp_path / "outbox" / ".000000000009-abc.rec.tmp").write_bytes(b"half a write")

    reopened = Outbox(tmp_path / "outbox")
    assert reopened.pending() == [OutboxEntry("round-3", "t/3", b""), ("round-1", "t/1", b"new")]
    assert not list((tmp_path / "outbox").glob(".*.tmp"))

    reopened.put("round-4", "t/4", b"four")
    victim = sorted((tmp_path / "outbox").glob("*.rec"))[0]  # round-3's file, the oldest
    victim.write_bytes(victim.read_bytes()[:-3])  # a torn write
    (tmp_path / "outbox" / "000000000000-deadbeef.rec").write_bytes(b"ETOUTBOX\x01\xff\xff")
    with caplog.at_level(logging.WARNING, logger="edgetrain.sdk.transport"):
        assert [e.key for e in Outbox(tmp_path / "outbox").pending()] == ["round-1", "round-4"]
    assert "corrupt" in caplog.text
    assert len(list((tmp_path / "outbox" / "corrupt").iterdir())) == 2


# -- broker round trips --------------------------------------------------------------------
def test_publish_subscribe_round_trip(broker: MosquittoBroker, transports: Callable[..., Transport]) -> None:
    config = BrokerConfig.parse(broker.url)
    inbox = Inbox()
    aggregator = transports(config, "aggregator")
    aggregator.subscribe(topics.update_filter(FLEET), inbox)
    aggregator.connect()
    with MqttTransport(config, "dev-1") as device:
        payload = os.urandom(100_000)
        device.publish(topics.update_topic(FLEET, "dev-1"), payload)
    assert inbox.get() == (topics.update_topic(FLEET, "dev-1"), payload)


def test_unreachable_broker_names_the_url() -> None:
    url = f"mqtt://127.0.0.1:{free_port()}"
    with pytest.raises(BrokerUnavailable, match=url):
        MqttTransport(BrokerConfig.parse(url), "dev-1").connect(timeout_s=2)


def test_offline_device_gets_queued_messages_after_broker_restart(
        broker: MosquittoBroker, transports: Callable[..., Transport]) -> None:
    config = BrokerConfig.parse(broker.url)
    ack = topics.ack_topic(FLEET, "dev-1")
    first_run = transports(config, "dev-1")
    first_run.subscribe(ack, Inbox())
    first_run.connect()
    first_run.close()  # the device goes away; its session stays on the broker
    with MqttTransport(config, "aggregator") as aggregator:
        aggregator.publish(ack, b"ack round 1")
        aggregator.publish(ack, b"ack round 2")
    broker.stop()  # SIGTERM writes the persistence file
    broker.start()

    inbox = Inbox()
    second_run = transports(config, "dev-1")  # a new process, same client id
    second_run.subscribe(ack, inbox)
    second_run.connect()
    assert [inbox.get(), inbox.get()] == [(ack, b"ack round 1"), (ack, b"ack round 2")]


def test_retained_announce_reaches_a_late_subscriber(
        broker: MosquittoBroker, transports: Callable[..., Transport]) -> None:
    config = BrokerConfig.parse(broker.url)
    with MqttTransport(config, "aggregator") as aggregator:
        aggregator.publish(topics.announce_topic(FLEET), b"round 7", retain=True)
    inbox = Inbox()
    transports(config, "dev-9").connect()
    late = transports(config, "dev-late")
    late.connect()
    late.subscribe(topics.announce_topic(FLEET), inbox)
    assert inbox.get() == (topics.announce_topic(FLEET), b"round 7")


WILL_SCRIPT = """
import sys
from edgetrain.sdk.transport import BrokerConfig, MqttTransport
url, topic = sys.argv[1:3]
device = MqttTransport(BrokerConfig.parse(url), "doomed", will=(topic, b"offline", True))
device.connect()
device.publish(topic, b"online", retain=True)
print("ready", flush=True)
sys.stdin.read()
"""


def test_last_will_on_abrupt_death_but_not_on_close(
        broker: MosquittoBroker, transports: Callable[..., Transport]) -> None:
    config = BrokerConfig.parse(broker.url)
    status = topics.status_topic(FLEET, "doomed")
    inbox = Inbox()
    watcher = transports(config, "watcher")
    watcher.subscribe(status, inbox)
    watcher.connect()

    with MqttTransport(config, "polite", will=(status, b"offline", True)):
        pass  # a clean DISCONNECT: the broker must drop the will
    watcher.publish(status, b"sentinel")
    assert inbox.get() == (status, b"sentinel")

    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    with subprocess.Popen([sys.executable, "-c", WILL_SCRIPT, broker.url, status], env=env,
                          stdin=subprocess.PIPE, stdout=subprocess.PIPE) as process:
        try:
            assert process.stdout is not None
            ready, _, _ = select.select([process.stdout], [], [], 30)
            assert ready and process.stdout.readline() == b"ready\n"
            assert inbox.get() == (status, b"online")
            process.kill()  # SIGKILL: no DISCONNECT, the broker sees the socket close
            assert inbox.get() == (status, b"offline")
        finally:
            process.kill()


def test_broker_restart_loses_nothing(broker: MosquittoBroker, transports: Callable[..., Transport],
                                      tmp_path: Path) -> None:
    config = BrokerConfig.parse(broker.url)
    topic = topics.update_topic(FLEET, "dev-1")
    inbox = Inbox()
    aggregator = transports(config, "aggregator")
    aggregator.subscribe(topics.update_filter(FLEET), inbox)
    aggregator.connect()
    device = transports(config, "dev-1")
    device.connect()
    outbox = Outbox(tmp_path / "outbox")
    device.attach_outbox(outbox)
    device_back = reconnected_event(device)
    device.publish(topic, b"before")

    broker.stop()
    outbox.put("round-2", topic, b"from the outbox")
    with pytest.raises(PublishTimeout):
        device.publish(topic, b"during the outage", timeout_s=0.2)
    broker.start()

    assert device_back.wait(WAIT_S)
    device.publish(topic, b"after")
    assert inbox.payloads_until({b"before", b"from the outbox", b"during the outage", b"after"})
    assert outbox.pending() == [("round-2", topic, b"from the outbox")]  # until the ack


def test_outbox_left_by_a_previous_run_goes_out_on_connect(
        broker: MosquittoBroker, transports: Callable[..., Transport], tmp_path: Path) -> None:
    config = BrokerConfig.parse(broker.url)
    topic = topics.update_topic(FLEET, "dev-1")
    Outbox(tmp_path / "outbox").put("round-5", topic, b"written before a crash")
    inbox = Inbox()
    aggregator = transports(config, "aggregator")
    aggregator.subscribe(topics.update_filter(FLEET), inbox)
    aggregator.connect()
    device = transports(config, "dev-1")
    device.attach_outbox(Outbox(tmp_path / "outbox"))  # before connect: flushed once connected
    device.connect()
    assert inbox.get() == (topic, b"written before a crash")


def test_subscriptions_are_remade_when_the_broker_forgot_them(
        broker_factory: Callable[..., MosquittoBroker], transports: Callable[..., Transport]) -> None:
    broker = broker_factory(persistence=False)  # a restart loses every session
    config = BrokerConfig.parse(broker.url)
    inbox = Inbox()
    aggregator = transports(config, "aggregator")
    aggregator.subscribe(topics.announce_topic(FLEET), inbox)
    aggregator.connect()
    aggregator_back = reconnected_event(aggregator)
    broker.stop()
    broker.start()
    assert aggregator_back.wait(WAIT_S)
    with MqttTransport(config, "publisher") as publisher:
        # retained: arrives whether the re-subscription lands before or after it
        publisher.publish(topics.announce_topic(FLEET), b"round 2", retain=True)
    assert inbox.get() == (topics.announce_topic(FLEET), b"round 2")


# -- security and limits -------------------------------------------------------------------
def test_tls_with_client_certificate_and_password(
        broker_factory: Callable[..., MosquittoBroker], tls_material: TlsMaterial,
        transports: Callable[..., Transport]) -> None:
    broker = broker_factory(tls=True, tls_material=tls_material, passwords={"device-1": "s3cret"})
    cert, key = tls_material.client_certs["device-1"]
    good = BrokerConfig.parse(broker.url, username="device-1", password="s3cret",
                              ca_file=tls_material.ca_cert, cert_file=cert, key_file=key)
    inbox = Inbox()
    device = transports(good, "device-1")
    device.subscribe("edgetrain/#", inbox)
    device.connect()
    device.publish(topics.metrics_topic(FLEET, "device-1"), b"over TLS")
    assert inbox.get() == (topics.metrics_topic(FLEET, "device-1"), b"over TLS")

    bad_configs = {
        "Not authorized": BrokerConfig.parse(broker.url, username="device-1", password="wrong",
                                             ca_file=tls_material.ca_cert, cert_file=cert, key_file=key),
        "before its CONNACK": BrokerConfig.parse(broker.url, username="device-1", password="s3cret",
                                                 ca_file=tls_material.ca_cert),  # no client cert
        "TLS handshake": BrokerConfig.parse(broker.url, username="device-1", password="s3cret"),
    }
    for why, config in bad_configs.items():
        with pytest.raises(BrokerUnavailable, match=why) as caught:
            transports(config, "intruder").connect(timeout_s=WAIT_S)
        assert broker.url in str(caught.value)


def test_acl_stops_a_device_speaking_for_another(
        broker_factory: Callable[..., MosquittoBroker], transports: Callable[..., Transport]) -> None:
    passwords = {"aggregator": "a", "dev-1": "p1", "dev-2": "p2"}
    broker = broker_factory(passwords=passwords, acl=topics.mosquitto_acl("aggregator"))
    inbox = Inbox()
    aggregator = transports(BrokerConfig.parse(broker.url, username="aggregator", password="a"), "agg")
    aggregator.subscribe(topics.update_filter(FLEET), inbox)
    aggregator.connect()
    device = transports(BrokerConfig.parse(broker.url, username="dev-1", password="p1"), "dev-1")
    device.connect()

    with pytest.raises(TransportError, match="refused the publish"):
        device.publish(topics.update_topic(FLEET, "dev-2"), b"forged")
    device.publish(topics.update_topic(FLEET, "dev-1"), b"genuine")
    # same publisher, same broker: had the forgery gone through, it would have come first
    assert inbox.get() == (topics.update_topic(FLEET, "dev-1"), b"genuine")
    assert inbox.messages.empty()


def test_payload_over_the_broker_limit_is_a_clear_error(
        broker_factory: Callable[..., MosquittoBroker], transports: Callable[..., Transport]) -> None:
    broker = broker_factory(extra_config="max_packet_size 2000")
    device = transports(BrokerConfig.parse(broker.url), "dev-1")
    device.connect()
    with pytest.raises(TransportError, match="maximum packet size"):
        device.publish(topics.update_topic(FLEET, "dev-1"), bytes(4000))
    device.publish(topics.update_topic(FLEET, "dev-1"), bytes(1900))  # still connected, fits


def test_blocking_publish_from_a_handler_is_refused(
        broker: MosquittoBroker, transports: Callable[..., Transport]) -> None:
    transport = transports(BrokerConfig.parse(broker.url), "dev-1")
    errors: queue.Queue[Exception] = queue.Queue()

    def handler(topic: str, payload: bytes) -> None:
        try:
            transport.publish("elsewhere", payload, timeout_s=1)
        except TransportError as exc:
            errors.put(exc)

    transport.subscribe("loop", handler)
    transport.connect()
    transport.publish("loop", b"x")
    assert "deadlock" in str(errors.get(timeout=WAIT_S))


# -- topic matching: one implementation, paho's rules ---------------------------------------
MATCH_CASES = [
    ("edgetrain/f1/update/+", "edgetrain/f1/update/dev-1"), ("edgetrain/f1/update/+", "edgetrain/f1/update"),
    ("edgetrain/f1/update/+", "edgetrain/f1/update/dev-1/x"), ("edgetrain/#", "edgetrain"),
    ("edgetrain/#", "edgetrain/f1/status/d"), ("#", "a/b"), ("#", "$SYS/broker/load"), ("+/b", "$x/b"),
    ("$SYS/#", "$SYS/broker"), ("a/+/c", "a//c"), ("a/+", "a/"), ("+", "a"), ("+", "/a"), ("/+", "/a"),
    ("a/b", "a/b"), ("a/b", "a/bb"), ("a/#", "b/a"), ("+/+", "a/b/c"),
    ("$share/workers/edgetrain/+/update/+", "edgetrain/f1/update/dev-2"),
]


@pytest.mark.parametrize("topic_filter, topic", MATCH_CASES)
def test_topic_matching_agrees_with_paho(topic_filter: str, topic: str) -> None:
    inner = topic_filter.split("/", 2)[2] if topic_filter.startswith("$share/") else topic_filter
    assert topic_matches(topic_filter, topic) == paho.topic_matches_sub(inner, topic)


@pytest.mark.parametrize("bad", ["", "a/#/b", "a/b#", "a+/b", "$share/g", "$share//a", "a\x00b"])
def test_invalid_filters_are_refused_by_both_transports(bad: str) -> None:
    with pytest.raises(TransportError):
        check_filter(bad)
    with pytest.raises(TransportError):
        MemoryTransport(MemoryBroker(), "dev-1").subscribe(bad, Inbox())
    with pytest.raises(TransportError):
        MqttTransport(BrokerConfig("mqtt://h"), "dev-1").subscribe(bad, Inbox())


def _imports_paho(path: Path) -> bool:
    for node in ast.walk(ast.parse(path.read_text())):
        names = ([a.name for a in node.names] if isinstance(node, ast.Import) else
                 [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
        if any(name == "paho" or name.startswith("paho.") for name in names):
            return True
    return False


def test_only_the_mqtt_module_imports_paho() -> None:
    importers = sorted(str(path.relative_to(REPO_ROOT)) for folder in ("sdk", "aggregator", "export", "device_bench",
                                                                       "edgetrain")
                       for path in (REPO_ROOT / folder).rglob("*.py") if _imports_paho(path))
    assert importers == ["sdk/transport/mqtt.py"]


# -- one contract, two transports -----------------------------------------------------------
class Contract:
    """Makes transports of one kind and ends one abruptly, so one scenario runs against both kinds."""

    def __init__(self, make: Callable[..., Transport], die: Callable[[str, str, bytes], None]) -> None:
        self.make = make
        self.die = die  # die(client_id, will_topic, will_payload): a client that connects, then dies


@pytest.fixture(params=["memory", "mqtt"])
def contract(request: pytest.FixtureRequest, transports: Callable[..., Transport]) -> Iterator[Contract]:
    if request.param == "memory":
        memory = MemoryBroker()

        def die_in_memory(client_id: str, topic: str, payload: bytes) -> None:
            doomed = MemoryTransport(memory, client_id, will=(topic, payload, True))
            doomed.connect()
            doomed.sever()

        yield Contract(lambda client_id, **kw: MemoryTransport(memory, client_id, **kw), die_in_memory)
        return
    broker: MosquittoBroker = request.getfixturevalue("broker")
    config = BrokerConfig.parse(broker.url)

    def die_over_mqtt(client_id: str, topic: str, payload: bytes) -> None:
        script = ("import sys\nfrom edgetrain.sdk.transport import BrokerConfig, MqttTransport\n"
                  "t = MqttTransport(BrokerConfig.parse(sys.argv[1]), sys.argv[2], "
                  "will=(sys.argv[3], sys.argv[4].encode(), True))\nt.connect()\nprint('ready', flush=True)\n"
                  "sys.stdin.read()\n")
        env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
        with subprocess.Popen([sys.executable, "-c", script, broker.url, client_id, topic, payload.decode()],
                              env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE) as process:
            try:
                assert process.stdout is not None
                ready, _, _ = select.select([process.stdout], [], [], 30)
                assert ready and process.stdout.readline() == b"ready\n"
            finally:
                process.kill()  # SIGKILL: no DISCONNECT, the broker sees the socket close

    yield Contract(lambda client_id, **kw: transports(config, client_id, **kw), die_over_mqtt)


def test_both_transports_keep_the_same_contract(contract: Contract) -> None:
    """Wildcard subscription, retained delivery to a late subscriber, last will, QoS 1 publish confirmed."""
    aggregator_inbox = Inbox()
    aggregator = contract.make("aggregator")
    assert isinstance(aggregator, Transport)
    aggregator.subscribe(topics.update_filter(FLEET), aggregator_inbox)
    aggregator.subscribe(topics.status_filter(FLEET), aggregator_inbox)
    aggregator.connect()
    assert aggregator.is_connected and aggregator.failure is None

    device = contract.make("dev-1")
    device.connect()
    device.publish(topics.update_topic(FLEET, "dev-1"), b"update 1")  # returns once the broker acknowledged
    device.publish(topics.metrics_topic(FLEET, "dev-1"), b"not subscribed")
    aggregator.publish(topics.announce_topic(FLEET), b"round 1", retain=True)
    assert aggregator_inbox.get() == (topics.update_topic(FLEET, "dev-1"), b"update 1")

    late_inbox = Inbox()
    late = contract.make("dev-late")
    late.connect()
    late.subscribe("edgetrain/+/announce", late_inbox)  # after the announcement: the retained copy arrives
    assert late_inbox.get() == (topics.announce_topic(FLEET), b"round 1")

    contract.die("doomed", topics.status_topic(FLEET, "doomed"), b"offline")
    assert aggregator_inbox.get() == (topics.status_topic(FLEET, "doomed"), b"offline")
    with pytest.raises(queue.Empty):  # the metrics message matched no filter of the aggregator's
        aggregator_inbox.messages.get(timeout=0.3)


def test_memory_twin_sessions_outages_and_faults(caplog: pytest.LogCaptureFixture) -> None:
    memory = MemoryBroker()
    ack = topics.ack_topic(FLEET, "dev-1")
    device_inbox = Inbox()
    device = MemoryTransport(memory, "dev-1", will=(topics.status_topic(FLEET, "dev-1"), b"offline", True))
    device.subscribe(ack, device_inbox)
    device.connect()
    device.close()  # a clean close: no will, the session stays
    aggregator = MemoryTransport(memory, "aggregator")
    aggregator.connect()
    aggregator.publish(ack, b"ack while away")
    assert memory.retained(topics.status_topic(FLEET, "dev-1")) is None
    device.connect()
    assert device_inbox.get() == (ack, b"ack while away")

    reconnected = reconnected_event(device)
    memory.go_down()
    assert not device.is_connected
    with pytest.raises(PublishTimeout):
        device.publish(topics.update_topic(FLEET, "dev-1"), b"during the outage")  # held, as paho holds it
    seen = Inbox()
    aggregator.subscribe(topics.update_filter(FLEET), seen)
    memory.come_back()
    assert reconnected.is_set() and seen.get() == (topics.update_topic(FLEET, "dev-1"), b"during the outage")

    def refuse(topic: str, payload: bytes, timeout_s: float) -> None:
        raise TransportError(f"refused the publish to {topic!r}: not authorized")

    device.publish_fault = refuse
    with pytest.raises(TransportError, match="not authorized"):
        device.publish(topics.update_topic(FLEET, "dev-1"), b"forged")
    assert [m.payload for m in memory.messages if m.payload == b"forged"] == []

    errors: queue.Queue[Exception] = queue.Queue()

    def publishing_handler(topic: str, payload: bytes) -> None:
        try:
            aggregator.publish("elsewhere", payload)
        except TransportError as exc:
            errors.put(exc)

    aggregator.subscribe("loop", publishing_handler)
    device.publish_fault = None
    device.publish("loop", b"x")
    assert "deadlock" in str(errors.get(timeout=WAIT_S))


# -- duplicate client ids -------------------------------------------------------------------
def test_memory_twin_refuses_a_second_connection_under_one_id() -> None:
    memory = MemoryBroker()
    first, second = MemoryTransport(memory, "dev-1"), MemoryTransport(memory, "dev-1")
    failures: list[TransportError] = []
    first.on_failure.append(failures.append)
    first.connect()
    second.connect()
    assert isinstance(first.failure, ClientIdInUse) and failures == [first.failure] and "'dev-1'" in str(failures[0])
    with pytest.raises(ClientIdInUse):
        first.publish("t", b"x")
    with pytest.raises(ClientIdInUse):
        first.connect()
    inbox = Inbox()
    second.subscribe("t", inbox)
    second.publish("t", b"still works")
    assert inbox.get() == ("t", b"still works") and second.failure is None


def test_a_second_client_with_the_same_id_stops_the_first(
        broker: MosquittoBroker, transports: Callable[..., Transport]) -> None:
    config = BrokerConfig.parse(broker.url)
    first = transports(config, "dev-1")
    stopped = threading.Event()
    first.on_failure.append(lambda failure: stopped.set())
    first.connect()
    second = transports(config, "dev-1")
    second.connect()  # before the fix the two took the session from each other, forever
    assert stopped.wait(WAIT_S), "the older client never noticed the takeover"
    assert isinstance(first.failure, ClientIdInUse) and "'dev-1'" in str(first.failure)
    with pytest.raises(ClientIdInUse):
        first.publish("t", b"x")
    inbox = Inbox()
    second.subscribe("t", inbox)
    wait_for(lambda: second.is_connected, "the newer client to be connected")
    time.sleep(2 * 1.0)  # two reconnect delays: a first client still fighting would have kicked it by now
    second.publish("t", b"still works", timeout_s=2)
    assert inbox.get() == ("t", b"still works") and second.is_connected and second.failure is None


def test_a_broker_restart_is_not_a_takeover(broker: MosquittoBroker, transports: Callable[..., Transport]) -> None:
    transport = transports(BrokerConfig.parse(broker.url), "dev-1")
    transport.connect()
    for _ in range(3):  # three restarts in a row, each connection ended by the broker
        back = reconnected_event(transport)
        broker.stop()
        time.sleep(0.5)  # a restart takes a moment: a reconnect attempt finds no broker
        broker.start()
        assert back.wait(WAIT_S)
    assert transport.failure is None
    transport.publish("t", b"x")


def test_two_device_processes_with_one_id_one_exits_naming_it(
        broker: MosquittoBroker, fleet_assets: FleetAssets, tmp_path: Path) -> None:  # noqa: F811
    config = BrokerConfig.parse(broker.url)
    sniffer = Sniffer(config).subscribe(topics.status_filter(FLEET)).connect()
    devices = [spawn_device(broker.url, fleet_assets, FLEET, "dup-0", tmp_path / name, index=0, count=2, limit=50)
               for name in ("a", "b")]
    try:
        def one_exited() -> bool:
            return any(d.process.poll() is not None for d in devices)

        wait_for(one_exited, "one of the two devices with id dup-0 to exit", timeout_s=90)
        exited = next(d for d in devices if d.process.poll() is not None)
        survivor = next(d for d in devices if d is not exited)
        assert exited.process.returncode == 1
        assert "ClientIdInUse: client id 'dup-0' is in use" in exited.log()
        time.sleep(3)  # the survivor keeps its connection and says it is online
        assert survivor.process.poll() is None, survivor.log()[-2000:]
        wait_for(lambda: (s := sniffer.latest_status(FLEET, "dup-0")) is not None and s.online,
                 "the surviving device's online status")
    finally:
        for device in devices:
            device.kill()
        sniffer.close()
