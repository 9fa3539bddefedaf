"""Per runtime and model: train-step latency, peak RSS of a fresh device process, bundle size, import time,
and the installed size of the runtime's own packages (what a board adds to the device core).

    .venv/bin/python benchmarks/runtimes.py [--models mlp cnn] [--steps 30] [--batch-size 32]

The host exports one bundle per (runtime, model) with the same seed; each measurement then runs in a
fresh interpreter (``--child``) that imports only what a device would: so import time and peak RSS
(VmHWM) are those of a board process, torch included only where the runtime needs it. One
intra-op thread everywhere, as one device process per core would run. Batches are random inputs of
the real shape; SGD lr 0.01 (momentum 0 uses ORT's optimizer model, momentum 0.9 its numpy path;
onnxgraph always steps in numpy over the graph's gradients, which its IO binding writes in place; plain
SGD in place, momentum through the SDK kernel). Figures move with the machine's load: compare rows from
one sitting, and repeat for stable medians.
"""
from __future__ import annotations

import argparse
import importlib.metadata
import json
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
# (label, bundle runtime, momentum)
CASES = (("torch", "torch", 0.0), ("onnx", "onnx", 0.0), ("onnx m=0.9", "onnx", 0.9),
         ("onnxgraph", "onnxgraph", 0.0), ("onnxgraph m=.9", "onnxgraph", 0.9), ("executorch", "executorch", 0.0))
# the distributions each runtime installs beyond the device core (on this x86 host: onnxgraph runs on
# onnxruntime-training-cpu's InferenceSession; a board's plain onnxruntime 1.22.1 is ~60 MB installed)
RUNTIME_DISTRIBUTIONS = {"torch": ("torch",), "onnx": ("onnxruntime-training-cpu",),
                         "onnxgraph": ("onnxruntime-training-cpu",), "executorch": ("executorch", "torch")}


@dataclass(frozen=True)
class StepStats:
    """One (runtime, model) measurement from a fresh process."""

    label: str
    model: str
    num_params: int
    bundle_bytes: int
    import_s: float
    load_s: float
    step_ms_median: float
    step_ms_p95: float
    peak_rss_mb: float
    torch_imported: bool
    install_mb: float


def _installed_mb(distributions: tuple[str, ...]) -> float:
    """Bytes on disk of the named installed distributions' files (NaN where one is not installed)."""
    total = 0
    for name in distributions:
        try:
            files = importlib.metadata.distribution(name).files or []
        except importlib.metadata.PackageNotFoundError:
            return float("nan")
        total += sum(path.stat().st_size for path in (f.locate() for f in files) if path.is_file())
    return total / 1e6


