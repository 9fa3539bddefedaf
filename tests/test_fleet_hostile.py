"""Hostile messages against a running fleet over a real Mosquitto (issue 12): none of them ends the run
or costs an honest update; each is rejected and counted under a reason."""
from __future__ import annotations

import math
import threading
from pathlib import Path
from typing import Callable

import numpy as np

from edgetrain.sdk import topics, wire
from edgetrain.sdk.codecs import get_codec
from tests.fleet import (WAIT_S, AggregatorThread, DeviceThread, FleetAssets, Gate, Sniffer,  # noqa: F401
                         broker_config, cleanup, fleet_assets, make_device, publish_update, start_device_threads,
                         wait_for)
from tests.mosquitto import MosquittoBroker

FLEET = "hostile"
_FLAGS = ("--min-devices", "2", "--round-timeout", "20", "--eval-examples", "50")


def _announcement(sniffer: Sniffer, round_id: int) -> wire.Announcement:
    _, message = sniffer.wait_for_message(wire.Announcement, lambda t, m: m.round_id == round_id,
                                          f"round {round_id} announced")
    assert isinstance(message, wire.Announcement)
    return message


def _forged_update(announcement: wire.Announcement, device: str, num_params: int, **overrides: object) -> wire.Update:
    payload, _ = get_codec("dense").encode(np.zeros(num_params, dtype=np.float32), None, {})
    fields: dict = dict(run_id=announcement.run_id, device_id=device, round_id=announcement.round_id,
                        model_version=announcement.model_version,
                        update_id=f"forged-{device}", num_examples=10, codec="dense", payload=payload, metrics={})
    fields.update(overrides)
    return wire.Update(**fields)


def test_an_update_with_nan_metrics_is_rejected_and_the_run_finishes(
        broker: MosquittoBroker, fleet_assets: FleetAssets, tmp_path: Path,
        cleanup: list[Callable[[], None]]) -> None:
    config = broker_config(broker.url)
    sniffer = Sniffer(config, client_id="forger").subscribe(topics.announce_topic(FLEET)).connect()
    cleanup.append(sniffer.close)
    gate = Gate(rounds=frozenset({1}))
    devices = start_device_threads(config, fleet_assets, FLEET, tmp_path / "devices", [40, 40], gate=gate)
    cleanup.extend([*(d.stop for d in devices), gate.open])
    run = AggregatorThread(config, fleet_assets, FLEET, tmp_path / "run", "--rounds", "2", *_FLAGS).start()
    cleanup.append(run.stop)
    announcement = _announcement(sniffer, 1)
    gate.wait_arrived(2)  # round 1 open, nobody has answered yet
    num_params = run.aggregator.params.size
    publish_update(sniffer.transport, FLEET, "dev-0",
                   _forged_update(announcement, "dev-0", num_params, metrics={"cpu_s": math.nan}))
    publish_update(sniffer.transport, FLEET, "dev-1",
                   _forged_update(announcement, "dev-1", num_params, update_id="forged-2", metrics={"cpu_s": -1e300}))
    gate.open()
    records = run.join()
    assert [r.round_id for r in records] == [1, 2]
    assert records[0].devices_rejected.get("bad_metrics") == 2
    assert records[0].devices_reported == 2 and records[0].total_examples == 80  # the honest updates
    assert math.isfinite(records[0].extra["device_cpu_s"])


def test_a_retained_online_ghost_is_chosen_last_after_it_missed_a_deadline(
        broker: MosquittoBroker, fleet_assets: FleetAssets, tmp_path: Path,
        cleanup: list[Callable[[], None]]) -> None:
    config = broker_config(broker.url)
    forger = Sniffer(config, client_id="ghost-maker").connect()
    cleanup.append(forger.close)
    ghost = wire.encode(wire.Status(device_id="dev-9", online=True, info={"num_examples": 40}))
    forger.transport.publish(topics.status_topic(FLEET, "dev-9"), ghost, retain=True)
    cleanup.append(lambda: forger.transport.publish(topics.status_topic(FLEET, "dev-9"), b"", retain=True))
    devices = start_device_threads(config, fleet_assets, FLEET, tmp_path / "devices", [40, 40])
    cleanup.extend(d.stop for d in devices)
    records = AggregatorThread(config, fleet_assets, FLEET, tmp_path / "run", "--rounds", "3", "--min-devices", "2",
                               "--round-timeout", "8", "--eval-examples", "50").start().join()
    assert [r.devices_chosen for r in records] == [3, 2, 2]  # the ghost cost one deadline, not every round
    assert [r.devices_reported for r in records] == [2, 2, 2]


