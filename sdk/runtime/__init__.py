"""Runtime seam and backend selection. Importing this never imports torch."""
from __future__ import annotations

import importlib.util
from pathlib import Path

from ..bundle import Manifest, load_manifest
from ..errors import RuntimeBackendError
from .base import EvalResult, GradientResult, Runtime, TrainConfig, TrainResult

__all__ = ["EvalResult", "GradientResult", "Runtime", "TrainConfig", "TrainResult", "load_runtime"]

# bundle runtime -> (module that implements it, python package it needs)
_BACKENDS = {
    "torch": ("sdk.runtime.torch_backend", "torch"),
}


def load_runtime(bundle_dir: Path | str, manifest: Manifest | None = None) -> Runtime:
    """Load a bundle into the backend its manifest names, importing that backend only now."""
    manifest = manifest or load_manifest(bundle_dir)
    if manifest.runtime not in _BACKENDS:
        raise RuntimeBackendError(f"{bundle_dir}: no SDK backend for runtime {manifest.runtime!r} yet")
    module_name, needs = _BACKENDS[manifest.runtime]
    if importlib.util.find_spec(needs) is None:
        raise RuntimeBackendError(
            f"{bundle_dir}: a {manifest.runtime} bundle needs the '{needs}' package; "
            f"install it with: pip install 'edgetrain[{manifest.runtime}]'"
        )
    module = importlib.import_module(module_name)
    return module.load(Path(bundle_dir), manifest)