def _peak_rss_mb() -> float:
    """This process's peak RSS. VmHWM, not ru_maxrss: Linux carries ru_maxrss across fork+exec, so a
    child would report its (larger) parent's peak."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024  # kB
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux (bytes on macOS)


def _child(bundle: Path, steps: int, batch_size: int, momentum: float) -> dict[str, object]:
    """Runs inside the fresh process: import, load, warm up, time ``steps`` train steps."""
    import importlib

    started = time.perf_counter()
    from edgetrain.sdk.bundle import load_manifest
    from edgetrain.sdk.runtime import TrainConfig

    manifest = load_manifest(bundle)
    backend = {"torch": "edgetrain.sdk.runtime.torch_backend", "onnx": "edgetrain.sdk.runtime.ort_backend",
               "onnxgraph": "edgetrain.sdk.runtime.onnxgraph_backend",
               "executorch": "edgetrain.sdk.runtime.executorch_backend"}[manifest.runtime]
    module = importlib.import_module(backend)
    if manifest.runtime == "onnx":
        module.import_training_api()
    elif manifest.runtime == "onnxgraph":
        module._import_onnxruntime()  # the backend imports it only in load()
    elif manifest.runtime == "executorch":
        importlib.import_module("executorch.extension.training")  # the backend imports it only in load()
    imported = time.perf_counter()
    if "torch" in sys.modules:
        sys.modules["torch"].set_num_threads(1)
    threaded = manifest.runtime in ("onnx", "onnxgraph")
    runtime = module.load(bundle, manifest, threads=1) if threaded else module.load(bundle, manifest)
    loaded = time.perf_counter()
    rng = np.random.default_rng(0)
    x = rng.standard_normal((batch_size, *manifest.input_shape)).astype(np.float32)
    y = rng.integers(0, manifest.num_classes, batch_size)
    config = TrainConfig(lr=0.01, momentum=momentum)
    runtime.train([(x, y)] * 3, config)  # warm-up: first-call allocations and kernel selection
    times_ms = []
    for _ in range(steps):
        t0 = time.perf_counter()
        runtime.train([(x, y)], config)
        times_ms.append((time.perf_counter() - t0) * 1e3)
    return {"import_s": imported - started, "load_s": loaded - imported, "times_ms": times_ms,
            "peak_rss_mb": _peak_rss_mb(),
            "torch_imported": "torch" in sys.modules, "num_params": manifest.num_params}


def _measure(label: str, model: str, bundle: Path, steps: int, batch_size: int, momentum: float) -> StepStats:
    from edgetrain.sdk.bundle import MANIFEST_NAME, load_manifest

    manifest = load_manifest(bundle)
    size = sum((bundle / rel).stat().st_size for rel in [*manifest.files, MANIFEST_NAME])
    result = subprocess.run([sys.executable, __file__, "--child", str(bundle), "--steps", str(steps),
                             "--batch-size", str(batch_size), "--momentum", str(momentum)],
                            cwd=REPO, capture_output=True, text=True, timeout=1800)
    if result.returncode != 0:
        raise SystemExit(f"{label} {model}: child failed:\n{result.stderr[-2000:]}")
    raw = json.loads(result.stdout.strip().splitlines()[-1])
    times = sorted(raw["times_ms"])
    return StepStats(label=label, model=model, num_params=raw["num_params"], bundle_bytes=size,
                     import_s=raw["import_s"], load_s=raw["load_s"], step_ms_median=statistics.median(times),
                     step_ms_p95=times[min(len(times) - 1, int(round(0.95 * (len(times) - 1))))],
                     peak_rss_mb=raw["peak_rss_mb"], torch_imported=raw["torch_imported"],
                     install_mb=_installed_mb(RUNTIME_DISTRIBUTIONS[manifest.runtime]))


def _table(rows: list[StepStats], batch_size: int) -> str:
    head = (f"{'runtime':<14} {'model':<5} {'params':>8} {'bundle MB':>9} {'import s':>8} {'load s':>6} "
            f"{'step ms med':>11} {'p95':>7} {'peak RSS MB':>11} {'torch':>5} {'install MB':>10}")
    lines = [f"batch {batch_size}, 1 intra-op thread, SGD; fresh process per row", head, "-" * len(head)]
    for r in rows:
        lines.append(f"{r.label:<14} {r.model:<5} {r.num_params:>8,} {r.bundle_bytes / 1e6:>9.2f} {r.import_s:>8.2f} "
                     f"{r.load_s:>6.2f} {r.step_ms_median:>11.2f} {r.step_ms_p95:>7.2f} {r.peak_rss_mb:>11.0f} "
                     f"{'yes' if r.torch_imported else 'no':>5} {r.install_mb:>10.0f}")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["mlp", "cnn"], choices=["mlp", "cnn"])
    parser.add_argument("--steps", type=int, default=30, help="timed train steps per row (default 30)")
    parser.add_argument("--batch-size", type=int, default=32, help="also the executorch fixed batch (default 32)")
    parser.add_argument("--child", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--momentum", type=float, default=0.0, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child is not None:
        print(json.dumps(_child(args.child, args.steps, args.batch_size, args.momentum)))
        return 0
    from edgetrain.export.bundle_writer import export_bundle

    rows: list[StepStats] = []
    with tempfile.TemporaryDirectory(prefix="edgetrain-bench-") as tmp:
        for model in args.models:
            for runtime in ("torch", "onnx", "onnxgraph", "executorch"):
                export_bundle(model, None, out_dir=Path(tmp) / f"{model}-{runtime}", runtime=runtime, seed=0,
                              batch_size=args.batch_size if runtime == "executorch" else None)
            for label, runtime, momentum in CASES:
                rows.append(_measure(label, model, Path(tmp) / f"{model}-{runtime}", args.steps, args.batch_size,
                                     momentum))
                print(f"measured {label} {model}", file=sys.stderr, flush=True)
    print(_table(rows, args.batch_size))
    return 0


if __name__ == "__main__":
    sys.exit(main())
