"""Pick the power source: an explicit ``--power-source NAME``, else the first that detects.

Order: an external meter the user named (it sees the whole board at the wall), then the board's own
sensors (Jetson INA3221 via sysfs, jtop, Raspberry Pi 5 PMIC, RAPL, NVML). The CPU-time estimate
comes last and only when asked. When nothing detects, the result carries every source's reason.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from edgetrain.sdk.errors import ConfigError, MeasurementUnavailable

from .base import PowerSource, SourceOptions
from .csv_meter import CsvMeterSource
from .estimate import CpuTimeEstimate
from .ina3221 import Ina3221Source
from .jtop import JtopSource
from .nvml import NvmlSource
from .pi5_pmic import Pi5PmicSource
from .rapl import RaplSource

DETECTION_ORDER: tuple[type[PowerSource], ...] = (
    CsvMeterSource, Ina3221Source, JtopSource, Pi5PmicSource, RaplSource, NvmlSource, CpuTimeEstimate,
)
SOURCES: dict[str, type[PowerSource]] = {cls.name: cls for cls in DETECTION_ORDER}
DEFAULT_OPTIONS = SourceOptions()


@dataclass(frozen=True)
class Detection:
    """The chosen source (None when none works) and why each tried source was not usable."""

    source: PowerSource | None
    reasons: dict[str, str]

    @property
    def unavailable_reason(self) -> str:
        return "; ".join(f"{name}: {why}" for name, why in self.reasons.items())


def detect_power_source(root: Path | str = "/", options: SourceOptions = DEFAULT_OPTIONS,
                        override: str | None = None) -> Detection:
    """The source to use. ``override`` names one (``auto`` or None: detect); a named source that
    does not work raises MeasurementUnavailable, since the user asked for exactly that one."""
    root = Path(root)
    if override not in (None, "auto"):
        if override not in SOURCES:
            raise ConfigError(f"--power-source {override!r}: unknown (known: auto, {', '.join(SOURCES)})")
        return Detection(SOURCES[override].detect(root, options), {})
    reasons: dict[str, str] = {}
    for cls in DETECTION_ORDER:
        try:
            return Detection(cls.detect(root, options), reasons)
        except MeasurementUnavailable as exc:
            reasons[cls.name] = str(exc)
    return Detection(None, reasons)
