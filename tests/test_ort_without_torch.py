"""The ONNX Runtime device path imports and trains with torch absent from the import system.

``onnxruntime/training/__init__.py`` imports torch; the backend must get at the training API without
it (NOTES-runtimes). The bundle is exported here (host side, torch allowed); a fresh interpreter with
a meta-path finder that refuses torch then loads and trains it, and its result is checked against the
torch runtime trained on the same batches.
"""
from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("torch", reason="the host side (export, reference) needs torch")
pytest.importorskip("onnxruntime.training", reason="onnxruntime-training-cpu==1.19.2 not installed (extra 'ort')")
pytest.importorskip("onnxscript", reason="onnxscript not installed (extra 'export')")

from edgetrain.export.bundle_writer import export_bundle  # noqa: E402
from edgetrain.sdk.runtime import TrainConfig, load_runtime  # noqa: E402
from tests.test_import_without_torch import HIDE_TORCH as _HIDE_TORCH  # noqa: E402

REPO = Path(__file__).resolve().parents[1]



def _run_without_torch(body: str, *args: str) -> subprocess.CompletedProcess[str]:
    code = _HIDE_TORCH + textwrap.dedent(body)
    return subprocess.run([sys.executable, "-c", code, *args], cwd=REPO, capture_output=True, text=True,
                          timeout=120)


def _batches(n: int) -> list[tuple[np.ndarray, np.ndarray]]:
    rng = np.random.default_rng(7)
    return [(rng.standard_normal((8, 1, 28, 28)).astype(np.float32), rng.integers(0, 10, 8).astype(np.int64))
            for _ in range(n)]


def test_the_blocker_stops_the_plain_training_import() -> None:
    # the naive import must fail here, or the test below would prove nothing
    result = _run_without_torch("""
        try:
            import onnxruntime.training.api
        except ImportError as exc:
            print("blocked")
    """)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "blocked"


def test_ort_bundle_trains_without_torch(tmp_path: Path) -> None:
    export_bundle("mlp", {"hidden": [16]}, out_dir=tmp_path / "onnx", runtime="onnx", seed=3)
    export_bundle("mlp", {"hidden": [16]}, out_dir=tmp_path / "torch", runtime="torch", seed=3)
    batches = _batches(2)
    np.save(tmp_path / "x.npy", np.stack([x for x, _ in batches]))
    np.save(tmp_path / "y.npy", np.stack([y for _, y in batches]))
    result = _run_without_torch("""
        from pathlib import Path
        import numpy as np
        from edgetrain.sdk.runtime import TrainConfig, load_runtime
        root = Path(sys.argv[1])
        runtime = load_runtime(root / "onnx")
        xs, ys = np.load(root / "x.npy"), np.load(root / "y.npy")
        result = runtime.train(list(zip(xs, ys)), TrainConfig(lr=0.1, momentum=0.9))
        np.save(root / "trained.npy", runtime.get_parameters())
        loaded = sorted(m for m in sys.modules if m == "torch" or m.startswith("torch."))
        assert not loaded, loaded
        print(type(runtime).__name__, result.steps)
    """, str(tmp_path))
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["OrtRuntime", "2"]
    reference = load_runtime(tmp_path / "torch")
    start = reference.get_parameters()
    reference.train(batches, TrainConfig(lr=0.1, momentum=0.9))
    expected = reference.get_parameters() - start
    got = np.load(tmp_path / "trained.npy") - start
    assert np.abs(got - expected).max() <= 1e-5 * np.abs(expected).max()


def test_ort_backend_leaves_an_installed_torch_unimported(tmp_path: Path) -> None:
    # plain `import onnxruntime` imports torch when it can (build validation); the device path must not
    export_bundle("mlp", {"hidden": [8]}, out_dir=tmp_path / "onnx", runtime="onnx", seed=1)
    code = textwrap.dedent("""
        import sys
        import numpy as np
        from edgetrain.sdk.runtime import TrainConfig, load_runtime
        runtime = load_runtime(sys.argv[1])
        x = np.zeros((4, 1, 28, 28), np.float32)
        runtime.train([(x, np.arange(4))], TrainConfig(lr=0.1))
        print("torch" in sys.modules)
    """)
    result = subprocess.run([sys.executable, "-c", code, str(tmp_path / "onnx")], cwd=REPO, capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "False"
