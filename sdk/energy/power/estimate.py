"""An energy *estimate*: this process's CPU seconds x a watt figure per busy core that the user gives.

Used only when asked (``--estimate-watts W``) and no sensor exists; every figure it yields is
labelled ``estimate``. It ignores idle power, other processes, memory and radios: a rough proxy,
in the spirit of CodeCarbon's TDP fallback, never a measurement.
"""
from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

from edgetrain.sdk.errors import ConfigError, MeasurementUnavailable

from .base import PowerSource, RailValues, SourceOptions


class CpuTimeEstimate(PowerSource):
    name = "estimate"
    kind = "energy_counter"
    is_estimate = True

    def __init__(self, watts: float, cpu_time_s: Callable[[], float] = time.process_time) -> None:
        if not watts > 0 or watts == float("inf"):
            raise ConfigError(f"--estimate-watts must be a positive finite number, got {watts}")
        super().__init__(None, f"estimate: process CPU time x {watts} W", ("cpu_time",))
        self.watts = watts
        self._cpu_time_s = cpu_time_s
        self._start_s = cpu_time_s()

    @classmethod
    def detect(cls, root: Path, options: SourceOptions) -> CpuTimeEstimate:
        if options.estimate_watts is None:
            raise MeasurementUnavailable("no estimate asked for (--estimate-watts W)")
        return cls(options.estimate_watts)

    def read_energy_j(self) -> RailValues:
        joules = (self._cpu_time_s() - self._start_s) * self.watts
        return RailValues(joules, {"cpu_time": joules})
