"""The energy meter: named windows over a power source, sampled on a background thread.

Zeus-style ``begin_window(name)`` / ``end_window(name)`` (You, Chung & Chowdhury, NSDI 2023) mark
step, round, communication… Counter sources (RAPL, NVML) are read at each window edge and
differenced; sampler sources (INA3221, PMIC, meters) are polled at >= 10 Hz with
``time.monotonic()`` stamps and integrated with the trapezoidal rule once the run ends, so a window
edge costs a timestamp, not a sensor read. An idle window measured before the run gives a baseline
power, hence gross and net (gross - baseline x duration) joules.
"""
from __future__ import annotations

import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

from edgetrain.sdk.errors import ConfigError, EdgetrainError, MeasurementUnavailable

from .integrate import covered_fraction, trapezoid_j
from .power.base import PowerSource, RailValues

MIN_SAMPLE_HZ = 10.0
SHORT_WINDOW_FACTOR = 5.0  # a window under 5 sensor periods is mostly interpolation
IDLE_WINDOW = "idle"


@dataclass(frozen=True)
class TraceSample:
    """One reading. Samplers fill ``power_w``; counters fill ``energy_j`` (cumulative)."""

    time_s: float  # time.monotonic() (or the injected clock)
    power_w: float | None
    energy_j: float | None
    rails: Mapping[str, float]
    at_edge: bool = False  # read at a window edge (counters) rather than by the poller


@dataclass(frozen=True)
class Window:
    name: str
    start_s: float
    end_s: float
    start_count: RailValues | None = None  # counter readings at the edges (counter sources)
    end_count: RailValues | None = None

    @property
    def duration_s(self) -> float:
        return self.end_s - self.start_s


@dataclass(frozen=True)
class WindowEnergy:
    """A window's energy; joule fields are None (never guessed) when nothing measured them."""

    name: str
    start_s: float
    duration_s: float
    gross_j: float | None
    net_j: float | None
    rails_j: Mapping[str, float]
    method: str  # counter | trapezoid | estimate | unavailable
    samples_inside: int
    warnings: tuple[str, ...] = field(default_factory=tuple)


