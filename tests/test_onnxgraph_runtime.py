"""Runtime onnxgraph: the standard-op training graph run by plain onnxruntime, against torch.

On x86 onnxruntime-training-cpu provides the same ``InferenceSession`` a board's plain onnxruntime
does, so the bundle a board trains is the one checked here: gradients, SGD steps (momentum, Nesterov,
weight decay, FedProx) and evaluation equal torch's on the same parameters and batches, and an
``edgetrain device`` on it trains in one fleet with a torch device over a real Mosquitto.
"""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
from dataclasses import replace
from pathlib import Path
from typing import Callable

import numpy as np
import pytest

from edgetrain.sdk import topics, wire
from edgetrain.sdk.bundle import load_manifest, read_initial_parameters, sha256_file
from edgetrain.sdk.codecs import get_codec, parse_codec_spec
from edgetrain.sdk.data import PartitionSpec
from edgetrain.sdk.device import DeviceConfig, LocalData, round_batches
from edgetrain.sdk.errors import BundleError, ConfigError
from edgetrain.sdk.runtime import Runtime, TrainConfig, load_runtime, runtime_available
from tests.fleet import (AggregatorThread, DeviceThread, FleetAssets, Sniffer, broker_config,  # noqa: F401
                         cleanup, fleet_assets, make_device, spawn_device, wait_for)
from tests.mosquitto import MosquittoBroker

pytestmark = pytest.mark.skipif(not (runtime_available("onnxgraph") and runtime_available("torch")),
                                reason="needs torch and onnxruntime")

TOLERANCE = 1e-5


