"""Many device identities per process (``sdk.device_host``, ``sdk.transport.selector``), against a real Mosquitto:
the selector loop carries more clients than paho's select() loop can and brings them back after a broker
restart; identities sharing a host send exactly the update bytes separate devices send; and ``simulate
--device-processes`` runs a 200-device fleet in 2 processes."""
from __future__ import annotations

import threading
from pathlib import Path

import numpy as np
import pytest

from edgetrain.sdk import topics, wire
from edgetrain.sdk.broker_config import BrokerConfig
from edgetrain.sdk.codecs import CodecSpec, get_codec
from edgetrain.sdk.data import PartitionSpec
from edgetrain.sdk.device_host import DeviceHost, HostConfig, Identity, build_devices, parse_id_range
from edgetrain.sdk.errors import ConfigError
from edgetrain.sdk.round_settings import RoundSettings
from edgetrain.sdk.runtime import load_runtime
from edgetrain.sdk.transport.selector import SelectorLoop, SelectorTransport
from tests.fleet import (DeviceThread, FleetAssets, Sniffer, fleet_assets, make_device, metrics,  # noqa: F401
                         spawn_cli, wait_for)
from tests.mosquitto import MosquittoBroker, find_mosquitto

SELECT_LIMIT_CLIENTS = 340  # what paho's loop_start (select(), FD_SETSIZE 1024) tops out at in one process


def test_id_ranges_give_ids_and_partition_indices() -> None:
    ids = parse_id_range("dev-098..dev-101")
    assert ids == [Identity("dev-098", 98), Identity("dev-099", 99), Identity("dev-100", 100), Identity("dev-101", 101)]
    assert parse_id_range("board7") == [Identity("board7", 7)]
    for bad in ("dev-5..dev-1", "a1..b3", "dev-x", "dev-0..dev-99999999"):
        with pytest.raises(ConfigError):
            parse_id_range(bad)


def test_one_selector_loop_connects_more_clients_than_select_allows_and_survives_a_broker_restart(
        broker: MosquittoBroker) -> None:
    config = BrokerConfig.parse(broker.url)
    loop = SelectorLoop(max_handshakes=20)
    loop.start()
    received: list[str] = []
    lock = threading.Lock()

    def record(client: str):  # noqa: ANN202
        def handler(topic: str, payload: bytes) -> None:
            with lock:
                received.append(client)
        return handler

    clients = [SelectorTransport(config, f"c-{i}", loop, reconnect_min_s=0.2, reconnect_max_s=1.0)
               for i in range(SELECT_LIMIT_CLIENTS + 60)]
    try:
        for client in clients:
            client.subscribe("all/news", record(client.client_id))
            client.connect()
        assert loop.connections == len(clients)
        clients[0].publish("all/news", b"1")
        wait_for(lambda: len(received) == len(clients), "every client to receive the message")

        broker.stop()
        wait_for(lambda: not any(c.is_connected for c in clients), "every client to notice the broker is gone")
        broker.start()
        wait_for(lambda: all(c.is_connected for c in clients), "every client to reconnect")
        received.clear()
        clients[-1].publish("all/news", b"2")  # subscriptions survived: re-made on every connection
        wait_for(lambda: len(set(received)) == len(clients), "every client to receive after the restart")
    finally:
        for client in clients:
            client.close()
        loop.stop()
    assert loop.connections == 0


def _announcement(assets: FleetAssets, selected: tuple[str, ...]) -> wire.Announcement:
    return wire.Announcement(
        run_id="run-host", round_id=1, model_version=0, strategy="fedavg", task="train", selected=selected,
        deadline_unix_s=4e9, settings=RoundSettings(lr=0.05, batch_size=8, local_epochs=1),
        uplink_codec=CodecSpec("dense"), payload_kind="params", downlink_codec=CodecSpec("dense"), base_version=None,
        payload=get_codec("dense").encode(assets.initial_params.astype(np.float32), None, {})[0])


def _updates_after_announcing(broker: BrokerConfig, fleet: str, ids: tuple[str, ...],
                              assets: FleetAssets) -> dict[str, wire.Update]:
    sniffer = Sniffer(broker, f"sniff-{fleet}").subscribe(f"edgetrain/{fleet}/update/+").connect()
    try:
        sniffer.transport.publish(topics.announce_topic(fleet), wire.encode(_announcement(assets, ids)), retain=True)
        wait_for(lambda: len(sniffer.decoded(wire.Update)) >= len(ids), f"updates from {ids} on {fleet}")
        return {m.device_id: m for _, m in sniffer.decoded(wire.Update)}  # type: ignore[attr-defined]
    finally:
        sniffer.close()


