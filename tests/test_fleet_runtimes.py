"""Mixed fleets: a torch device and an ONNX Runtime device train one model over a real Mosquitto.

Mixing runtimes is valid only if they compute the same thing: every bundle shares one flat parameter
layout, so what crosses the broker is runtime-independent, and an ORT gradient or local-SGD delta
must equal torch's on the same parameters and batches (to float tolerance). These tests check that
over the broker, for FedAvg (McMahan et al. 2017) and for Large Batch Training (one averaged gradient
per step), and run ``edgetrain simulate --runtime mixed`` at CI size.
"""
from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path
from typing import Callable

import numpy as np
import pytest

from edgetrain.aggregator.checkpoint import list_checkpoints, load_checkpoint
from edgetrain.aggregator.results import SUMMARY_FILE
from edgetrain.sdk import topics, wire
from edgetrain.sdk.codecs import get_codec, parse_codec_spec
from edgetrain.sdk.data import PartitionSpec
from edgetrain.sdk.device import DeviceConfig, LocalData, gradient_batches, round_batches
from edgetrain.sdk.runtime import Runtime, TrainConfig, load_runtime, runtime_available
from tests.fleet import (AggregatorThread, DeviceThread, FleetAssets, ProcessHandle, Sniffer,  # noqa: F401
                         broker_config, cleanup, fleet_assets, make_device, metrics, spawn_cli, spawn_device)
from tests.mosquitto import MosquittoBroker, find_mosquitto

pytestmark = pytest.mark.skipif(not (runtime_available("onnx") and runtime_available("torch")),
                                reason="needs torch and onnxruntime-training")

FLEET = "mixed"
HIDDEN = 32
LIMITS = {"torch": 64, "onnx": 24}  # different example counts, so the weights matter
INDEX = {"torch": 0, "onnx": 1}
DEVICE_ID = {"torch": "dev-torch", "onnx": "dev-onnx"}
BATCH = 32


@pytest.fixture(scope="module")
def mixed_assets(fleet_assets: FleetAssets, tmp_path_factory: pytest.TempPathFactory) -> FleetAssets:
    """The tests' tiny mlp as torch/ and onnx/ sub-bundles of one directory, like ``export --runtime all``."""
    from edgetrain.export.bundle_writer import export_bundle
    from edgetrain.sdk.bundle import load_manifest, read_initial_parameters

    root = tmp_path_factory.mktemp("mixed-bundle")
    for runtime in ("torch", "onnx"):
        export_bundle("mlp", {"hidden": [HIDDEN]}, out_dir=root / runtime, runtime=runtime, seed=0,
                      optimizer={"name": "sgd"})
    torch_params = read_initial_parameters(root / "torch", load_manifest(root / "torch"))
    np.testing.assert_array_equal(torch_params, read_initial_parameters(root / "onnx", load_manifest(root / "onnx")))
    return replace(fleet_assets, bundle=root, initial_params=torch_params, num_params=torch_params.size)


def _start_fleet(broker: MosquittoBroker, assets: FleetAssets, root: Path,
                 cleanup: list[Callable[[], None]]) -> tuple[Sniffer, ProcessHandle]:
    """A torch device on a thread and ``edgetrain device --runtime onnx`` as a subprocess, both on the
    multi-runtime directory; returns once both are online, with a sniffer on updates and announcements."""
    config = broker_config(broker.url)
    sniffer = Sniffer(config).subscribe(topics.update_filter(FLEET), topics.status_filter(FLEET),
                                        topics.announce_topic(FLEET)).connect()
    cleanup.append(sniffer.close)
    torch_device = DeviceThread(make_device(config, replace(assets, bundle=assets.bundle / "torch"), FLEET,
                                            DEVICE_ID["torch"], root / DEVICE_ID["torch"], index=INDEX["torch"],
                                            count=2, limit=LIMITS["torch"])).start()
    cleanup.append(torch_device.stop)
    assert torch_device.device.runtime.name == "torch"
    ort_device = spawn_device(broker.url, assets, FLEET, DEVICE_ID["onnx"], root, index=INDEX["onnx"], count=2,
                              limit=LIMITS["onnx"], extra=["--runtime", "onnx"])
    cleanup.append(ort_device.kill)
    sniffer.wait_online(FLEET, list(DEVICE_ID.values()))
    return sniffer, ort_device


