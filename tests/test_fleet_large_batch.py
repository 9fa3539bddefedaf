"""Large Batch Training over a real Mosquitto.

One step over the broker must equal one centralized step of the same optimizer on the union of the
devices' mini-batches (to float tolerance); backup workers, late gradients, a killed device and a
broker restart must leave the steps going and nothing counted twice.
"""
from __future__ import annotations

import signal
from pathlib import Path
from typing import Callable

import numpy as np
import pytest
import torch
from torch.nn import functional as F

from edgetrain.aggregator.checkpoint import list_checkpoints, load_checkpoint
from edgetrain.aggregator.server_optim import LargeBatchHyper, lars_step
from edgetrain.sdk import topics, wire
from edgetrain.sdk.data import PartitionSpec
from edgetrain.sdk.device import DeviceConfig, LocalData, gradient_batches
from edgetrain.sdk.runtime import load_runtime
from tests.fleet import (AggregatorThread, FleetAssets, Sniffer, broker_config, cleanup, fleet_assets,  # noqa: F401
                         metrics, spawn_device, start_device_threads, wait_for)
from tests.mosquitto import MosquittoBroker

FLEET = "lb"
BATCH = 16
LIMITS = (40, 60, 100)


def _union_batches(assets: FleetAssets, tmp_path: Path, step: int) -> tuple[np.ndarray, np.ndarray]:
    """The mini-batches the devices drew at ``step`` (1-based), concatenated: the large batch."""
    runtime = load_runtime(assets.bundle)
    xs, ys = [], []
    for index, limit in enumerate(LIMITS):
        config = DeviceConfig(fleet=FLEET, device_id=f"dev-{index}", state_dir=tmp_path / "replay",
                              partition=PartitionSpec.parse("iid"), partition_index=index,
                              partition_count=len(LIMITS))
        stream = gradient_batches(LocalData.load(config, runtime, assets.data_dir, limit=limit), BATCH, (0, index))
        for _ in range(step):
            x, y = next(stream)
        xs.append(x)
        ys.append(y)
    return np.concatenate(xs), np.concatenate(ys)


def _union_gradient(model: torch.nn.Module, x: np.ndarray, y: np.ndarray) -> None:
    model.zero_grad()
    F.cross_entropy(model(torch.from_numpy(x)), torch.from_numpy(y)).backward()


def _flat(model: torch.nn.Module, what: str = "param") -> np.ndarray:
    tensors = [p.grad if what == "grad" else p for p in model.parameters()]
    return torch.cat([t.detach().reshape(-1) for t in tensors]).numpy().copy()


@pytest.mark.parametrize("optimizer", ["sgd", "lars"])
def test_large_batch_steps_equal_centralized_steps_on_the_union(optimizer: str, broker: MosquittoBroker,
                                                                fleet_assets: FleetAssets, tmp_path: Path,
                                                                cleanup: list[Callable[[], None]]) -> None:
    config = broker_config(broker.url)
    devices = start_device_threads(config, fleet_assets, FLEET, tmp_path / "devices", LIMITS)
    cleanup.extend(d.stop for d in devices)
    sniffer = Sniffer(config).subscribe(topics.status_filter(FLEET), topics.announce_topic(FLEET)).connect()
    cleanup.append(sniffer.close)
    sniffer.wait_online(FLEET, [f"dev-{i}" for i in range(3)])
    out = tmp_path / "run"
    records = AggregatorThread(config, fleet_assets, FLEET, out, "--strategy", "large-batch", "--steps", "3",
                               "--min-devices", "3", "--batch-size", str(BATCH), "--lr", "0.1", "--momentum", "0.9",
                               "--lb-optimizer", optimizer, "--trust-coefficient", "0.02", "--weight-decay", "1e-3",
                               "--eval-every", "1", "--checkpoint-every", "1", "--eval-examples", "100").start().join()
    unions = [_union_batches(fleet_assets, tmp_path, step) for step in (1, 2, 3)]
    # dev-0 has 40 examples: its third batch is a partial one of 8, so weighting by examples matters.
    assert [(r.devices_reported, r.total_examples) for r in records] == [(3, len(y)) for _, y in unions]
    assert [len(y) for _, y in unions] == [48, 48, 40]

    # The same three steps, centralized: torch's SGD, or LARS on torch's union gradient.
    runtime = load_runtime(fleet_assets.bundle)
    model = runtime.model
    runtime.set_parameters(fleet_assets.initial_params)
    hyper = LargeBatchHyper(optimizer="lars", base_lr=0.1, momentum=0.9, weight_decay=1e-3, trust_coefficient=0.02)
    sgd = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-3)
    shapes = [p.shape for p in runtime.manifest.params]
    state: dict = {}
    checkpoints = dict(list_checkpoints(out))
    for step, (x, y) in zip((1, 2, 3), unions):
        _union_gradient(model, x, y)
        if optimizer == "sgd":
            sgd.step()
        else:
            params, state = lars_step(_flat(model), _flat(model, "grad"), state, hyper, 0.1, shapes)
            runtime.set_parameters(params)
        over_broker = load_checkpoint(checkpoints[step]).params
        np.testing.assert_allclose(over_broker, _flat(model), rtol=1e-5, atol=2e-6)
    assert np.abs(_flat(model) - fleet_assets.initial_params).max() > 1e-3  # the steps really moved
    # After the first full model the downlink carried deltas, and every device stayed in sync.
    kinds = [m.payload_kind for _, m in sniffer.decoded(wire.Announcement)]
    assert kinds[0] == "params" and "delta" in kinds
    for d in devices:
        assert d.device.replica.version == 2  # it applied the delta of step 3's announcement (version 2)


