"""FedAvg over a real Mosquitto: the aggregator's result equals a numpy weighted mean of the very
updates that crossed the broker (McMahan et al. 2017: w + Σ n_k Δ_k / Σ n_k)."""
from __future__ import annotations

from pathlib import Path
from typing import Callable

import numpy as np

from edgetrain.aggregator.checkpoint import list_checkpoints, load_checkpoint, load_latest
from edgetrain.sdk import topics, wire
from edgetrain.sdk.codecs import get_codec, parse_codec_spec
from tests.fleet import (AggregatorThread, FleetAssets, Sniffer, broker_config, cleanup, fleet_assets,  # noqa: F401
                         metrics, start_device_threads)
from tests.mosquitto import MosquittoBroker

FLEET = "fedavg"
LIMITS = (60, 120, 200)  # different example counts, so the weights matter


def _sniffed_updates(sniffer: Sniffer, round_id: int, num_params: int) -> dict[str, tuple[int, np.ndarray]]:
    """device -> (num_examples, delta) for every update of ``round_id`` seen on the broker."""
    found: dict[str, tuple[int, np.ndarray]] = {}
    for topic, update in sniffer.decoded(wire.Update, topics.update_filter(FLEET)[:-1]):
        assert isinstance(update, wire.Update)
        if update.round_id != round_id:
            continue
        assert topics.device_from_topic(topic, FLEET, "update") == update.device_id
        name, params = parse_codec_spec(update.codec)
        delta = get_codec(name).decode(update.payload, num_params, params)
        found[update.device_id] = (update.num_examples, delta.astype(np.float64))
    return found


def test_fedavg_over_broker_equals_numpy_weighted_mean(broker: MosquittoBroker, fleet_assets: FleetAssets,
                                                      tmp_path: Path, cleanup: list[Callable[[], None]]) -> None:
    config = broker_config(broker.url)
    sniffer = Sniffer(config).subscribe(topics.update_filter(FLEET), topics.status_filter(FLEET)).connect()
    cleanup.append(sniffer.close)
    devices = start_device_threads(config, fleet_assets, FLEET, tmp_path / "devices", LIMITS)
    cleanup.extend(d.stop for d in devices)
    names = [d.device.config.device_id for d in devices]
    sniffer.wait_online(FLEET, names)

    out = tmp_path / "run"
    records = AggregatorThread(config, fleet_assets, FLEET, out, "--rounds", "2", "--min-devices", "3",
                               "--round-timeout", "20", "--eval-examples", "200").start().join()

    assert [r.round_id for r in records] == [1, 2]
    params = fleet_assets.initial_params.astype(np.float64)
    for record in records:
        updates = _sniffed_updates(sniffer, record.round_id, fleet_assets.num_params)
        assert sorted(updates) == names  # every device's update crossed the broker exactly as sent
        counts = np.array([updates[d][0] for d in names], dtype=np.float64)
        assert sorted(counts) == sorted(LIMITS)
        deltas = np.stack([updates[d][1] for d in names])
        expected = params + (counts[:, None] * deltas).sum(axis=0) / counts.sum()
        checkpoint = load_checkpoint(dict(list_checkpoints(out))[record.round_id])
        np.testing.assert_allclose(checkpoint.params, expected, rtol=0, atol=1e-6)
        # Not vacuous: an unweighted mean of the same updates lands measurably elsewhere.
        assert np.abs(params + deltas.mean(axis=0) - expected).max() > 1e-4
        assert record.devices_reported == 3 and record.devices_chosen == 3
        assert record.total_examples == sum(LIMITS)
        assert dict(record.devices_rejected) == {}
        params = checkpoint.params.astype(np.float64)
    latest = load_latest(out)
    assert latest is not None and latest.round_completed == 2 and latest.model_version == 2
    assert metrics(out) == records
    assert records[-1].accuracy is not None and records[-1].accuracy > 0.3  # learnable tiny set, 10 classes