@pytest.fixture(scope="module")
def bundles(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The reference cnn (convolutions: the decomposed backward) and a tiny mlp, torch and onnxgraph."""
    from edgetrain.export.bundle_writer import export_bundle

    root = tmp_path_factory.mktemp("onnxgraph")
    out = {}
    for model, config in (("cnn", None), ("mlp", {"hidden": [32]})):
        for runtime in ("torch", "onnxgraph"):
            out[model, runtime] = root / model / runtime
            export_bundle(model, config, out_dir=out[model, runtime], runtime=runtime, seed=3)
    return out


def _pair(bundles: dict[str, Path], model: str) -> tuple[Runtime, Runtime]:
    return load_runtime(bundles[model, "onnxgraph"]), load_runtime(bundles[model, "torch"])


def _batch(size: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return rng.normal(size=(size, 1, 28, 28)).astype(np.float32), rng.integers(0, 10, size)


def _relative_error(actual: np.ndarray, expected: np.ndarray) -> float:
    return float(np.linalg.norm(actual.astype(np.float64) - expected) / np.linalg.norm(expected))


def test_bundle_holds_standard_op_graphs_in_manifest_layout(bundles: dict[str, Path]) -> None:
    import onnx

    manifest = load_manifest(bundles["cnn", "onnxgraph"])
    assert manifest.runtime == "onnxgraph"
    assert manifest.params == load_manifest(bundles["cnn", "torch"]).params
    np.testing.assert_array_equal(read_initial_parameters(bundles["cnn", "onnxgraph"], manifest),
                                  read_initial_parameters(bundles["cnn", "torch"], load_manifest(bundles["cnn", "torch"])))
    graph = onnx.load(str(bundles["cnn", "onnxgraph"] / "train_step.onnx")).graph
    assert [i.name for i in graph.input] == ["x", "y", *(p.name for p in manifest.params)]
    domains = {node.domain for node in graph.node}
    assert domains <= {"", "ai.onnx"}, f"non-standard op domains {domains}"  # plain onnxruntime runs it
    assert {"Conv", "ConvTranspose"} <= {node.op_type for node in graph.node}
    assert manifest.runtime_info["export_gradient_check_rel_error"] < 1e-4


@pytest.mark.parametrize("model", ["cnn", "mlp"])
@pytest.mark.parametrize("size", [1, 7, 32])
def test_gradient_and_loss_match_torch(bundles: dict[str, Path], model: str, size: int) -> None:
    graph, reference = _pair(bundles, model)
    x, y = _batch(size, seed=size)
    got, expected = graph.gradient(x, y), reference.gradient(x, y)
    assert got.examples == expected.examples == size
    assert got.loss == pytest.approx(expected.loss, rel=TOLERANCE)
    assert _relative_error(got.gradient, expected.gradient) < TOLERANCE
    np.testing.assert_array_equal(graph.get_parameters(), reference.get_parameters())  # no step taken


@pytest.mark.parametrize("kernel_size", [1, 3, 7])
def test_convolution_gradients_match_torch_for_other_kernels(kernel_size: int, tmp_path: Path) -> None:
    # the weight-gradient Conv pads to exactly the kernel: kernel 3 and 7 need 0 and 2 trailing rows,
    # kernel 1 (no padding, stride 2 over 28 drops the last row) needs the overshoot cropped
    from edgetrain.export.bundle_writer import export_bundle

    config = {"channels": [4, 8], "kernel_size": kernel_size, "hidden": 16}
    for runtime in ("torch", "onnxgraph"):
        export_bundle("cnn", config, out_dir=tmp_path / runtime, runtime=runtime, seed=4)
    graph, reference = load_runtime(tmp_path / "onnxgraph"), load_runtime(tmp_path / "torch")
    x, y = _batch(9, seed=kernel_size)
    got, expected = graph.gradient(x, y), reference.gradient(x, y)
    assert got.loss == pytest.approx(expected.loss, rel=TOLERANCE)
    assert _relative_error(got.gradient, expected.gradient) < TOLERANCE


@pytest.mark.parametrize("config", [
    TrainConfig(lr=0.05),
    TrainConfig(lr=0.05, momentum=0.9, weight_decay=1e-3),
    TrainConfig(lr=0.02, momentum=0.9, nesterov=True, prox_mu=0.1),
], ids=["sgd", "momentum-wd", "nesterov-fedprox"])
@pytest.mark.parametrize("model", ["cnn", "mlp"])
def test_sgd_steps_match_torch(bundles: dict[str, Path], model: str, config: TrainConfig) -> None:
    graph, reference = _pair(bundles, model)
    start = reference.get_parameters()
    x, y = _batch(44, seed=5)
    batches = [(x[i:i + 16], y[i:i + 16]) for i in range(0, 44, 16)]  # 16, 16 and a short 12
    got, expected = graph.train(batches, config), reference.train(batches, config)
    assert (got.steps, got.examples) == (expected.steps, expected.examples) == (3, 44)
    assert got.mean_loss == pytest.approx(expected.mean_loss, rel=TOLERANCE)
    moved = reference.get_parameters().astype(np.float64) - start
    assert np.linalg.norm(moved) > 0
    assert _relative_error(graph.get_parameters() - start, moved) < TOLERANCE
    # a second call starts a fresh optimiser (no momentum carried across rounds), as torch's does
    graph.train(batches[:1], config)
    reference.train(batches[:1], config)
    assert _relative_error(graph.get_parameters() - start, reference.get_parameters().astype(np.float64) - start) \
        < TOLERANCE


def test_plain_sgd_steps_in_place_bit_for_bit_as_the_sdk_kernel(bundles: dict[str, Path]) -> None:
    from edgetrain.sdk.optim import SGD, SGDHyper

    graph = load_runtime(bundles["cnn", "onnxgraph"])
    start = graph.get_parameters()
    x, y = _batch(16, seed=21)
    expected = SGD(SGDHyper(lr=0.05), start).step(start, graph.gradient(x, y).gradient)
    graph.train([(x, y)], TrainConfig(lr=0.05))
    assert not np.array_equal(expected, start)
    np.testing.assert_array_equal(graph.get_parameters(), expected)


def test_evaluate_and_set_parameters_match_torch(bundles: dict[str, Path]) -> None:
    graph, reference = _pair(bundles, "cnn")
    rng = np.random.default_rng(11)
    flat = (graph.get_parameters() + rng.normal(0, 0.01, graph.manifest.num_params)).astype(np.float32)
    graph.set_parameters(flat)
    reference.set_parameters(flat)
    np.testing.assert_array_equal(graph.get_parameters(), flat)
    x, y = _batch(50, seed=9)
    got, expected = graph.evaluate(x, y, batch_size=16), reference.evaluate(x, y, batch_size=16)
    assert got.examples == 50 and got.accuracy == expected.accuracy
    assert got.loss == pytest.approx(expected.loss, rel=TOLERANCE)
    with pytest.raises(BundleError):
        graph.set_parameters(flat[:-1])


def test_a_device_process_trains_without_importing_torch(bundles: dict[str, Path]) -> None:
    # on x86 the onnxruntime-training-cpu build would import torch at `import onnxruntime`
    script = ("import sys, numpy as np\n"
              "from edgetrain.sdk.runtime import TrainConfig, load_runtime\n"
              f"runtime = load_runtime({str(bundles['cnn', 'onnxgraph'])!r})\n"
              "x, y = np.zeros((4, 1, 28, 28), np.float32), np.arange(4)\n"
              "runtime.train([(x, y)], TrainConfig(lr=0.1, momentum=0.9))\n"
              "print(runtime.name, 'torch' in sys.modules)\n")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split() == ["onnxgraph", "False"]


def test_set_threads_keeps_parameters(bundles: dict[str, Path]) -> None:
    graph, _ = _pair(bundles, "mlp")
    x, y = _batch(8, seed=1)
    graph.train([(x, y)], TrainConfig(lr=0.1))
    before = graph.get_parameters()
    graph.set_threads(1)
    np.testing.assert_array_equal(graph.get_parameters(), before)
    with pytest.raises(ConfigError):
        graph.set_threads(0)


def _copy_bundle(source: Path, target: Path) -> Path:
    shutil.copytree(source, target)
    return target


def _rewrite_manifest(bundle: Path, change: Callable[[dict], None]) -> None:
    path = bundle / "manifest.json"
    raw = json.loads(path.read_text())
    change(raw)
    path.write_text(json.dumps(raw))


def test_refuses_a_graph_not_listed_in_the_manifest(bundles: dict[str, Path], tmp_path: Path) -> None:
    bundle = _copy_bundle(bundles["mlp", "onnxgraph"], tmp_path / "b")
    shutil.copy(bundle / "eval.onnx", bundle / "other.onnx")
    _rewrite_manifest(bundle, lambda raw: raw["runtime_info"]["graphs"].update(train_step="other.onnx"))
    with pytest.raises(BundleError, match="not a file listed"):
        load_runtime(bundle)


def test_refuses_graphs_whose_inputs_are_not_the_manifest_layout(bundles: dict[str, Path], tmp_path: Path) -> None:
    # the mlp's graphs put into the cnn's bundle (hashes updated): loads nothing in the wrong layout
    bundle = _copy_bundle(bundles["cnn", "onnxgraph"], tmp_path / "b")
    for name in ("train_step.onnx", "eval.onnx"):
        shutil.copy(bundles["mlp", "onnxgraph"] / name, bundle / name)
    _rewrite_manifest(bundle, lambda raw: raw["files"].update(
        {name: sha256_file(bundle / name) for name in ("train_step.onnx", "eval.onnx")}))
    with pytest.raises(BundleError, match="inputs"):
        load_runtime(bundle)


def test_export_refuses_batchnorm(tmp_path: Path) -> None:
    from edgetrain.export.bundle_writer import export_bundle

    with pytest.raises(ConfigError, match="running statistics"):
        export_bundle("cnn", {"norm": "batch"}, out_dir=tmp_path / "b", runtime="onnxgraph")
    assert not (tmp_path / "b").exists() or not any((tmp_path / "b").iterdir())


# -- a mixed fleet over a real Mosquitto ---------------------------------------------------------
FLEET = "graph-mixed"
LIMITS = {"torch": 64, "onnxgraph": 40}
INDEX = {"torch": 0, "onnxgraph": 1}
DEVICE_ID = {"torch": "dev-torch", "onnxgraph": "dev-graph"}


def test_onnxgraph_device_trains_in_a_fleet_with_a_torch_device(
        broker: MosquittoBroker, fleet_assets: FleetAssets, tmp_path: Path,
        cleanup: list[Callable[[], None]]) -> None:
    from edgetrain.aggregator.checkpoint import list_checkpoints, load_checkpoint
    from edgetrain.export.bundle_writer import export_bundle

    root = tmp_path / "bundle"
    for runtime in ("torch", "onnxgraph"):  # fleet_assets' tiny mlp, as an 'export --runtime all' directory
        export_bundle("mlp", {"hidden": [32]}, out_dir=root / runtime, runtime=runtime, seed=0,
                      optimizer={"name": "sgd"})
    assets = replace(fleet_assets, bundle=root)
    config = broker_config(broker.url)
    sniffer = Sniffer(config).subscribe(topics.update_filter(FLEET), topics.status_filter(FLEET),
                                        topics.announce_topic(FLEET)).connect()
    cleanup.append(sniffer.close)
    torch_device = DeviceThread(make_device(config, replace(assets, bundle=root / "torch"), FLEET, DEVICE_ID["torch"],
                                            tmp_path / DEVICE_ID["torch"], index=INDEX["torch"], count=2,
                                            limit=LIMITS["torch"])).start()
    cleanup.append(torch_device.stop)
    graph_device = spawn_device(broker.url, assets, FLEET, DEVICE_ID["onnxgraph"], tmp_path / "devices",
                                index=INDEX["onnxgraph"], count=2, limit=LIMITS["onnxgraph"],
                                extra=["--runtime", "onnxgraph"])
    cleanup.append(graph_device.kill)
    # a device subprocess starts in seconds, but a board-in-a-box run beside it can slow that a lot
    wait_for(lambda: all((s := sniffer.latest_status(FLEET, d)) is not None and s.online for d in DEVICE_ID.values()),
             "both devices online", timeout_s=180)
    records = AggregatorThread(config, replace(assets, bundle=root / "torch"), FLEET, tmp_path / "run", "--rounds",
                               "2", "--min-devices", "2", "--round-timeout", "30", "--eval-examples", "200",
                               "--batch-size", "8").start().join()

    assert [(r.round_id, r.devices_reported, r.total_examples) for r in records] == [(1, 2, 104), (2, 2, 104)]
    assert all(dict(r.devices_rejected) == {} for r in records)
    assert "runtime onnxgraph" in graph_device.log()
    # round 1 replayed by torch on the onnxgraph device's batches: its delta is torch's local SGD
    announcement = next(m for _, m in sniffer.decoded(wire.Announcement) if m.round_id == 1)
    settings = announcement.settings
    assert settings.momentum > 0
    reference = load_runtime(root / "torch")
    start = reference.get_parameters()
    data_config = DeviceConfig(fleet=FLEET, device_id=DEVICE_ID["onnxgraph"], state_dir=tmp_path / "replay",
                               partition=PartitionSpec.parse("iid"), partition_index=INDEX["onnxgraph"],
                               partition_count=2)
    data = LocalData.load(data_config, reference, assets.data_dir, limit=LIMITS["onnxgraph"])
    reference.train(round_batches(data, settings, np.random.default_rng([0, INDEX["onnxgraph"], 1])),
                    TrainConfig(lr=settings.lr, momentum=settings.momentum))
    expected = reference.get_parameters().astype(np.float64) - start
    update = next(u for _, u in sniffer.decoded(wire.Update)
                  if u.round_id == 1 and u.device_id == DEVICE_ID["onnxgraph"])
    name, params = parse_codec_spec(update.codec)
    delta = get_codec(name).decode(update.payload, start.size, params)
    assert update.num_examples == LIMITS["onnxgraph"]
    assert _relative_error(delta, expected) < TOLERANCE
    assert load_checkpoint(dict(list_checkpoints(tmp_path / "run"))[2]).params.shape == start.shape
