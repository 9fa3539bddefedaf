"""Bundle export → manifest → runtime round trip, and the refusals that guard it."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from edgetrain.export.bundle_writer import BUFFERS_NAME, _exportable_buffers, export_bundle  # noqa: E402
from edgetrain.sdk.models import build_model  # noqa: E402
from edgetrain.sdk.bundle import MANIFEST_NAME, WEIGHTS_NAME, load_manifest, sha256_file  # noqa: E402
from edgetrain.sdk.data import FASHION_MNIST_MEAN, FASHION_MNIST_STD  # noqa: E402
from edgetrain.sdk.errors import BundleError, ConfigError  # noqa: E402
from edgetrain.sdk.runtime import load_runtime  # noqa: E402


def _flat(model: torch.nn.Module) -> np.ndarray:
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()]).numpy()


@pytest.mark.parametrize("name,config", [("mlp", {"hidden": [32, 16]}), ("cnn", None), ("cnn", {"norm": "group"})])
def test_round_trip_gives_the_exported_weights(tmp_path: Path, name: str, config: dict | None) -> None:
    written = export_bundle(name, config, out_dir=tmp_path / "b", seed=3)
    manifest = load_manifest(tmp_path / "b")
    assert manifest == written
    assert manifest.input_shape == (1, 28, 28) and manifest.num_classes == 10
    assert (manifest.input_mean, manifest.input_std) == (FASHION_MNIST_MEAN, FASHION_MNIST_STD)
    assert manifest.files == {WEIGHTS_NAME: sha256_file(tmp_path / "b" / WEIGHTS_NAME)}
    reference = build_model(name, config, seed=3)
    assert [p.name for p in manifest.params] == [n for n, _ in reference.named_parameters()]
    runtime = load_runtime(tmp_path / "b")
    np.testing.assert_array_equal(runtime.get_parameters(), _flat(reference))
    assert runtime.get_parameters().size == manifest.num_params


def test_optimizer_settings_are_stored_and_checked(tmp_path: Path) -> None:
    manifest = export_bundle("mlp", {"hidden": [8]}, out_dir=tmp_path / "b", optimizer={"lr": 0.2, "momentum": 0.5})
    assert manifest.optimizer["lr"] == 0.2 and manifest.optimizer["momentum"] == 0.5
    assert load_manifest(tmp_path / "b").optimizer == manifest.optimizer
    with pytest.raises(ConfigError, match="learning rate"):
        export_bundle("mlp", {"hidden": [8]}, out_dir=tmp_path / "c", optimizer={"lr": -1.0})
    with pytest.raises(ConfigError, match="adam"):
        export_bundle("mlp", {"hidden": [8]}, out_dir=tmp_path / "c", optimizer={"name": "adam"})


def test_batchnorm_statistics_travel_in_their_own_file(tmp_path: Path) -> None:
    manifest = export_bundle("cnn", {"norm": "batch"}, out_dir=tmp_path / "b", seed=1)
    assert set(manifest.files) == {WEIGHTS_NAME, BUFFERS_NAME}
    assert manifest.runtime_info["buffers_file"] == BUFFERS_NAME
    assert "norm1.running_var" in manifest.runtime_info["buffers"]
    # running stats are buffers, not parameters: they stay out of the flat vector
    assert not any("running" in p.name for p in manifest.params)
    # change the statistics in the file (and its hash) to prove the runtime loads them
    from safetensors.numpy import load_file, save_file

    path = tmp_path / "b" / BUFFERS_NAME
    tensors = load_file(str(path))
    tensors["norm1.running_mean"] = np.full_like(tensors["norm1.running_mean"], 0.25)
    save_file(tensors, str(path))
    raw = json.loads((tmp_path / "b" / MANIFEST_NAME).read_text())
    raw["files"][BUFFERS_NAME] = sha256_file(path)
    (tmp_path / "b" / MANIFEST_NAME).write_text(json.dumps(raw))
    runtime = load_runtime(tmp_path / "b")
    running_mean = dict(runtime.model.named_buffers())["norm1.running_mean"]
    assert torch.all(running_mean == 0.25)


def test_tampered_weights_fail_the_hash_check(tmp_path: Path) -> None:
    export_bundle("mlp", {"hidden": [8]}, out_dir=tmp_path / "b")
    weights = tmp_path / "b" / WEIGHTS_NAME
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.raises(BundleError, match="sha256"):
        load_manifest(tmp_path / "b")
    with pytest.raises(BundleError, match="sha256"):
        load_runtime(tmp_path / "b")


def test_wrong_format_version_is_refused(tmp_path: Path) -> None:
    export_bundle("mlp", {"hidden": [8]}, out_dir=tmp_path / "b")
    path = tmp_path / "b" / MANIFEST_NAME
    raw = json.loads(path.read_text())
    raw["format_version"] = raw["format_version"] + 1
    path.write_text(json.dumps(raw))
    with pytest.raises(BundleError, match="format version"):
        load_runtime(tmp_path / "b")


def test_manifest_layout_that_does_not_match_the_model_is_refused(tmp_path: Path) -> None:
    export_bundle("mlp", {"hidden": [8]}, out_dir=tmp_path / "b")
    path = tmp_path / "b" / MANIFEST_NAME
    raw = json.loads(path.read_text())
    raw["model_config"]["hidden"] = [9]  # the weights file still holds the 8-wide layer
    path.write_text(json.dumps(raw))
    with pytest.raises(BundleError, match="parameter layout"):
        load_runtime(tmp_path / "b")


def test_refuses_a_non_empty_directory_that_is_not_a_bundle(tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(ConfigError, match="not empty"):
        export_bundle("mlp", None, out_dir=tmp_path)
    assert (tmp_path / "notes.txt").read_text() == "mine"


def test_re_export_over_a_bundle_replaces_it(tmp_path: Path) -> None:
    export_bundle("cnn", {"norm": "batch"}, out_dir=tmp_path / "b")
    manifest = export_bundle("cnn", {"norm": "none"}, out_dir=tmp_path / "b", seed=4)
    assert not (tmp_path / "b" / BUFFERS_NAME).exists()  # stale statistics would mislead
    assert load_manifest(tmp_path / "b") == manifest
    np.testing.assert_array_equal(load_runtime(tmp_path / "b").get_parameters(),
                                  _flat(build_model("cnn", None, seed=4)))


def test_unknown_runtimes_are_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="tflite"):
        export_bundle("mlp", None, out_dir=tmp_path / "b", runtime="tflite")
    assert not (tmp_path / "b").exists()


def test_buffers_other_than_batchnorm_statistics_are_refused() -> None:
    model = torch.nn.Linear(2, 2)
    model.register_buffer("step_count", torch.zeros(1))
    with pytest.raises(ConfigError, match="step_count"):
        _exportable_buffers(model, "custom")
    assert set(_exportable_buffers(torch.nn.BatchNorm1d(3), "bn")) == {
        "running_mean", "running_var", "num_batches_tracked"}
