"""Exporting ONNX Runtime and ExecuTorch bundles: what is refused (and why), what is checked on load,
and the multi-runtime directory that ``load_runtime(prefer="auto")`` picks from."""
from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("onnxruntime.training", reason="onnxruntime-training-cpu==1.19.2 not installed (extra 'ort')")
pytest.importorskip("onnxscript", reason="onnxscript not installed (extra 'export')")
pytest.importorskip("executorch", reason="executorch==1.5.1 not installed (extra 'executorch')")

from torch import nn  # noqa: E402

from edgetrain.export import executorch_export, onnx_export  # noqa: E402
from edgetrain.export.bundle_writer import export_bundle  # noqa: E402
from edgetrain.sdk import runtime as runtime_module  # noqa: E402
from edgetrain.sdk.bundle import MANIFEST_NAME, load_manifest  # noqa: E402
from edgetrain.cli import main  # noqa: E402
from edgetrain.sdk.errors import BundleError, ConfigError  # noqa: E402
from edgetrain.sdk.runtime import load_runtime, select_bundle  # noqa: E402

SMALL_CNN = {"channels": [8, 8], "kernel_size": 3, "hidden": 16}


def _pooled(pool: nn.Module) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), pool, nn.Flatten(), nn.Linear(4 * 14 * 14, 10))


@pytest.mark.parametrize("pool,needle", [(nn.MaxPool2d(2), "MaxPool"), (nn.AvgPool2d(2), "AvgPool")])
def test_executorch_refuses_pooling_with_the_reason(pool: nn.Module, needle: str) -> None:
    with pytest.raises(ConfigError, match=needle):
        executorch_export.build_training_program(_pooled(pool), batch_size=4)


@pytest.mark.parametrize("pool,needle", [(nn.MaxPool2d(2), "differs from torch autograd"),
                                         (nn.AvgPool2d(2), "fails to run")])
def test_the_measured_check_alone_catches_the_broken_pooling_backward(monkeypatch: pytest.MonkeyPatch,
                                                                    pool: nn.Module, needle: str) -> None:
    # without the list of known-bad layers, running the program against autograd still refuses them
    monkeypatch.setattr(executorch_export, "UNSUPPORTED_MODULES", {})
    with pytest.raises(ConfigError, match=needle):
        executorch_export.build_training_program(_pooled(pool), batch_size=4)


def test_norms_per_runtime(tmp_path: Path) -> None:
    # measured: ExecuTorch trains GroupNorm correctly but cannot export BatchNorm; ORT 1.19.2 neither
    export_bundle("cnn", {**SMALL_CNN, "norm": "group"}, out_dir=tmp_path / "et-group", runtime="executorch",
                  batch_size=4)
    assert load_manifest(tmp_path / "et-group").fixed_batch_size == 4
    for runtime, norm, needle in [("executorch", "batch", "BatchNorm"), ("onnx", "batch", "BatchNorm"),
                                  ("onnx", "group", "GroupNorm")]:
        with pytest.raises(ConfigError, match=needle):
            export_bundle("cnn", {**SMALL_CNN, "norm": norm}, out_dir=tmp_path / "refused", runtime=runtime)
        assert not (tmp_path / "refused" / MANIFEST_NAME).exists()


def test_ort_itself_refuses_groupnorm_without_the_list(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr(onnx_export, "UNSUPPORTED_MODULES", {})
    with pytest.raises(ConfigError, match="runtime onnx"):
        export_bundle("cnn", {**SMALL_CNN, "norm": "group"}, out_dir=tmp_path / "b", runtime="onnx")
    # no half bundle left behind: the same directory takes a good export afterwards
    assert not (tmp_path / "b" / MANIFEST_NAME).exists()
    monkeypatch.undo()
    export_bundle("mlp", {"hidden": [8]}, out_dir=tmp_path / "b", runtime="onnx")
    assert load_manifest(tmp_path / "b").runtime == "onnx"


@pytest.mark.parametrize("artifact", ["training_model.onnx", "checkpoint", "optimizer_model.onnx"])
def test_tampered_ort_artifact_is_refused(tmp_path: Path, artifact: str) -> None:
    export_bundle("mlp", {"hidden": [8]}, out_dir=tmp_path / "b", runtime="onnx")
    load_runtime(tmp_path / "b")  # loads while intact
    path = tmp_path / "b" / artifact
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))
    with pytest.raises(BundleError, match=artifact):
        load_runtime(tmp_path / "b")


def test_adamw_is_onnx_only(tmp_path: Path) -> None:
    for runtime in ("torch", "executorch"):
        with pytest.raises(ConfigError, match="adamw"):
            export_bundle("mlp", None, out_dir=tmp_path / runtime, runtime=runtime, optimizer={"name": "adamw"})
    with pytest.raises(ConfigError, match="fixed batch size"):
        export_bundle("mlp", None, out_dir=tmp_path / "o", runtime="onnx", batch_size=8)


def test_export_all_and_auto_selection(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                       caplog: pytest.LogCaptureFixture) -> None:
    root = tmp_path / "all"
    assert main(["export", "--model", "mlp", "--runtime", "all", "--out", str(root), "--batch-size", "4",
                 "--seed", "9"]) == 0
    assert sorted(p.name for p in root.iterdir()) == ["executorch", "onnx", "onnxgraph", "torch"]
    layouts = {r: load_manifest(root / r).params for r in ("onnx", "onnxgraph", "torch", "executorch")}
    assert layouts["onnx"] == layouts["onnxgraph"] == layouts["torch"] == layouts["executorch"]
    with caplog.at_level(logging.INFO, logger="edgetrain.sdk.runtime"):
        chosen = load_runtime(root)
    assert chosen.name == "onnx" and "using the onnx bundle" in caplog.text
    assert load_runtime(root, prefer="torch").name == "torch"
    assert load_runtime(root, prefer="executorch").name == "executorch"
    assert load_runtime(root, prefer="onnxgraph").name == "onnxgraph"
    monkeypatch.setattr(runtime_module, "runtime_available", lambda r: r != "onnx")
    assert select_bundle(root) == root / "onnxgraph"
    monkeypatch.setattr(runtime_module, "runtime_available", lambda r: r not in ("onnx", "onnxgraph"))
    assert select_bundle(root) == root / "torch"
    # a single bundle still loads as itself
    assert select_bundle(root / "executorch") == root / "executorch"


def test_export_all_skips_a_refusing_runtime_with_its_reason(tmp_path: Path,
                                                             capsys: pytest.CaptureFixture[str]) -> None:
    root = tmp_path / "all"
    assert main(["export", "--model", "cnn", "--norm", "batch", "--runtime", "all", "--out", str(root)]) == 0
    out = capsys.readouterr().out
    assert sorted(p.name for p in root.iterdir()) == ["torch"]
    assert "skipped onnx:" in out and "skipped onnxgraph:" in out and "skipped executorch" in out
    assert "BatchNorm" in out


def test_cnn_reference_exports_for_every_runtime(tmp_path: Path) -> None:
    # the reference model at its default config (norm none): all three runtimes accept it
    for runtime in ("torch", "onnx", "executorch"):
        manifest = export_bundle("cnn", None, out_dir=tmp_path / runtime, runtime=runtime)
        assert manifest.num_params == 215_370
    x = np.zeros((3, 1, 28, 28), np.float32)
    y = np.arange(3)
    losses = [load_runtime(tmp_path / r).gradient(x, y).loss for r in ("torch", "onnx", "executorch")]
    assert losses[1] == pytest.approx(losses[0], rel=1e-5) and losses[2] == pytest.approx(losses[0], rel=1e-5)