def _local_data(assets: FleetAssets, runtime: Runtime, kind: str, tmp_path: Path) -> LocalData:
    """Exactly the examples the ``kind`` device holds."""
    config = DeviceConfig(fleet=FLEET, device_id=DEVICE_ID[kind], state_dir=tmp_path / "replay",
                          partition=PartitionSpec.parse("iid"), partition_index=INDEX[kind], partition_count=2)
    return LocalData.load(config, runtime, assets.data_dir, limit=LIMITS[kind])


def _runtimes(assets: FleetAssets) -> dict[str, Runtime]:
    return {kind: load_runtime(assets.bundle, prefer=kind) for kind in ("torch", "onnx")}


def _sniffed(sniffer: Sniffer, round_id: int, num_params: int) -> dict[str, tuple[int, np.ndarray]]:
    """device -> (num_examples, decoded update vector) for ``round_id``'s updates seen on the broker."""
    found = {}
    for _, update in sniffer.decoded(wire.Update, topics.update_filter(FLEET)[:-1]):
        assert isinstance(update, wire.Update)
        if update.round_id == round_id:
            name, params = parse_codec_spec(update.codec)
            found[update.device_id] = (update.num_examples, get_codec(name).decode(update.payload, num_params, params))
    return found


def _relative_error(actual: np.ndarray, expected: np.ndarray) -> float:
    return float(np.linalg.norm(actual.astype(np.float64) - expected) / np.linalg.norm(expected))


def test_mixed_fedavg_rounds_accept_all_and_ort_deltas_match_torch(
        broker: MosquittoBroker, mixed_assets: FleetAssets, tmp_path: Path,
        cleanup: list[Callable[[], None]]) -> None:
    sniffer, ort_device = _start_fleet(broker, mixed_assets, tmp_path / "devices", cleanup)
    out = tmp_path / "run"
    records = AggregatorThread(broker_config(broker.url), mixed_assets, FLEET, out, "--rounds", "2",
                               "--min-devices", "2", "--round-timeout", "20", "--eval-examples", "200",
                               "--batch-size", "8").start().join()

    assert [(r.round_id, r.devices_chosen, r.devices_reported) for r in records] == [(1, 2, 2), (2, 2, 2)]
    assert all(dict(r.devices_rejected) == {} and r.total_examples == sum(LIMITS.values()) for r in records)
    assert "runtime onnx" in ort_device.log()
    # Round 1, replayed in-process: each device's delta equals local SGD with momentum (the default 0.9)
    # by *torch* on that device's batches — for the ORT device that is ORT's gradients + numpy momentum.
    announcement = next(m for _, m in sniffer.decoded(wire.Announcement) if m.round_id == 1)
    settings = announcement.settings
    assert settings.momentum > 0 and settings.batch_size == 8
    config = TrainConfig(lr=settings.lr, momentum=settings.momentum)
    torch_runtime = load_runtime(mixed_assets.bundle, prefer="torch")
    updates = _sniffed(sniffer, 1, mixed_assets.num_params)
    for kind in ("torch", "onnx"):
        torch_runtime.set_parameters(mixed_assets.initial_params)
        rng = np.random.default_rng([0, INDEX[kind], 1])  # the device's seed, index and round
        torch_runtime.train(round_batches(_local_data(mixed_assets, torch_runtime, kind, tmp_path), settings, rng), config)
        expected = torch_runtime.get_parameters().astype(np.float64) - mixed_assets.initial_params
        examples, delta = updates[DEVICE_ID[kind]]
        assert examples == LIMITS[kind]
        assert _relative_error(delta, expected) < 1e-5, kind
    counts = np.array([updates[DEVICE_ID[k]][0] for k in ("torch", "onnx")], dtype=np.float64)
    deltas = np.stack([updates[DEVICE_ID[k]][1] for k in ("torch", "onnx")]).astype(np.float64)
    checkpoint = load_checkpoint(dict(list_checkpoints(out))[1])
    np.testing.assert_allclose(checkpoint.params, mixed_assets.initial_params + counts @ deltas / counts.sum(),
                               rtol=0, atol=1e-6)
    assert records[-1].accuracy is not None and records[-1].accuracy > 0.3  # learnable tiny set, 10 classes


