"""Run ids and signed announcements over a real Mosquitto (issue 19's blocker, issue 12 item 4).

Two runs in a row on one fleet name, served by the same device threads, both complete (before run
ids, devices skipped the second run's round 1 as "already answered"). A forged announcement for
round 999, retained on a broker without ACLs by a raw client, is refused by devices that hold the
aggregator's public key, and does not keep them from serving the real run.
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Callable

import numpy as np

from edgetrain.sdk import topics, wire
from edgetrain.sdk.codecs import CodecSpec, get_codec
from edgetrain.sdk.round_settings import RoundSettings
from edgetrain.sdk.wire import signing
from tests.fleet import (AggregatorThread, FleetAssets, Sniffer, broker_config, cleanup, fleet_assets,  # noqa: F401
                         start_device_threads, wait_for)
from tests.mosquitto import MosquittoBroker

LIMITS = (60, 60)
RUN_FLAGS = ("--rounds", "2", "--min-devices", "2", "--round-timeout", "20", "--eval-examples", "100",
             "--local-steps", "2")


def test_two_runs_in_a_row_on_one_fleet_both_complete(broker: MosquittoBroker, fleet_assets: FleetAssets,
                                                      tmp_path: Path, cleanup: list[Callable[[], None]]) -> None:  # noqa: F811
    fleet = "twice"
    config = broker_config(broker.url)
    sniffer = Sniffer(config).subscribe(topics.status_filter(fleet)).connect()
    cleanup.append(sniffer.close)
    devices = start_device_threads(config, fleet_assets, fleet, tmp_path / "devices", LIMITS)
    cleanup.extend(d.stop for d in devices)
    sniffer.wait_online(fleet, [d.device.config.device_id for d in devices])

    first = AggregatorThread(config, fleet_assets, fleet, tmp_path / "run-1", *RUN_FLAGS).start()
    assert [r.round_id for r in first.join(60)] == [1, 2]
    second = AggregatorThread(config, fleet_assets, fleet, tmp_path / "run-2", *RUN_FLAGS).start()
    records = second.join(60)
    assert [(r.round_id, r.devices_reported) for r in records] == [(1, 2), (2, 2)]
    run_ids = (first.aggregator.run_id, second.aggregator.run_id)
    assert run_ids[0] != run_ids[1] and (tmp_path / "run-2" / "run_id").read_text().strip() == run_ids[1]
    assert all(d.device.run_id == run_ids[1] and d.device.rounds_trained == 4 for d in devices)


def test_a_forged_retained_announcement_is_refused_and_the_run_completes(
        broker: MosquittoBroker, fleet_assets: FleetAssets, tmp_path: Path,
        cleanup: list[Callable[[], None]]) -> None:  # noqa: F811
    fleet = "signed"
    config = broker_config(broker.url)
    key_path = tmp_path / "keys" / "aggregator.pem"
    signing.generate_key_pair(key_path)
    public = signing.load_public_key(signing.public_key_path(key_path))
    sniffer = Sniffer(config, "forger").subscribe(topics.status_filter(fleet)).connect()
    cleanup.append(sniffer.close)
    devices = start_device_threads(config, fleet_assets, fleet, tmp_path / "devices", LIMITS, aggregator_key=public)
    cleanup.extend(d.stop for d in devices)
    names = [d.device.config.device_id for d in devices]
    sniffer.wait_online(fleet, names)

    # A raw client (no ACL stops it) retains round 999 for every device, signed with a key of its own.
    forged = wire.Announcement(
        run_id="forged", round_id=999, model_version=999, strategy="fedavg", task="train", selected=tuple(names),
        deadline_unix_s=time.time() + 600, settings=RoundSettings(lr=1000.0, local_steps=1),
        uplink_codec=CodecSpec("dense"), payload_kind="params", downlink_codec=CodecSpec("dense"), base_version=None,
        payload=get_codec("dense").encode(np.zeros(fleet_assets.num_params, np.float32), None, {})[0])
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    forged = signing.sign(forged, Ed25519PrivateKey.generate())
    sniffer.transport.publish(topics.announce_topic(fleet), wire.encode(forged), retain=True)

    def refused(device: str) -> bool:
        status = sniffer.latest_status(fleet, device)
        return status is not None and "round 999" in status.skip_reason and "does not verify" in status.skip_reason

    wait_for(lambda: all(refused(d) for d in names), "both devices to refuse the forged announcement")
    assert all(d.device.run_id == "" and d.device.rounds_trained == 0 for d in devices)

    run = AggregatorThread(config, fleet_assets, fleet, tmp_path / "run", *RUN_FLAGS,
                           "--signing-key", str(key_path)).start()
    assert [(r.round_id, r.devices_reported) for r in run.join(60)] == [(1, 2), (2, 2)]
    assert all(d.device.run_id == run.aggregator.run_id and d.device.rounds_trained == 2 for d in devices)
