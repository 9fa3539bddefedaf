"""Whole fleets over real Mosquitto brokers: rounds through aggregation workers, and a fleet split over
two edge brokers bridged to a core broker."""
from __future__ import annotations

from pathlib import Path
from typing import Callable

import numpy as np
import pytest

from edgetrain.aggregator.bridge import edge_bridge_config
from edgetrain.aggregator.checkpoint import list_checkpoints, load_checkpoint
from edgetrain.aggregator.coordinator import WorkerPool
from edgetrain.sdk import topics, wire
from edgetrain.sdk.codecs import get_codec, parse_codec_spec
from tests.fleet import (AggregatorThread, FleetAssets, Sniffer, broker_config, cleanup, fleet_assets,  # noqa: F401
                         metrics, spawn_cli, start_device_threads)
from tests.mosquitto import MosquittoBroker, find_mosquitto

LIMITS = (60, 120, 200, 90)


def _sniffed(sniffer: Sniffer, fleet: str, round_id: int, num_params: int) -> dict[str, tuple[int, np.ndarray]]:
    found = {}
    for _, update in sniffer.decoded(wire.Update, topics.update_filter(fleet)[:-1]):
        if update.round_id == round_id:
            name, params = parse_codec_spec(update.codec)
            found[update.device_id] = (update.num_examples,
                                       get_codec(name).decode(update.payload, num_params, params).astype(np.float64))
    return found


def test_fleet_rounds_through_two_workers_equal_numpy_weighted_mean(broker: MosquittoBroker, fleet_assets: FleetAssets,
                                                                    tmp_path: Path,
                                                                    cleanup: list[Callable[[], None]]) -> None:
    fleet = "workers"
    config = broker_config(broker.url)
    sniffer = Sniffer(config).subscribe(topics.update_filter(fleet), topics.status_filter(fleet)).connect()
    cleanup.append(sniffer.close)
    devices = start_device_threads(config, fleet_assets, fleet, tmp_path / "devices", LIMITS)
    cleanup.extend(d.stop for d in devices)
    names = [d.device.config.device_id for d in devices]
    sniffer.wait_online(fleet, names)
    out = tmp_path / "run"
    pool = WorkerPool(config, fleet, 2, out).start()
    cleanup.append(pool.stop)
    records = AggregatorThread(config, fleet_assets, fleet, out, "--workers", "2", "--rounds", "2",
                               "--min-devices", "4", "--round-timeout", "30", "--eval-examples", "200").start().join(60)
    assert [r.round_id for r in records] == [1, 2]
    assert [r.devices_reported for r in records] == [4, 4]
    params = fleet_assets.initial_params.astype(np.float64)
    for record in records:
        updates = _sniffed(sniffer, fleet, record.round_id, fleet_assets.num_params)
        assert sorted(updates) == names
        counts = np.array([updates[d][0] for d in names], dtype=np.float64)
        expected = params + (counts[:, None] * np.stack([updates[d][1] for d in names])).sum(0) / counts.sum()
        checkpoint = load_checkpoint(dict(list_checkpoints(out))[record.round_id])
        np.testing.assert_allclose(checkpoint.params, expected, rtol=0, atol=1e-6)
        params = checkpoint.params.astype(np.float64)
    logs = [(out / "workers" / f"worker-{i}.log").read_text() for i in range(2)]
    assert all("rejected" not in log for log in logs), logs


def test_fleet_split_over_two_bridged_edge_brokers_completes_rounds(broker_factory: Callable[..., MosquittoBroker],
                                                                     fleet_assets: FleetAssets, tmp_path: Path,
                                                                     cleanup: list[Callable[[], None]]) -> None:
    fleet = "bridged"
    core = broker_factory()
    edges = [broker_factory(extra_config=edge_bridge_config(f"edge{i}", "127.0.0.1", core.port)) for i in range(2)]
    core_config = broker_config(core.url)
    sniffer = Sniffer(core_config).subscribe(topics.status_filter(fleet), topics.update_filter(fleet)).connect()
    cleanup.append(sniffer.close)
    devices = []
    for i, edge in enumerate(edges):  # two devices behind each edge broker, none on the core
        devices += start_device_threads(broker_config(edge.url), fleet_assets, fleet, tmp_path / f"edge{i}",
                                        LIMITS[2 * i: 2 * i + 2], prefix=f"e{i}dev")
    cleanup.extend(d.stop for d in devices)
    names = [d.device.config.device_id for d in devices]
    sniffer.wait_online(fleet, names)  # their status crossed the bridges to the core
    records = AggregatorThread(core_config, fleet_assets, fleet, tmp_path / "run", "--rounds", "2", "--min-devices",
                               "4", "--round-timeout", "30", "--eval-examples", "200").start().join(60)
    assert [r.round_id for r in records] == [1, 2]
    assert [r.devices_reported for r in records] == [4, 4]
    assert all(not r.devices_rejected for r in records)
    for record in records:  # every device's update reached the core through its edge's bridge
        assert sorted(_sniffed(sniffer, fleet, record.round_id, fleet_assets.num_params)) == sorted(names)


@pytest.mark.broker
def test_simulate_with_two_workers_runs_end_to_end(fleet_assets: FleetAssets, tmp_path: Path) -> None:
    if find_mosquitto() is None:
        pytest.skip("mosquitto not installed")
    out = tmp_path / "run"
    done = spawn_cli(["simulate", "--devices", "3", "--rounds", "2", "--workers", "2", "--limit-examples", "100",
                      "--eval-examples", "100", "--data-dir", fleet_assets.data_dir, "--bundle", fleet_assets.bundle,
                      "--out", out, "--round-timeout", "30", "--join-timeout", "60"], tmp_path / "simulate.log")
    assert done.wait(120) == 0, done.log()[-3000:]
    records = metrics(out)
    assert [(r.round_id, r.devices_reported, r.total_examples) for r in records] == [(1, 3, 300), (2, 3, 300)]
    # one local epoch over the 100 examples each device claims: counted by the workers, summed by the coordinator
    assert [r.examples_processed for r in records] == [300, 300]
    assert "Traceback" not in done.log()
    for i in range(2):  # both workers ran (and were stopped with the run)
        log = (out / "workers" / f"worker-{i}.log").read_text()
        assert "Traceback" not in log
