"""Runtime seam and backend selection. Importing this never imports torch."""
from __future__ import annotations

import importlib
import importlib.util
import logging
from pathlib import Path

from ..bundle import MANIFEST_NAME, RUNTIMES, Manifest, load_manifest
from ..errors import BundleError, RuntimeBackendError
from .base import EvalResult, GradientResult, Runtime, TrainConfig, TrainResult, TrainStep

__all__ = ["EvalResult", "GradientResult", "Runtime", "TrainConfig", "TrainResult", "TrainStep", "load_runtime",
           "runtime_available", "select_bundle", "AUTO_ORDER"]

_log = logging.getLogger(__name__)

# bundle runtime -> (module that implements it, python packages it needs, extra that installs them)
_BACKENDS = {
    "torch": ("edgetrain.sdk.runtime.torch_backend", ("torch",), "torch"),
    "onnx": ("edgetrain.sdk.runtime.ort_backend", ("onnxruntime",), "ort"),
    "onnxgraph": ("edgetrain.sdk.runtime.onnxgraph_backend", ("onnxruntime",), "onnxgraph"),
    "executorch": ("edgetrain.sdk.runtime.executorch_backend", ("executorch", "torch"), "executorch"),
}
# `prefer="auto"` over a directory of sub-bundles: the leanest installed runtime first
# (ORT trains without torch in ~90 MB RSS, and so does plain onnxruntime running an onnxgraph bundle;
# ExecuTorch's Python bindings are the slowest)
AUTO_ORDER = ("onnx", "onnxgraph", "torch", "executorch")


def runtime_available(runtime: str) -> bool:
    """Whether the packages the ``runtime`` backend needs are installed (nothing is imported)."""
    if runtime not in _BACKENDS:
        return False
    _, needs, _ = _BACKENDS[runtime]
    return all(importlib.util.find_spec(package) is not None for package in needs)


def select_bundle(bundle_dir: Path | str, prefer: str = "auto") -> Path:
    """The bundle to load from ``bundle_dir``: itself when it is a bundle, else one of its
    per-runtime subdirectories (``edgetrain export --runtime all``) — ``prefer`` names the runtime,
    or ``auto`` takes the first installed of ``AUTO_ORDER`` and logs which."""
    bundle_dir = Path(bundle_dir)
    if (bundle_dir / MANIFEST_NAME).is_file():
        return bundle_dir
    present = [r for r in RUNTIMES if (bundle_dir / r / MANIFEST_NAME).is_file()]
    if not present:
        raise BundleError(f"{bundle_dir}: not a bundle (no {MANIFEST_NAME}) and holds no per-runtime bundles "
                          f"({', '.join(f'{r}/' for r in RUNTIMES)}); create one with 'edgetrain export'")
    if prefer != "auto":
        if prefer not in present:
            raise BundleError(f"{bundle_dir}: no {prefer} bundle here (found: {present})")
        return bundle_dir / prefer
    for runtime in AUTO_ORDER:
        if runtime in present and runtime_available(runtime):
            skipped = [r for r in AUTO_ORDER[:AUTO_ORDER.index(runtime)] if r in present]
            _log.info("%s: using the %s bundle (auto: %s; not installed: %s)", bundle_dir, runtime,
                      " > ".join(AUTO_ORDER), skipped or "none")
            return bundle_dir / runtime
    raise RuntimeBackendError(f"{bundle_dir}: holds bundles for {present}, but none of their runtimes is "
                              "installed; install one with: pip install 'edgetrain[ort]' (or [torch], [executorch])")


def load_runtime(bundle_dir: Path | str, manifest: Manifest | None = None, prefer: str = "auto") -> Runtime:
    """Load a bundle into the backend its manifest names, importing that backend only now.

    ``bundle_dir`` may also hold one sub-bundle per runtime; see ``select_bundle`` (then
    ``manifest``, if given, must be the chosen sub-bundle's).
    """
    if prefer != "auto" and prefer not in RUNTIMES:
        raise RuntimeBackendError(f"prefer={prefer!r}: expected 'auto' or one of {RUNTIMES}")
    bundle_dir = select_bundle(bundle_dir, prefer) if manifest is None else Path(bundle_dir)
    manifest = manifest or load_manifest(bundle_dir)
    if manifest.runtime not in _BACKENDS:
        raise RuntimeBackendError(f"{bundle_dir}: no SDK backend for runtime {manifest.runtime!r}")
    module_name, needs, extra = _BACKENDS[manifest.runtime]
    missing = [package for package in needs if importlib.util.find_spec(package) is None]
    if missing:
        raise RuntimeBackendError(
            f"{bundle_dir}: a {manifest.runtime} bundle needs the {', '.join(repr(m) for m in missing)} "
            f"package(s); install with: pip install 'edgetrain[{extra}]'"
        )
    module = importlib.import_module(module_name)
    return module.load(Path(bundle_dir), manifest)
