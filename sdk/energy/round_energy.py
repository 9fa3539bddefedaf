"""Energy of a fleet device's rounds: one ``EnergyMeter`` window per round (or per group of
large-batch steps), opened by ``sdk.device`` around compute and encoding.

Cheap by construction, since a device runs for days: counter sources (RAPL, NVML) are read only at
the two window edges (no thread); sampler sources (INA3221, Pi 5 PMIC, jtop, meters) are polled on
the meter's thread only while a window is open, and the trace is dropped once the window's joules
are known. Counter differencing and trapezoidal integration are the meter's (Zeus: You, Chung &
Chowdhury, NSDI 2023). No idle baseline here: a round's joules are gross (the board's total).
"""
from __future__ import annotations

import logging
from pathlib import Path

from edgetrain.sdk.errors import EdgetrainError

from .power import SourceOptions, detect_power_source
from .power.detect import DEFAULT_OPTIONS
from .power.base import PowerSource
from .meter import EnergyMeter

_log = logging.getLogger(__name__)
WINDOW = "round"


class RoundEnergy:
    """``sdk.device_metrics.EnergyProbe`` over a detected power source."""

    def __init__(self, source: PowerSource, sample_hz: float = 20.0) -> None:
        self.source = source
        self.meter = EnergyMeter(source, sample_hz=sample_hz)
        self._sampled = source.kind == "power_sampler"
        self.last_warnings: tuple[str, ...] = ()
        self._open = False

    @property
    def method(self) -> str:
        return "estimate" if self.source.is_estimate else (
            "trapezoid" if self._sampled else "counter")

    def begin(self) -> None:
        if self._open:  # the last round raised before its window closed: drop that window
            self.end()
        self.meter.sampling_error = None  # a sensor hiccup in an earlier round must not void this one
        self._open = True
        try:
            if self._sampled:
                self.meter.start()  # takes a first sample now, so the window's start is covered
            self.meter.begin_window(WINDOW)
        except EdgetrainError as exc:  # a sensor failing must cost the round's joules, never the round
            self._open = False
            _log.warning("energy of this round unavailable: %s", exc)

    def end(self) -> tuple[float | None, float]:
        """(gross joules of the window, or None when it could not be measured; its duration)."""
        if not self._open:
            return None, 0.0
        self._open = False
        try:
            window = self.meter.end_window(WINDOW)
            if self._sampled:
                self.meter.stop()  # joins the thread, takes a last sample: the window's end is covered
            energy = self.meter.energy(window)
        except EdgetrainError as exc:
            self.meter.stop()
            _log.warning("energy of this round unavailable: %s", exc)
            return None, 0.0
        self.meter.discard_before(window.end_s)
        self.last_warnings = energy.warnings
        if self.meter.sampling_error is not None:
            _log.warning("energy of this round unavailable: %s", self.meter.sampling_error)
            return None, window.duration_s
        return energy.gross_j, window.duration_s

    def describe(self) -> dict[str, object]:
        """For the device's status: which sensor, how totals are formed, and the method."""
        return {"power_source": self.source.name, "energy_method": self.method,
                "energy_total": self.source.total_method}

    def close(self) -> None:
        self.meter.stop()
        self.source.close()


def open_round_energy(override: str = "auto", root: Path | str = "/", options: SourceOptions = DEFAULT_OPTIONS,
                      sample_hz: float = 20.0) -> tuple[RoundEnergy | None, str]:
    """(the probe, "") or (None, why no energy will be measured). ``override`` ``none`` turns it off;
    a named source that does not work raises MeasurementUnavailable (the user asked for it)."""
    if override == "none":
        return None, "turned off (--power-source none)"
    detection = detect_power_source(root, options, override)
    if detection.source is None:
        return None, f"no power source detected ({detection.unavailable_reason})"
    return RoundEnergy(detection.source, sample_hz), ""