def test_chunks_that_never_complete_expire_as_missing_chunk_in_the_round_record(
        broker: MosquittoBroker, fleet_assets: FleetAssets, tmp_path: Path,
        cleanup: list[Callable[[], None]]) -> None:
    config = broker_config(broker.url)
    sniffer = Sniffer(config, client_id="chunker").subscribe(topics.announce_topic(FLEET)).connect()
    cleanup.append(sniffer.close)
    gate = Gate(rounds=frozenset({1}))
    devices = start_device_threads(config, fleet_assets, FLEET, tmp_path / "devices", [40, 40], gate=gate)
    cleanup.extend([*(d.stop for d in devices), gate.open])
    run = AggregatorThread(config, fleet_assets, FLEET, tmp_path / "run", "--rounds", "1", *_FLAGS,
                           settings={"chunk_timeout_s": 1.0}).start()
    cleanup.append(run.stop)
    announcement = _announcement(sniffer, 1)
    gate.wait_arrived(2)  # round 1 open, nobody has answered yet
    frame = wire.encode(_forged_update(announcement, "intruder", run.aggregator.params.size))
    parts = wire.split(frame, 4096, "never-finished")
    assert len(parts) > 2
    sniffer.transport.publish(topics.update_topic(FLEET, "intruder"), parts[0])  # the first slice, never the rest
    reassembler = run.aggregator._reassembler  # white box: the only sign that the slice arrived and expired
    wait_for(lambda: reassembler.pending_message_ids != (), "the slice to be held")
    wait_for(lambda: reassembler.pending_message_ids == () and reassembler.pending_bytes == 0,
             "the incomplete message to expire")
    gate.open()
    records = run.join()
    assert records[0].devices_rejected.get("missing_chunk") == 1
    assert any("never-finished" in line and "missing chunk" in line for line in records[0].rejected_detail)
    assert records[0].devices_reported == 2


def test_a_forged_offline_status_does_not_drop_an_honest_update_already_queued(
        broker: MosquittoBroker, fleet_assets: FleetAssets, tmp_path: Path,
        cleanup: list[Callable[[], None]]) -> None:
    config = broker_config(broker.url)
    forger = Sniffer(config, client_id="forger").subscribe(topics.status_filter(FLEET)).connect()
    cleanup.append(forger.close)
    late = Gate(rounds=frozenset({1}))  # holds dev-2 only
    devices = [DeviceThread(make_device(config, fleet_assets, FLEET, f"dev-{i}", tmp_path / f"dev-{i}", index=i,
                                        count=3, limit=40, gate=late if i == 2 else None)).start() for i in range(3)]
    cleanup.extend([*(d.stop for d in devices), late.open])
    forger.wait_online(FLEET, ["dev-0", "dev-1", "dev-2"])
    run = AggregatorThread(config, fleet_assets, FLEET, tmp_path / "run", "--rounds", "1", *_FLAGS)
    # White box, to make the race deterministic: the aggregator stalls in its second accumulate (dev-0's or
    # dev-1's update) while the forged "offline" and dev-2's real update queue up behind each other.
    stalled, release = threading.Event(), threading.Event()
    cleanup.append(release.set)
    accumulate, calls = run.aggregator.strategy.accumulate, []

    def stalling_accumulate(vector: np.ndarray, num_examples: int, device_id: str) -> None:
        calls.append(device_id)
        if len(calls) == 2:
            stalled.set()
            release.wait(WAIT_S)
        accumulate(vector, num_examples, device_id)

    run.aggregator.strategy.accumulate = stalling_accumulate  # type: ignore[method-assign]
    inbox, queued = run.aggregator._inbox, []
    put = inbox.put
    inbox.put = lambda topic, payload: queued.append(topic) or put(topic, payload)  # type: ignore[method-assign]
    run.start()
    cleanup.append(run.stop)
    late.wait_arrived(1)
    wait_for(stalled.is_set, "two honest updates in")
    offline = wire.encode(wire.Status(device_id="dev-2", online=False, info={"reason": "forged"}))
    forger.transport.publish(topics.status_topic(FLEET, "dev-2"), offline, retain=True)
    cleanup.append(lambda: forger.transport.publish(topics.status_topic(FLEET, "dev-2"), b"", retain=True))
    wait_for(lambda: topics.status_topic(FLEET, "dev-2") in queued, "the forged offline status queued")
    late.open()
    wait_for(lambda: topics.update_topic(FLEET, "dev-2") in queued, "dev-2's update queued behind it")
    release.set()
    records = run.join()
    assert records[0].devices_reported == 3, records[0].rejected_detail
    assert sorted(calls) == ["dev-0", "dev-1", "dev-2"] and not records[0].devices_rejected
