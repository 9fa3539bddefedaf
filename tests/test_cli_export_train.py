"""`edgetrain export` then `edgetrain train`, end to end as subprocesses, on tiny IDX files.

The tiny data set is learnable on purpose (each class lights its own band of rows), so the test can
check that training actually learns rather than only that it prints something.
"""
from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("torch")
idx = pytest.importorskip("edgetrain.sdk.data.idx", reason="edgetrain.sdk.data.idx (write_idx) not written yet")

REPO = Path(__file__).resolve().parents[1]
EPOCH_LINE = re.compile(r"^epoch (\d+)/(\d+)\s+train_loss (\S+)\s+test_loss (\S+)\s+test_acc (\S+)\s+train_s (\S+)",
                        re.MULTILINE)


def _edgetrain(*args: str | Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "edgetrain", *map(str, args)], cwd=REPO,
                          capture_output=True, text=True, timeout=240)


def _banded_images(labels: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    images = rng.integers(0, 60, size=(len(labels), 28, 28), dtype=np.uint8)
    for i, label in enumerate(labels):
        images[i, 2 * label + 4 : 2 * label + 6, :] = 255  # class k: rows 2k+4, 2k+5 bright
    return images


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("fmnist")
    rng = np.random.default_rng(0)
    for prefix, n in (("train", 320), ("t10k", 100)):
        labels = rng.integers(0, 10, n).astype(np.uint8)
        idx.write_idx(directory / f"{prefix}-images-idx3-ubyte", _banded_images(labels, rng), gzip=False)
        idx.write_idx(directory / f"{prefix}-labels-idx1-ubyte.gz", labels, gzip=True)
    return directory


@pytest.fixture(scope="module")
def bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("bundles") / "mlp"
    result = _edgetrain("export", "--model", "mlp", "--out", out, "--seed", "1")
    assert result.returncode == 0, result.stderr
    assert "235,146 parameters" in result.stdout  # 784·256+256 + 256·128+128 + 128·10+10
    assert "weights.safetensors" in result.stdout and "manifest.json" in result.stdout
    return out


def test_export_then_train_learns_and_prints_one_line_per_epoch(bundle: Path, data_dir: Path) -> None:
    result = _edgetrain("train", "--bundle", bundle, "--data-dir", data_dir, "--epochs", "3",
                        "--batch-size", "16", "--threads", "1")
    assert result.returncode == 0, result.stderr
    epochs = EPOCH_LINE.findall(result.stdout)
    assert [(int(e), int(t)) for e, t, *_ in epochs] == [(1, 3), (2, 3), (3, 3)], result.stdout
    accuracies = [float(acc) for *_, acc, _ in epochs]
    train_losses = [float(loss) for _, _, loss, *_ in epochs]
    assert all(0.0 <= a <= 1.0 for a in accuracies)
    assert accuracies[-1] >= 0.8, result.stdout  # bands are trivially separable; chance is 0.1
    assert train_losses[-1] < train_losses[0]
    assert "320 train examples, 100 test" in result.stdout


def test_train_on_one_device_of_a_dirichlet_partition(bundle: Path, data_dir: Path) -> None:
    result = _edgetrain("train", "--bundle", bundle, "--data-dir", data_dir, "--epochs", "1",
                        "--partition", "dirichlet:0.5", "--count", "2", "--index", "1", "--threads", "1")
    assert result.returncode == 0, result.stderr
    shown = int(re.search(r"(\d+) train examples", result.stdout).group(1))
    assert 0 < shown < 320
    assert len(EPOCH_LINE.findall(result.stdout)) == 1


def _one_line_error(result: subprocess.CompletedProcess[str], command: str, needle: str) -> None:
    assert result.returncode == 2, (result.stdout, result.stderr)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith(f"edgetrain {command}: error:") and needle in lines[0], lines[0]


@pytest.mark.parametrize("args,needle", [
    (["--partition", "bogus"], "partition spec"),
    (["--index", "2", "--count", "2"], "--index 2"),
    (["--epochs", "0"], "--epochs"),
    (["--batch-size", "0"], "--batch-size"),
    (["--lr", "-1"], "learning rate"),
])
def test_bad_train_input_exits_2_with_one_line(bundle: Path, data_dir: Path, args: list[str], needle: str) -> None:
    _one_line_error(_edgetrain("train", "--bundle", bundle, "--data-dir", data_dir, *args), "train", needle)


@pytest.mark.parametrize("args,needle", [
    (["--model", "mlp", "--norm", "batch"], "--norm applies to the cnn"),
    (["--model", "cnn", "--norm", "group", "--runtime", "onnx"], "GroupNorm"),
    (["--model", "mlp", "--momentum", "1.5"], "momentum"),
])
def test_bad_export_input_exits_2_with_one_line(tmp_path: Path, args: list[str], needle: str) -> None:
    _one_line_error(_edgetrain("export", "--out", tmp_path / "b", *args), "export", needle)
    assert not (tmp_path / "b" / "manifest.json").exists()


def test_export_refuses_a_foreign_directory(tmp_path: Path) -> None:
    (tmp_path / "thesis.tex").write_text("precious")
    _one_line_error(_edgetrain("export", "--model", "mlp", "--out", tmp_path), "export", "not empty")
    assert (tmp_path / "thesis.tex").read_text() == "precious"


def test_argparse_rejects_an_unknown_model(tmp_path: Path) -> None:
    result = _edgetrain("export", "--model", "vgg", "--out", tmp_path / "b")
    assert result.returncode == 2
    assert "invalid choice: 'vgg'" in result.stderr.strip().splitlines()[-1]


def test_train_without_a_bundle_names_the_problem(tmp_path: Path, data_dir: Path) -> None:
    result = _edgetrain("train", "--bundle", tmp_path / "nothing", "--data-dir", data_dir)
    assert result.returncode == 1
    assert "not a bundle" in result.stderr and "edgetrain export" in result.stderr


REAL_DATA = Path("/usr/share/datasets/fashion-mnist")


@pytest.mark.slow
@pytest.mark.skipif(not (REAL_DATA / "train-images-idx3-ubyte.gz").is_file(), reason="Fashion-MNIST not installed")
def test_default_cnn_reaches_88_percent_on_fashion_mnist(tmp_path: Path) -> None:
    """The full-size twin of the tiny run above: ~25-50 s on 2 threads (measured 89.2% after 3 epochs)."""
    assert _edgetrain("export", "--model", "cnn", "--out", tmp_path / "cnn").returncode == 0
    result = _edgetrain("train", "--bundle", tmp_path / "cnn", "--data-dir", REAL_DATA, "--threads", "2")
    assert result.returncode == 0, result.stderr
    assert float(EPOCH_LINE.findall(result.stdout)[-1][4]) >= 0.88, result.stdout