def test_backup_workers_late_gradients_are_dropped_and_counted(broker: MosquittoBroker, fleet_assets: FleetAssets,
                                                               tmp_path: Path,
                                                               cleanup: list[Callable[[], None]]) -> None:
    config = broker_config(broker.url)
    devices = start_device_threads(config, fleet_assets, FLEET, tmp_path / "devices", [64, 64, 64])  # whole batches
    cleanup.extend(d.stop for d in devices)
    sniffer = Sniffer(config).subscribe(topics.status_filter(FLEET)).connect()
    cleanup.append(sniffer.close)
    sniffer.wait_online(FLEET, [f"dev-{i}" for i in range(3)])
    steps = 8
    records = AggregatorThread(config, fleet_assets, FLEET, tmp_path / "run", "--strategy", "large-batch",
                               "--steps", str(steps), "--fraction", "0.5", "--min-devices", "2", "--backup-devices",
                               "1", "--batch-size", str(BATCH), "--eval-examples", "100").start().join()
    # Two workers per step plus one backup: each step uses exactly the first two gradients.
    assert all((r.devices_chosen, r.devices_reported, r.total_examples) == (3, 2, 2 * BATCH) for r in records)
    late = sum(r.devices_rejected.get("late", 0) for r in records)
    assert steps - 1 <= late <= steps  # the last step's straggler may arrive after the run ended
    assert set().union(*(r.devices_rejected for r in records)) <= {"late"}


def test_killed_device_and_broker_restart_steps_go_on_nothing_double_counted(
        broker: MosquittoBroker, fleet_assets: FleetAssets, tmp_path: Path,
        cleanup: list[Callable[[], None]]) -> None:
    config = broker_config(broker.url)
    threads = start_device_threads(config, fleet_assets, FLEET, tmp_path / "devices", [64, 64])
    cleanup.extend(d.stop for d in threads)
    victim = spawn_device(broker.url, fleet_assets, FLEET, "victim", tmp_path / "devices", index=2, count=3, limit=64)
    cleanup.append(victim.kill)
    sniffer = Sniffer(config).subscribe(topics.status_filter(FLEET)).connect()
    cleanup.append(sniffer.close)
    sniffer.wait_online(FLEET, ["dev-0", "dev-1", "victim"])
    sniffer.close()
    steps = 40
    run = AggregatorThread(config, fleet_assets, FLEET, tmp_path / "run", "--strategy", "large-batch", "--steps",
                           str(steps), "--min-devices", "2", "--batch-size", str(BATCH), "--round-timeout", "6",
                           "--eval-examples", "100").start()
    cleanup.append(run.stop)
    steps_done = lambda: len(metrics(tmp_path / "run")) if (tmp_path / "run" / "metrics.jsonl").exists() else 0  # noqa: E731
    wait_for(lambda: steps_done() >= 5, "five steps")
    victim.signal(signal.SIGKILL)
    wait_for(lambda: steps_done() >= 15, "steps after the kill")
    broker.stop()
    broker.start()
    records = run.join(60)
    assert [r.round_id for r in records] == list(range(1, steps + 1))
    for r in records:  # never more gradients than devices asked, each a full batch, none counted twice
        assert r.devices_reported <= r.devices_chosen and r.total_examples == BATCH * r.devices_reported
        assert set(r.devices_rejected) <= {"duplicate", "late"}
    assert records[-1].devices_chosen == 2  # the killed device is no longer asked
    assert all(t.device.replica.version == steps - 1 for t in threads)  # survivors stayed in sync
