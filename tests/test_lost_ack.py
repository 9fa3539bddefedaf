"""An update accepted in one round and sent again in a later one (its ack was lost, so the outbox
re-sent it) is acknowledged as held and counted as a duplicate, not refused as late."""
from __future__ import annotations

from pathlib import Path
from typing import Callable

from edgetrain.sdk import topics, wire
from tests.fleet import (AggregatorThread, DeviceThread, FleetAssets, Gate, Sniffer, broker_config, cleanup,  # noqa: F401
                         fleet_assets, make_device)
from tests.mosquitto import MosquittoBroker

FLEET = "lostack"


def test_an_update_resent_in_a_later_round_is_acked_as_held(broker: MosquittoBroker, fleet_assets: FleetAssets,
                                                             tmp_path: Path,
                                                             cleanup: list[Callable[[], None]]) -> None:
    config = broker_config(broker.url)
    raw = Sniffer(config, client_id="raw").subscribe(topics.update_filter(FLEET), topics.ack_filter(FLEET)).connect()
    cleanup.append(raw.close)
    gate = Gate(rounds=frozenset({2}))  # holds dev-0 at the start of round 2: the round stays open
    device = DeviceThread(make_device(config, fleet_assets, FLEET, "dev-0", tmp_path / "dev-0", index=0, count=1,
                                      limit=40, gate=gate)).start()
    cleanup.extend([device.stop, gate.open])
    run = AggregatorThread(config, fleet_assets, FLEET, tmp_path / "run", "--rounds", "2", "--min-devices", "1",
                           "--round-timeout", "20", "--eval-examples", "20").start()
    cleanup.append(run.stop)

    _, first = raw.wait_for_message(wire.Update, lambda t, m: m.round_id == 1, "dev-0's round-1 update")
    assert isinstance(first, wire.Update)
    raw.wait_for_message(wire.Ack, lambda t, m: m.update_id == first.update_id and m.accepted, "its ack")
    (sent,) = [p for t, p in raw.snapshot()
               if t == topics.update_topic(FLEET, "dev-0") and first.update_id.encode() in p]
    gate.wait_arrived(1)  # round 2 is open
    raw.transport.publish(topics.update_topic(FLEET, "dev-0"), sent)  # the outbox's re-send, a round late

    def acks() -> list[wire.Ack]:
        return [m for _, m in raw.decoded(wire.Ack) if m.update_id == first.update_id]  # type: ignore[misc]

    raw.wait_for_message(wire.Ack, lambda t, m: len(acks()) == 2, "the re-send's ack")
    assert [(a.accepted, a.reason) for a in acks()] == [(True, ""), (True, "duplicate")]
    gate.open()
    records = run.join()
    assert [dict(r.devices_rejected) for r in records] == [{}, {"duplicate": 1}]
    assert [r.devices_reported for r in records] == [1, 1]
