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
# `prefer="auto"` over a directory of sub-bundles (docs/runtimes-on-boards.md, cnn, x86, batch 32):
# a board is short of memory before it is short of speed, so the torch-free runtimes come first.
# onnx: ORT training, 2.9 ms/step at 71 MB peak RSS (x86 only); onnxgraph: plain onnxruntime, 72 MB but
# 4.3 ms/step (1.7x torch), the only torch-free one on aarch64; torch: fastest (2.5 ms) at 317 MB and a
# 757 MB install; executorch: 145 ms/step from Python at 369 MB, last.
AUTO_ORDER = ("onnx", "onnxgraph", "torch", "executorch")


def _onnxruntime_has_training_api() -> bool:
    """Whether the installed onnxruntime is a training build (onnxruntime-training: ``training/api`` in
    its package), found on disk as ``ort_backend.import_training_api`` loads it; plain onnxruntime (the
    PyPI wheel, aarch64's only one) runs onnxgraph bundles but not onnx ones. Imports nothing: importing
    onnxruntime can import torch."""
    spec = importlib.util.find_spec("onnxruntime")
    return spec is not None and spec.origin is not None and (Path(spec.origin).parent / "training" / "api").is_dir()


_EXTRA_CHECKS = {"onnx": _onnxruntime_has_training_api}  # beyond "its packages are installed"


def runtime_available(runtime: str) -> bool:
    """Whether the ``runtime`` backend can run here: the packages it needs are installed, with the API it
    uses (the training API for ``onnx``). Nothing is imported."""
    if runtime not in _BACKENDS:
        return False
    _, needs, _ = _BACKENDS[runtime]
    if not all(importlib.util.find_spec(package) is not None for package in needs):
        return False
    return _EXTRA_CHECKS.get(runtime, lambda: True)()


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
