"""Check a power source on real hardware: idle watts, then watts under a known load, through the same
``EnergyMeter`` windows that ``edgetrain bench`` and the fleet's devices use.

A source that reads correctly shows loaded power clearly above idle, and joules that equal mean watts
times the window's length. Run it on each board a source claims to support:

    python benchmarks/power_source_check.py --source auto --load cpu          # RAPL, INA3221, PMIC…
    python benchmarks/power_source_check.py --source nvml --load gpu          # needs torch with CUDA

Prints one JSON object (``--out`` also writes it).
"""
from __future__ import annotations

import argparse
import json
import sys
import threading
import time
from pathlib import Path


from edgetrain.sdk.energy.power.detect import SOURCES, detect_power_source
from edgetrain.sdk.energy.meter import EnergyMeter
from edgetrain.sdk.errors import MeasurementUnavailable


def cpu_load(stop: threading.Event) -> int:
    """Busy arithmetic on this thread until ``stop``; returns the iterations (so it is not optimised away)."""
    count = 0
    while not stop.is_set():
        for _ in range(10_000):
            count += 1
    return count


def gpu_load(stop: threading.Event) -> int:
    """Back-to-back fp16 matrix products on the first CUDA device until ``stop``."""
    import torch

    if not torch.cuda.is_available():
        raise SystemExit("--load gpu: torch sees no CUDA device")
    a = torch.randn(8192, 8192, device="cuda", dtype=torch.float16)
    b = torch.randn(8192, 8192, device="cuda", dtype=torch.float16)
    count = 0
    while not stop.is_set():
        for _ in range(20):
            a @ b
        torch.cuda.synchronize()
        count += 20
    return count


def run_window(meter: EnergyMeter, name: str, seconds: float, load: str) -> dict[str, float | int | None | list[str]]:
    stop = threading.Event()
    iterations = 0
    meter.begin_window(name)
    started = time.monotonic()
    if load == "none":
        time.sleep(seconds)
    else:
        timer = threading.Timer(seconds, stop.set)
        timer.start()
        iterations = (gpu_load if load == "gpu" else cpu_load)(stop)
    elapsed = time.monotonic() - started
    energy = meter.energy(meter.end_window(name))
    watts = None if energy.gross_j is None else energy.gross_j / energy.duration_s
    return {"duration_s": round(elapsed, 3), "energy_j": energy.gross_j, "mean_power_w": watts,
            "rails_j": dict(energy.rails_j), "iterations": iterations, "warnings": list(energy.warnings)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--source", default="auto", choices=["auto", *SOURCES], help="power source (default auto)")
    p.add_argument("--load", default="cpu", choices=["cpu", "gpu"], help="what the loaded window runs")
    p.add_argument("--seconds", type=float, default=5.0, help="length of each window (default 5)")
    p.add_argument("--sample-hz", type=float, default=20.0, help="polling rate for sampling sources")
    p.add_argument("--sysfs-root", default="/", help="file-system root the sources read (default /)")
    p.add_argument("--out", type=Path, help="also write the JSON here")
    args = p.parse_args(argv)
    try:
        detection = detect_power_source(args.sysfs_root, override=args.source)
    except MeasurementUnavailable as exc:
        print(json.dumps({"source": None, "unavailable": {args.source: str(exc)}}, indent=2))
        return 1
    if detection.source is None:
        print(json.dumps({"source": None, "unavailable": detection.reasons}, indent=2))
        return 1
    meter = EnergyMeter(detection.source, sample_hz=args.sample_hz)
    meter.start()
    try:
        idle = run_window(meter, "idle", args.seconds, "none")
        loaded = run_window(meter, f"{args.load}_load", args.seconds, args.load)
    finally:
        meter.stop()
        detection.source.close()
    idle_w, load_w = idle["mean_power_w"], loaded["mean_power_w"]
    result = {"source": detection.source.describe(), "load": args.load, "idle": idle, "loaded": loaded,
              "load_minus_idle_w": None if idle_w is None or load_w is None else load_w - idle_w,
              "achieved_sample_hz": meter.achieved_sample_hz()}
    text = json.dumps(result, indent=2, default=str)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
