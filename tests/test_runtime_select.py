"""Which backend a board can really run (issue 13): ``runtime_available("onnx")`` needs onnxruntime's
*training* API, not just a package called onnxruntime, so on a board with plain onnxruntime and a bundle
directory holding ``onnx/`` and ``onnxgraph/``, ``auto`` picks onnxgraph instead of failing on onnx.

A fresh interpreter sees a stand-in "plain onnxruntime" first on its path (a package without
``training/api``, as the PyPI onnxruntime wheel is), and torch hidden: nothing here may import it."""
from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

from tests.test_import_without_torch import HIDE_TORCH

REPO = Path(__file__).resolve().parents[1]


def _bundle_dir(root: Path, runtimes: tuple[str, ...]) -> Path:
    for runtime in runtimes:  # select_bundle looks only for each sub-bundle's manifest
        (root / runtime).mkdir(parents=True)
        (root / runtime / "manifest.json").write_text("{}")
    return root


def _choose(tmp_path: Path, onnxruntime_has_training: bool, runtimes: tuple[str, ...]) -> dict:
    fake = tmp_path / "site" / "onnxruntime"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text("raise ImportError('availability must not import onnxruntime')\n")
    if onnxruntime_has_training:
        (fake / "training" / "api").mkdir(parents=True)
    bundles = _bundle_dir(tmp_path / "bundles", runtimes)
    code = HIDE_TORCH + textwrap.dedent(f"""
        import json, sys
        from edgetrain.sdk.runtime import runtime_available, select_bundle
        print(json.dumps({{"onnx": runtime_available("onnx"), "onnxgraph": runtime_available("onnxgraph"),
                          "chosen": select_bundle({str(bundles)!r}).name,
                          "imported": sorted(m for m in ("torch", "onnxruntime") if m in sys.modules)}}))
    """)
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120,
                          env={"PYTHONPATH": str(fake.parent), "PATH": "/usr/bin:/bin"})
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_plain_onnxruntime_is_not_the_onnx_training_runtime_and_auto_picks_onnxgraph(tmp_path: Path) -> None:
    seen = _choose(tmp_path, onnxruntime_has_training=False, runtimes=("onnx", "onnxgraph", "torch"))
    assert seen == {"onnx": False, "onnxgraph": True, "chosen": "onnxgraph", "imported": []}


def test_with_the_training_api_auto_still_picks_onnx_first(tmp_path: Path) -> None:
    seen = _choose(tmp_path, onnxruntime_has_training=True, runtimes=("onnx", "onnxgraph", "torch"))
    assert seen == {"onnx": True, "onnxgraph": True, "chosen": "onnx", "imported": []}
