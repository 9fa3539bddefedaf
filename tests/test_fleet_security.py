"""Hostile input against a running fleet over a real Mosquitto: a device speaking for another
through a TLS + password + ACL broker, and every kind of bad update sent with a raw client. Each
is stopped at the broker or rejected by the aggregator, counted by reason in ``metrics.jsonl``,
and the run completes with exactly the honest devices' updates."""
from __future__ import annotations

import time
import uuid
from pathlib import Path
from typing import Callable

import numpy as np
import pytest

from edgetrain.sdk import topics, wire
from edgetrain.sdk.errors import BrokerUnavailable, TransportError
from edgetrain.sdk.transport import MqttTransport
from tests.fleet import (AggregatorThread, DeviceThread, FleetAssets, Gate, Sniffer,  # noqa: F401 (fixtures)
                         broker_config, cleanup, fleet_assets, make_device, metrics, publish_update)
from tests.mosquitto import MosquittoBroker, make_tls_material

FLEET = "secure"


def _crafted(announcement: wire.Announcement, device_id: str, vector: np.ndarray | None = None, *,
             round_delta: int = 0, version_delta: int = 0, num_examples: int = 50, codec: str = "dense",
             payload: bytes | None = None) -> wire.Update:
    """An update for the announced round, altered as asked; the default payload is a small valid delta."""
    size = len(announcement.payload) // 4
    if payload is None:
        payload = (np.full(size, 1e-3, np.float32) if vector is None else vector.astype(np.float32)).tobytes()
    return wire.Update(device_id=device_id, round_id=announcement.round_id + round_delta,
                       model_version=announcement.model_version + version_delta, update_id=uuid.uuid4().hex,
                       num_examples=num_examples, codec=codec, payload=payload, metrics={},
                       run_id=announcement.run_id)


def test_acl_stops_a_device_speaking_for_another(broker_factory: Callable[..., MosquittoBroker],
                                                 fleet_assets: FleetAssets, tmp_path: Path,
                                                 cleanup: list[Callable[[], None]]) -> None:
    tls = make_tls_material(tmp_path / "tls", ("aggregator", "dev-a", "dev-b", "dev-c"))
    passwords = {"aggregator": "agg-secret", "dev-a": "a-secret", "dev-b": "b-secret", "dev-c": "c-secret"}
    broker = broker_factory(tls=True, tls_material=tls, passwords=passwords, acl=topics.mosquitto_acl())

    def config(user: str, password: str | None = None):
        cert, key = tls.client_certs[user]
        return broker_config(broker.url, username=user, password=password or passwords[user], ca_file=tls.ca_cert,
                             cert_file=cert, key_file=key)

    with pytest.raises(BrokerUnavailable):  # a wrong password is refused at the door
        MqttTransport(config("dev-a", "guess"), "dev-a-guess").connect(timeout_s=5)

    gate = Gate()
    limits = {"dev-a": 70, "dev-b": 90}
    devices = [DeviceThread(make_device(config(name), fleet_assets, FLEET, name, tmp_path / name, index=i, count=2,
                                        limit=limit, gate=gate)).start()
               for i, (name, limit) in enumerate(limits.items())]
    cleanup.extend([*(d.stop for d in devices), gate.open])
    run = AggregatorThread(config("aggregator"), fleet_assets, FLEET, tmp_path / "run", "--rounds", "1",
                           "--min-devices", "2", "--round-timeout", "15", "--eval-examples", "50").start()
    cleanup.append(run.stop)
    gate.wait_arrived(2)  # round 1 is open, neither honest update sent yet

    # Mosquitto grants the subscription to dev-a's updates but, by the ACL, never delivers one.
    rogue = Sniffer(config("dev-c"), client_id="dev-c").subscribe(
        topics.announce_topic(FLEET), topics.update_topic(FLEET, "dev-a")).connect()
    cleanup.append(rogue.close)
    _, announcement = rogue.wait_for_message(wire.Announcement)
    assert isinstance(announcement, wire.Announcement)
    spoof = _crafted(announcement, "dev-a", num_examples=10**6)  # would swamp the weighted mean
    with pytest.raises(TransportError, match="refused the publish"):
        publish_update(rogue.transport, FLEET, "dev-a", spoof)
    # On its own topic the broker lets it through; the aggregator then refuses the forged sender.
    publish_update(rogue.transport, FLEET, "dev-c", spoof)
    gate.open()
    (record,) = run.join()

    assert not [t for t, _ in rogue.snapshot() if t != topics.announce_topic(FLEET)]
    assert dict(record.devices_rejected) == {"spoofed_sender": 1}
    assert (record.devices_chosen, record.devices_reported) == (2, 2)
    assert record.total_examples == sum(limits.values())
    assert metrics(tmp_path / "run") == [record]