def test_mixed_large_batch_step_is_the_weighted_mean_of_torch_and_ort_gradients(
        broker: MosquittoBroker, mixed_assets: FleetAssets, tmp_path: Path,
        cleanup: list[Callable[[], None]]) -> None:
    _, ort_device = _start_fleet(broker, mixed_assets, tmp_path / "devices", cleanup)
    out = tmp_path / "run"
    lr = 1.0  # plain SGD, lr 1: the first step's parameter change is the aggregated gradient itself
    records = AggregatorThread(broker_config(broker.url), mixed_assets, FLEET, out, "--strategy", "large-batch",
                               "--steps", "3", "--min-devices", "2", "--batch-size", str(BATCH), "--lr", str(lr),
                               "--momentum", "0", "--eval-every", "3", "--checkpoint-every", "1",
                               "--eval-examples", "100").start().join()

    # The torch device gives a full batch each step, the ORT device all its 24 examples (less than a batch).
    assert [(r.devices_reported, r.total_examples) for r in records] == [(2, BATCH + LIMITS["onnx"])] * 3
    assert all(dict(r.devices_rejected) == {} for r in records)
    assert "runtime onnx" in ort_device.log()

    runtimes = _runtimes(mixed_assets)
    gradients, counts = [], []
    for kind, runtime in runtimes.items():
        runtime.set_parameters(mixed_assets.initial_params)
        x, y = next(gradient_batches(_local_data(mixed_assets, runtime, kind, tmp_path), BATCH, (0, INDEX[kind])))
        result = runtime.gradient(x, y)
        gradients.append(result.gradient.astype(np.float64))
        counts.append(result.examples)
        # the parity that makes a mixed fleet valid: the other runtime agrees on this very batch
        other = runtimes["onnx" if kind == "torch" else "torch"]
        other.set_parameters(mixed_assets.initial_params)
        assert _relative_error(other.gradient(x, y).gradient, gradients[-1]) < 1e-5, kind
    assert counts == [BATCH, LIMITS["onnx"]]
    expected = np.average(np.stack(gradients), axis=0, weights=counts)
    step_1 = load_checkpoint(dict(list_checkpoints(out))[1]).params.astype(np.float64)
    aggregated = (mixed_assets.initial_params - step_1) / lr
    assert _relative_error(aggregated, expected) < 1e-5
    # Not vacuous: an unweighted mean of the same gradients is measurably elsewhere.
    assert _relative_error(np.mean(gradients, axis=0), expected) > 1e-3


@pytest.mark.broker
def test_simulate_mixed_ci_size_alternates_torch_and_onnx(fleet_assets: FleetAssets, tmp_path: Path) -> None:
    if find_mosquitto() is None:
        pytest.skip("mosquitto not installed")
    out = tmp_path / "run"
    done = spawn_cli(["simulate", "--runtime", "mixed", "--model", "mlp", "--devices", "2", "--rounds", "2",
                      "--limit-examples", "100", "--eval-examples", "100", "--data-dir", fleet_assets.data_dir,
                      "--out", out, "--round-timeout", "30", "--join-timeout", "60"], tmp_path / "simulate.log")
    assert done.wait(120) == 0, done.log()[-3000:]

    assert sorted(p.name for p in (out / "bundle").iterdir()) == ["onnx", "torch"]
    records = metrics(out)
    assert [(r.round_id, r.devices_reported, r.total_examples) for r in records] == [(1, 2, 200), (2, 2, 200)]
    summary = json.loads((out / SUMMARY_FILE).read_text())
    assert summary["num_rounds"] == 2 and summary["updates_accepted"] == 4
    for i, runtime in enumerate(("torch", "onnx")):  # even index torch, odd onnx
        log = (out / "devices" / f"dev-{i:03d}.log").read_text()
        assert f"runtime {runtime} (bundle {out / 'bundle' / runtime})" in log, log[-2000:]
        assert "stopped after training 2 round(s)" in log and "Traceback" not in log
