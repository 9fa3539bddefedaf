"""What a device measures about its own work and sends on ``edgetrain/<fleet>/metrics/<device>``.

One ``wire.DeviceMetrics`` per Federated Learning round, with per-step latency (mean and p95 over the
local steps), compute and CPU seconds, examples, peak RSS, the update frame's bytes, the codec's
encode time and, where the board has a power sensor, the joules of the round (the SDK's
``EnergyMeter``, Zeus-style windows: You, Chung & Chowdhury, NSDI 2023).

Large Batch Training sends a gradient every step (~0.1 s on a small model): one metrics message per
step would double the device's message rate and the aggregator's work for figures nobody reads at
step granularity. ``GradientGroup`` sums steps and is flushed when the step number is a multiple of
``every`` (aligned on the step number, so every device reports on the same steps and those steps'
records hold the whole fleet); one energy window spans the group, waits between steps included.

Every value is a float (the wire's ``values`` map); strings (the energy method, why energy is
missing) go once in the device's retained status instead. Nothing here imports torch or
device_bench: the energy meter is injected as anything with ``EnergyProbe``'s methods.
"""
from __future__ import annotations

import math
import resource
import sys
import time
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Protocol, TypeVar

import numpy as np

T = TypeVar("T")
BENCH_ROUND_ID = 0  # rounds count from 1; round 0 on the metrics topic is a retained bench result
BENCH_PREFIX = "bench_"


class EnergyProbe(Protocol):
    """One measurement window at a time over the board's power source (``edgetrain.sdk.energy.round_energy``)."""

    def begin(self) -> None: ...

    def end(self) -> tuple[float | None, float]:
        """(gross joules or None when the window could not be measured, window seconds)."""
        ...

    def describe(self) -> dict[str, object]: ...

    def close(self) -> None: ...


class StepTimer:
    """Wraps a batch iterator: step i lasts from handing out batch i until the runtime asks for batch
    i+1 (or ``finish``), so it works with any runtime's ``train`` loop, fetching excluded."""

    def __init__(self, batches: Iterable[T]) -> None:
        self._batches = batches
        self._handed_s: float | None = None
        self.durations_s: list[float] = []

    def _close_step(self) -> None:
        if self._handed_s is not None:
            self.durations_s.append(time.perf_counter() - self._handed_s)
            self._handed_s = None

    def __iter__(self) -> Iterator[T]:
        for batch in self._batches:
            self._handed_s = time.perf_counter()
            yield batch
            self._close_step()  # the runtime asked for the next batch: this step is done
        self._close_step()

    def finish(self) -> None:
        """Close the last step (the runtime may stop iterating without asking again)."""
        self._close_step()


def step_stats_ms(durations_s: Iterable[float]) -> dict[str, float]:
    """Mean and p95 step time in milliseconds (empty dict when no step ran)."""
    values = np.asarray(list(durations_s), dtype=np.float64)
    if values.size == 0:
        return {}
    return {"step_mean_ms": float(values.mean() * 1e3), "step_p95_ms": float(np.percentile(values, 95) * 1e3)}


def proc_status_mb(field: str, path: str = "/proc/self/status") -> float | None:
    """A ``VmXXX:`` line of Linux's /proc/self/status in MiB; None where there is no such file or line."""
    try:
        with open(path) as fh:
            for line in fh:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) / 2**10  # kB
    except (OSError, ValueError, IndexError):
        pass
    return None


def peak_rss_mb() -> float:
    """The process's own lifetime peak RSS in MiB: Linux's VmHWM. Not ru_maxrss, which a child process
    inherits from its parent at fork (a device spawned by a 400 MB simulate would report 400 MB), and
    not psutil, which reports only the current RSS on Linux. ru_maxrss elsewhere (bytes on macOS)."""
    peak = proc_status_mb("VmHWM")
    if peak is not None:
        return peak
    max_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return max_rss / 2**20 if sys.platform == "darwin" else max_rss / 2**10


def current_rss_mb() -> float | None:
    """The current RSS in MiB: psutil where installed (the ``bench`` extra), else Linux's VmRSS (a board
    installed without psutil), else None."""
    try:
        import psutil
    except ImportError:
        return proc_status_mb("VmRSS")
    return float(psutil.Process().memory_info().rss) / 2**20


def memory_values() -> dict[str, float]:
    values = {"peak_rss_mb": peak_rss_mb()}
    current = current_rss_mb()
    if current is not None:
        values["rss_mb"] = current
    return values


def energy_values(joules: float | None, window_s: float) -> dict[str, float]:
    """``energy_j`` and the window it covers, or nothing when the window was not measured."""
    if joules is None or not math.isfinite(joules):
        return {}
    return {"energy_j": float(joules), "energy_window_s": float(window_s)}


@dataclass
class GradientGroup:
    """Large-batch steps summed until the step number is a multiple of ``every``."""

    every: int
    steps: int = 0
    first_round_id: int = 0
    step_s: list[float] = field(default_factory=list)
    totals: dict[str, float] = field(default_factory=dict)

    def add(self, round_id: int, compute_s: float, values: Mapping[str, float]) -> None:
        """One step's compute time and additive values (examples, cpu_s, update_frame_bytes, encode_ms)."""
        if self.steps == 0:
            self.first_round_id = round_id
        self.steps += 1
        self.step_s.append(compute_s)
        for key, value in values.items():
            self.totals[key] = self.totals.get(key, 0.0) + float(value)

    def due(self, round_id: int) -> bool:
        return self.steps > 0 and round_id % self.every == 0

    def flush(self) -> dict[str, float]:
        """The group's values (sums, plus per-step stats), and start a new group."""
        values = {**self.totals, **step_stats_ms(self.step_s), "compute_s": float(sum(self.step_s)),
                  "steps": float(self.steps), "first_round_id": float(self.first_round_id)}
        self.steps, self.step_s, self.totals = 0, [], {}
        return values


def bench_values(report: Mapping[str, object]) -> dict[str, float]:
    """The headline figures of a ``bench.json`` (``edgetrain bench``) as ``bench_*`` floats."""

    def get(*keys: str) -> float | None:
        node: object = report
        for key in keys:
            if not isinstance(node, Mapping) or key not in node:
                return None
            node = node[key]
        return float(node) if isinstance(node, (int, float)) and not isinstance(node, bool) else None

    figures = {
        "step_p50_ms": (get("step_latency", "p50_s"), 1e3), "step_p95_ms": (get("step_latency", "p95_s"), 1e3),
        "samples_per_s": (get("samples_per_s"), 1.0), "batch_size": (get("config", "batch_size"), 1.0),
        "peak_rss_mb": (get("memory", "peak_rss_bytes"), 1 / 2**20),
        "update_frame_bytes": (get("codec", "frame_bytes"), 1.0),
        "encode_p50_ms": (get("codec", "encode", "p50_s"), 1e3),
        "energy_per_step_gross_mj": (get("energy", "per_step_j", "gross"), 1e3),
        "energy_per_step_net_mj": (get("energy", "per_step_j", "net"), 1e3),
        "idle_power_w": (get("energy", "baseline_power_w"), 1.0),
    }
    energy = report.get("energy")
    if isinstance(energy, Mapping) and energy.get("available"):
        figures["energy_is_estimate"] = (1.0 if energy.get("estimate") is True else 0.0, 1.0)
    return {BENCH_PREFIX + name: value * scale for name, (value, scale) in figures.items() if value is not None}