def test_bad_updates_are_rejected_and_counted(broker: MosquittoBroker, fleet_assets: FleetAssets, tmp_path: Path,
                                             cleanup: list[Callable[[], None]]) -> None:
    config = broker_config(broker.url)
    gates = {"dev-0": Gate(), "dev-1": Gate()}
    devices = [DeviceThread(make_device(config, fleet_assets, FLEET, name, tmp_path / name, index=i, count=2,
                                        limit=60, gate=gate)).start() for i, (name, gate) in enumerate(gates.items())]
    cleanup.extend([*(d.stop for d in devices), *(g.open for g in gates.values())])
    raw = Sniffer(config, client_id="raw").subscribe(topics.announce_topic(FLEET), topics.update_filter(FLEET),
                                                     topics.ack_filter(FLEET)).connect()
    cleanup.append(raw.close)
    run = AggregatorThread(config, fleet_assets, FLEET, tmp_path / "run", "--rounds", "1", "--min-devices", "2",
                           "--round-timeout", "15", "--eval-examples", "50", "--max-norm", "100").start()
    cleanup.append(run.stop)
    for gate in gates.values():
        gate.wait_arrived(1)  # round 1 is open and both honest devices are held
    _, a = raw.wait_for_message(wire.Announcement)
    assert isinstance(a, wire.Announcement)
    size = len(a.payload) // 4

    def send(topic_device: str, frame: bytes) -> None:
        raw.transport.publish(topics.update_topic(FLEET, topic_device), frame)

    valid_frame = wire.encode(_crafted(a, "dev-0"))
    send("dev-0", b"\x00 not a frame at all")
    send("dev-0", valid_frame[: len(valid_frame) // 2])
    publish_update(raw.transport, FLEET, "dev-0", _crafted(a, "dev-0", codec="nope"))
    expected_acks = {
        "late": [_crafted(a, "dev-0", round_delta=-1)],
        "wrong_round": [_crafted(a, "dev-0", round_delta=+1)],
        "wrong_model_version": [_crafted(a, "dev-0", version_delta=+1)],
        "undecodable": [_crafted(a, "dev-0", payload=np.zeros(size - 1, np.float32).tobytes())],
        "non_finite": [_crafted(a, "dev-0", np.where(np.arange(size) == 7, np.nan, 0.0)),
                       _crafted(a, "dev-0", np.where(np.arange(size) == 9, np.inf, 0.0))],
        "norm_too_large": [_crafted(a, "dev-0", np.full(size, 10.0))],  # norm 10·√25450 ≈ 1595 > 100
        "bad_example_count": [_crafted(a, "dev-0", num_examples=0)],
        "unknown_device": [_crafted(a, "stranger")],
    }
    for updates in expected_acks.values():
        for update in updates:
            publish_update(raw.transport, FLEET, update.device_id, update)
    publish_update(raw.transport, FLEET, "dev-1", _crafted(a, "dev-0"))  # spoofed: dev-0 on dev-1's topic

    gates["dev-0"].open()  # the honest update, then the same bytes again (a replay)
    _, honest = raw.wait_for_message(wire.Update, lambda t, m: m.device_id == "dev-0" and m.metrics != {},
                                     "dev-0's honest update")
    raw.wait_for_message(wire.Ack, lambda t, m: m.update_id == honest.update_id, "the honest update's ack")
    (sniffed,) = [p for t, p in raw.snapshot()
                  if t == topics.update_topic(FLEET, "dev-0") and honest.update_id.encode() in p]
    send("dev-0", sniffed)  # the very bytes the device sent

    def replay_acks() -> list[wire.Ack]:
        return [m for _, m in raw.decoded(wire.Ack) if m.update_id == honest.update_id]  # type: ignore[misc]

    raw.wait_for_message(wire.Ack, lambda t, m: len(replay_acks()) == 2, "the replay's ack")
    gates["dev-1"].open()
    (record,) = run.join()

    expected = {reason: len(updates) for reason, updates in expected_acks.items()}
    # An unregistered codec fails wire decoding (no ack: the frame was not decoded) but keeps its own reason.
    expected.update(malformed=2, unknown_codec=1, spoofed_sender=1, duplicate=1)
    assert dict(record.devices_rejected) == expected
    assert len(record.rejected_detail) == sum(expected.values())
    assert (record.devices_chosen, record.devices_reported, record.total_examples) == (2, 2, 120)
    # Each rejected sender was told why; the replay was acknowledged as already held.
    acks = {m.update_id: m for _, m in raw.decoded(wire.Ack)}
    for reason, updates in expected_acks.items():
        assert all(not acks[u.update_id].accepted and acks[u.update_id].reason == reason for u in updates)
    assert all(m.accepted for m in replay_acks())
    assert metrics(tmp_path / "run") == [record]


def test_own_credentials_cannot_take_over_another_client_id(broker_factory: Callable[..., MosquittoBroker],
                                                            tmp_path: Path, cleanup: list[Callable[[], None]]) -> None:
    """Issue 12, defect 7: dev-c logs in with its own credentials but dev-b's or the aggregator's client id.
    The broker names every connection by its username, so neither real client is knocked off."""
    tls = make_tls_material(tmp_path / "tls", ("aggregator", "dev-b", "dev-c"))
    passwords = {"aggregator": "agg-secret", "dev-b": "b-secret", "dev-c": "c-secret"}
    broker = broker_factory(tls=True, tls_material=tls, passwords=passwords, acl=topics.mosquitto_acl())

    def config(user: str):
        cert, key = tls.client_certs[user]
        return broker_config(broker.url, username=user, password=passwords[user], ca_file=tls.ca_cert,
                             cert_file=cert, key_file=key)

    clients = [MqttTransport(config(user), user) for user in ("aggregator", "dev-b")]
    clients += [MqttTransport(config("dev-c"), stolen_id) for stolen_id in ("dev-b", "aggregator")]
    for client in clients:
        client.connect(timeout_s=10)
        cleanup.append(client.close)
    time.sleep(1.0)
    assert all(client.is_connected for client in clients[:2])
    # The broker's own word (a dropped client reconnects at once, so is_connected alone could miss it).
    log = broker.log_path.read_text()
    assert "Client dev-b already connected" not in log and "Client aggregator already connected" not in log
