"""Default caps in the running service (issue 12, defect 8), over the in-memory transport: a device
claiming 10^12 examples weighs what the aggregator knows it holds, and an outsized delta is clipped at
k x the running median of accepted norms (Sun et al. 2019), with no --max-examples / --max-norm given."""
from __future__ import annotations

import threading
import time
from pathlib import Path

import numpy as np
import pytest

from edgetrain.aggregator.config import AggregatorConfig
from edgetrain.aggregator.service import Aggregator
from edgetrain.aggregator.strategy import make_strategy
from edgetrain.sdk import topics, wire
from edgetrain.sdk.codecs import get_codec
from edgetrain.sdk.data import load_split, to_model_input
from edgetrain.sdk.runtime import load_runtime
from edgetrain.sdk.transport.memory import MemoryBroker, MemoryTransport
from tests.fleet import FleetAssets, fleet_assets  # noqa: F401 (fixture)

FLEET = "caps"
HONEST = ("dev-0", "dev-1")
LIAR = "dev-2"
PARTITION = 40
WAIT_S = 20.0


def _aggregator(assets: FleetAssets, broker: MemoryBroker, out_dir: Path, rounds: int) -> Aggregator:
    runtime = load_runtime(assets.bundle)
    test = load_split("test", assets.data_dir)
    test_data = (to_model_input(test.images[:20], runtime.manifest.input_mean, runtime.manifest.input_std),
                 test.labels[:20])
    config = AggregatorConfig(fleet=FLEET, out_dir=out_dir, rounds=rounds, round_timeout_s=WAIT_S,
                              join_timeout_s=WAIT_S, expect_devices=3)
    return Aggregator(config, make_strategy("fedavg", min_devices=3), MemoryTransport(broker, "aggregator"),
                      runtime, assets.initial_params, test_data)


def _join(broker: MemoryBroker, device: str, partition_claim: int) -> MemoryTransport:
    transport = MemoryTransport(broker, device)
    transport.connect()
    status = wire.Status(device_id=device, online=True, info={"num_examples": partition_claim})
    transport.publish(topics.status_topic(FLEET, device), wire.encode(status), retain=True)
    return transport


def _announcement(broker: MemoryBroker, round_id: int) -> wire.Announcement:
    deadline = time.monotonic() + WAIT_S
    while time.monotonic() < deadline:
        retained = broker.retained(topics.announce_topic(FLEET))
        if retained:
            message = wire.decode(retained)
            if isinstance(message, wire.Announcement) and message.round_id == round_id:
                return message
        time.sleep(0.01)
    pytest.fail(f"round {round_id} was never announced")


def _send(transport: MemoryTransport, a: wire.Announcement, delta: np.ndarray, num_examples: int) -> None:
    payload, _ = get_codec("dense").encode(delta.astype(np.float32), None, {})
    update = wire.Update(run_id=a.run_id, device_id=transport.client_id, round_id=a.round_id, model_version=a.model_version,
                         update_id=f"{transport.client_id}-{a.round_id}", num_examples=num_examples, codec="dense",
                         payload=payload, metrics={})
    transport.publish(topics.update_topic(FLEET, transport.client_id), wire.encode(update))


def _run(aggregator: Aggregator) -> tuple[threading.Thread, list]:
    out: list = []
    thread = threading.Thread(target=lambda: out.extend(aggregator.run()), daemon=True)
    thread.start()
    return thread, out


@pytest.mark.parametrize("status_claim, liar_weight", [(PARTITION, PARTITION), (10**9, 4 * PARTITION)])
def test_a_device_claiming_a_trillion_examples_does_not_dominate(
        fleet_assets: FleetAssets, tmp_path: Path, status_claim: int, liar_weight: int) -> None:  # noqa: F811
    broker = MemoryBroker()
    aggregator = _aggregator(fleet_assets, broker, tmp_path / "run", rounds=1)
    start = aggregator.params.copy()
    devices = [_join(broker, d, PARTITION) for d in HONEST] + [_join(broker, LIAR, status_claim)]
    thread, records = _run(aggregator)
    announcement = _announcement(broker, 1)
    direction = np.full(start.size, 1e-3, dtype=np.float32)
    for transport in devices[:2]:
        _send(transport, announcement, direction, PARTITION)
    _send(devices[2], announcement, -direction, 10**12)  # same norm, opposite direction, a trillion examples
    thread.join(WAIT_S)
    assert not thread.is_alive() and len(records) == 1
    record = records[0]
    # Its own partition (or, lying there too, 4x the fleet's median partition) is all it weighs.
    assert record.total_examples == 2 * PARTITION + liar_weight
    reason = "partition_size" if status_claim == PARTITION else "fleet_median"
    assert record.extra["capped_by"] == {reason: 1} and record.extra["clipped"] == 0
    expected = start + direction * (2 * PARTITION - liar_weight) / (2 * PARTITION + liar_weight)
    np.testing.assert_allclose(aggregator.params, expected, rtol=1e-5, atol=1e-7)


def test_an_outsized_delta_is_clipped_to_k_times_the_median_norm(
        fleet_assets: FleetAssets, tmp_path: Path) -> None:  # noqa: F811
    broker = MemoryBroker()
    aggregator = _aggregator(fleet_assets, broker, tmp_path / "run", rounds=2)
    devices = [_join(broker, d, PARTITION) for d in (*HONEST, LIAR)]
    thread, records = _run(aggregator)
    direction = np.full(aggregator.params.size, 1e-3, dtype=np.float32)
    for transport in devices:  # round 1: three alike norms make the history
        _send(transport, _announcement(broker, 1), direction, PARTITION)
    second = _announcement(broker, 2)
    after_round_1 = aggregator.params.copy()
    for transport in devices[:2]:
        _send(transport, second, direction, PARTITION)
    _send(devices[2], second, -1e4 * direction, PARTITION)  # ten thousand times the others' norm
    thread.join(WAIT_S)
    assert not thread.is_alive() and len(records) == 2
    assert records[0].extra["clipped"] == 0 and records[1].extra["clipped"] == 1
    assert any("clipped" in line for line in records[1].rejected_detail)
    # Clipped to 5x the median norm: -5 * direction, so the mean is (1 + 1 - 5) / 3 of it.
    np.testing.assert_allclose(aggregator.params, after_round_1 - direction, rtol=1e-4, atol=1e-6)