def test_identities_sharing_a_host_send_the_bytes_separate_devices_send(broker: MosquittoBroker, fleet_assets: FleetAssets,
                                                                         tmp_path: Path) -> None:
    config = BrokerConfig.parse(broker.url)
    ids = ("dev-0", "dev-1")
    loop = SelectorLoop()
    host = DeviceHost(build_devices(
        HostConfig(fleet="hosted", state_root=tmp_path / "host", partition=PartitionSpec.parse("iid"),
                   partition_count=2, limit_examples=40),
        [Identity(i, n) for n, i in enumerate(ids)], config, loop, load_runtime(fleet_assets.bundle),
        fleet_assets.data_dir), loop)
    stop = threading.Event()
    thread = threading.Thread(target=host.run, args=(stop,), daemon=True)
    thread.start()
    try:
        hosted = _updates_after_announcing(config, "hosted", ids, fleet_assets)
    finally:
        stop.set()
        thread.join(30)
    assert not thread.is_alive()

    separate = [DeviceThread(make_device(config, fleet_assets, "separate", i, tmp_path / "sep" / i, index=n, count=2,
                                         limit=40)).start() for n, i in enumerate(ids)]
    try:
        alone = _updates_after_announcing(config, "separate", ids, fleet_assets)
    finally:
        for device in separate:
            device.stop()

    assert hosted["dev-0"].payload != hosted["dev-1"].payload  # different partitions: the comparison can fail
    for device_id in ids:
        assert hosted[device_id].payload == alone[device_id].payload, device_id
        assert (hosted[device_id].num_examples, hosted[device_id].codec) == (alone[device_id].num_examples,
                                                                             alone[device_id].codec)
    assert (tmp_path / "host" / "dev-1" / "progress.json").is_file()  # each identity keeps its own state


@pytest.mark.broker
def test_simulate_200_devices_in_2_processes_completes_2_rounds(fleet_assets: FleetAssets, tmp_path: Path) -> None:
    if find_mosquitto() is None:
        pytest.skip("mosquitto not installed")
    out = tmp_path / "run"
    done = spawn_cli(["simulate", "--devices", "200", "--device-processes", "2", "--fraction", "0.1", "--rounds", "2",
                      "--limit-examples", "3", "--eval-examples", "100", "--data-dir", fleet_assets.data_dir,
                      "--bundle", fleet_assets.bundle, "--out", out, "--round-timeout", "60", "--join-timeout", "120"],
                     tmp_path / "simulate.log")
    assert done.wait(240) == 0, done.log()[-3000:]
    records = metrics(out)
    assert [r.round_id for r in records] == [1, 2]
    assert all((r.devices_chosen, r.devices_reported) == (20, 20) for r in records)
    for host in ("host-0", "host-1"):
        assert "Traceback" not in (out / "devices" / f"{host}.log").read_text()
    assert len(list((out / "devices").glob("dev-*/progress.json"))) >= 20  # the identities that trained


def test_identities_of_a_host_keep_one_copy_of_the_announcement_and_of_the_model(
        broker: MosquittoBroker, fleet_assets: FleetAssets, tmp_path: Path) -> None:
    config = BrokerConfig.parse(broker.url)
    ids = ("dev-0", "dev-1", "dev-2")
    loop = SelectorLoop()
    devices = build_devices(HostConfig(fleet="shared", state_root=tmp_path / "host", partition=PartitionSpec.parse("iid"),
                                       partition_count=3, limit_examples=20),
                            [Identity(i, n) for n, i in enumerate(ids)], config, loop, load_runtime(fleet_assets.bundle),
                            fleet_assets.data_dir)
    host = DeviceHost(devices, loop)
    stop = threading.Event()
    thread = threading.Thread(target=host.run, args=(stop,), daemon=True)
    thread.start()
    try:
        _updates_after_announcing(config, "shared", ids, fleet_assets)
        wait_for(lambda: all(d.replica.version == 0 for d in devices), "every replica at version 0")
    finally:
        stop.set()
        thread.join(30)
    assert not thread.is_alive()
    share = devices[0].share
    assert share is not None and all(d.share is share for d in devices)
    assert share.frames.decoded == 1  # three identities received the frame; it was decoded once
    assert all(d.replica.params is devices[0].replica.params for d in devices)
    np.testing.assert_array_equal(devices[0].replica.params, fleet_assets.initial_params.astype(np.float32))