class EnergyMeter:
    """Windows and a trace over one source (or over none: then only times are kept)."""

    def __init__(self, source: PowerSource | None, unavailable_reason: str = "",
                 clock: Callable[[], float] = time.monotonic, sample_hz: float = 20.0) -> None:
        if not sample_hz >= MIN_SAMPLE_HZ:
            raise ConfigError(f"sampling rate must be >= {MIN_SAMPLE_HZ:g} Hz, got {sample_hz}")
        self.source = source
        self.unavailable_reason = unavailable_reason if source is None else ""
        self.sample_hz = sample_hz
        self.sampling_error: str | None = None
        self._clock = clock
        self._lock = threading.Lock()
        self._trace: list[TraceSample] = []
        self._open: dict[str, tuple[float, RailValues | None]] = {}
        self._windows: list[Window] = []
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.started_s = clock()

    # -- sampling ---------------------------------------------------------------------------
    def start(self) -> None:
        """Start polling the source on a daemon thread (no-op without a source)."""
        if self.source is None or self._thread is not None:
            return
        self._stop.clear()  # restartable: a fleet device samples only while a window is open
        self.poll()
        self._thread = threading.Thread(target=self._run, name="edgetrain-power-sampler", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Stop polling and take a last sample so windows ending now are covered."""
        if self._thread is not None:
            self._stop.set()
            self._thread.join(timeout=10)
            self._thread = None
        if self.source is not None and self.sampling_error is None:
            self.poll()

    def _run(self) -> None:
        period_s = 1.0 / self.sample_hz
        while not self._stop.wait(period_s):
            try:
                self.poll()
            except EdgetrainError as exc:  # a sensor failing mid-run ends the trace, not the benchmark
                self.sampling_error = str(exc)
                return

    def poll(self) -> None:
        """Take one reading now (the thread calls this; tests call it with an injected clock)."""
        source = self.source
        if source is None:
            return
        if source.self_timed:
            new = [TraceSample(s.time_s, s.power_w, None, {}) for s in source.read_new_samples()]
            with self._lock:
                self._trace.extend(new)
                self._trace.sort(key=lambda s: s.time_s)  # a meter may flush late
            return
        with self._lock:  # under the lock: trace order is read order
            before = self._clock()
            if source.kind == "energy_counter":
                value = source.read_energy_j()
                sample = TraceSample((before + self._clock()) / 2, None, value.total, dict(value.rails))
            else:
                value = source.read_power_w()
                sample = TraceSample((before + self._clock()) / 2, value.total, None, dict(value.rails))
            self._trace.append(sample)

    def _edge_count(self) -> tuple[float, RailValues | None]:
        if self.source is None or self.source.kind != "energy_counter":
            return self._clock(), None
        with self._lock:
            value = self.source.read_energy_j()
            now = self._clock()
            self._trace.append(TraceSample(now, None, value.total, dict(value.rails), at_edge=True))
        return now, value

    # -- windows ----------------------------------------------------------------------------
    def begin_window(self, name: str) -> None:
        if name in self._open:
            raise ConfigError(f"energy window {name!r} is already open")
        self._open[name] = self._edge_count()

    def end_window(self, name: str) -> Window:
        if name not in self._open:
            raise ConfigError(f"energy window {name!r} was never begun")
        start_s, start_count = self._open.pop(name)
        end_s, end_count = self._edge_count()
        window = Window(name, start_s, end_s, start_count, end_count)
        self._windows.append(window)
        return window

    def measure_idle(self, duration_s: float, sleep: Callable[[float], None] = time.sleep) -> None:
        """Sit idle for ``duration_s`` inside the ``idle`` window: the baseline for net joules."""
        self.begin_window(IDLE_WINDOW)
        sleep(duration_s)
        self.end_window(IDLE_WINDOW)

    def discard_before(self, time_s: float) -> None:
        """Forget closed windows ending by ``time_s`` and trace samples older than it, keeping the last
        sample before it (interpolation at ``time_s`` needs it): a device that measures every round
        for days must not keep its whole trace."""
        with self._lock:
            older = [i for i, s in enumerate(self._trace) if s.time_s < time_s]
            if len(older) > 1:
                del self._trace[: older[-1]]
        self._windows = [w for w in self._windows if w.end_s > time_s]

    @property
    def windows(self) -> list[Window]:
        return list(self._windows)

    @property
    def trace(self) -> list[TraceSample]:
        with self._lock:
            return list(self._trace)

    # -- results ----------------------------------------------------------------------------
    def baseline_power_w(self) -> float | None:
        """Mean power over the last idle window, or None if there was none or it was not measured."""
        idle = [w for w in self._windows if w.name == IDLE_WINDOW]
        if not idle or idle[-1].duration_s <= 0:
            return None
        gross = self._gross(idle[-1], self.trace)[0]
        return None if gross is None else gross / idle[-1].duration_s

    def energy(self, window: Window, baseline_w: float | None = None,
               trace: list[TraceSample] | None = None) -> WindowEnergy:
        trace = self.trace if trace is None else trace
        if self.source is None:
            return WindowEnergy(window.name, window.start_s, window.duration_s, None, None, {}, "unavailable", 0)
        gross, rails, inside, warnings = self._gross(window, trace)
        net = None if gross is None or baseline_w is None else gross - baseline_w * window.duration_s
        method = "estimate" if self.source.is_estimate else (
            "counter" if self.source.kind == "energy_counter" else "trapezoid")
        return WindowEnergy(window.name, window.start_s, window.duration_s, gross, net, rails, method,
                            inside, tuple(warnings))

    def energies(self) -> list[WindowEnergy]:
        """Every closed window's energy, with net joules against the idle baseline."""
        trace, baseline = self.trace, self.baseline_power_w()
        return [self.energy(w, baseline, trace) for w in self._windows]

    def _resolution_s(self) -> float | None:
        assert self.source is not None
        period = self.source.update_period_s
        if self.source.kind == "power_sampler" and not self.source.self_timed:
            period = max(period or 0.0, 1.0 / self.sample_hz)
        return period

    def _gross(self, window: Window, trace: list[TraceSample]
               ) -> tuple[float | None, dict[str, float], int, list[str]]:
        assert self.source is not None
        warnings: list[str] = []
        resolution = self._resolution_s()
        if resolution and window.duration_s < SHORT_WINDOW_FACTOR * resolution:
            warnings.append(f"window shorter than {SHORT_WINDOW_FACTOR:g}x the sensor update period "
                            f"({resolution * 1e3:.1f} ms): its energy is mostly interpolation")
        if self.source.kind == "energy_counter":
            if window.start_count is None or window.end_count is None:
                return None, {}, 0, ["counter not read at the window edges"]
            rails = {k: window.end_count.rails[k] - window.start_count.rails.get(k, 0.0)
                     for k in window.end_count.rails}
            return window.end_count.total - window.start_count.total, rails, 0, warnings
        powered = [s for s in trace if s.power_w is not None]
        if not powered:
            return None, {}, 0, [f"no power samples ({self.sampling_error or 'trace empty'})"]
        times = [s.time_s for s in powered]
        coverage = covered_fraction(times, window.start_s, window.end_s)
        if coverage < 0.999:
            warnings.append(f"power trace covers only {coverage:.0%} of the window")
        gross, inside = trapezoid_j(times, [s.power_w for s in powered], window.start_s, window.end_s)  # type: ignore[misc]
        rails = {}
        for name in powered[-1].rails:
            with_rail = [s for s in powered if name in s.rails]
            rails[name] = trapezoid_j([s.time_s for s in with_rail], [s.rails[name] for s in with_rail],
                                      window.start_s, window.end_s)[0]
        return gross, rails, inside, warnings

    def achieved_sample_hz(self) -> float | None:
        """Polls per second actually achieved (None for counters' edge reads or a short trace)."""
        polled = [s.time_s for s in self.trace if not s.at_edge]
        if len(polled) < 2 or polled[-1] <= polled[0]:
            return None
        return (len(polled) - 1) / (polled[-1] - polled[0])

    def require_source(self) -> PowerSource:
        if self.source is None:
            raise MeasurementUnavailable(self.unavailable_reason or "no power source")
        return self.source
