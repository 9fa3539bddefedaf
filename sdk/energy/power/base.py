"""The power-source seam: one class per sensor, each detected from a (possibly fake) file-system root.

A source is either an ``energy_counter`` (a cumulative joule counter: RAPL, NVML) that is differenced
at window edges, or a ``power_sampler`` (instantaneous watts: INA3221, Pi 5 PMIC, jtop, an external
meter) that ``edgetrain.sdk.energy.meter`` polls and integrates with the trapezoidal rule. The split follows
Zeus (You, Chung & Chowdhury, NSDI 2023), which prefers counters wherever hardware offers them.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar, Literal

from edgetrain.sdk.errors import MeasurementUnavailable

SourceKind = Literal["energy_counter", "power_sampler"]


@dataclass(frozen=True)
class SourceOptions:
    """Everything detection may need besides the root; tests point these at fakes."""

    vcgencmd: str = "vcgencmd"  # Raspberry Pi firmware tool (a fake script in tests)
    meter_csv: Path | None = None  # external meter log: ``time_unix_s,power_w`` lines
    estimate_watts: float | None = None  # only used when the user asks for an estimate


@dataclass(frozen=True)
class RailValues:
    """One reading: the board total and each named rail (watts or joules, per the source's kind).

    ``total`` comes from the input rail where the board has one; sub-rails are never added to it.
    """

    total: float
    rails: Mapping[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class TimedPower:
    """A sample an external meter stamped itself, on this process's monotonic clock."""

    time_s: float
    power_w: float


class PowerSource(ABC):
    """A detected sensor. ``detect`` returns a ready instance or raises MeasurementUnavailable
    with the reason this sensor is not usable here (the reasons are reported when none is)."""

    name: ClassVar[str] = "abstract"
    kind: ClassVar[SourceKind] = "power_sampler"
    is_estimate: ClassVar[bool] = False
    self_timed: ClassVar[bool] = False  # True: the source stamps its own samples (read_new_samples)

    def __init__(self, update_period_s: float | None, total_method: str, rail_names: tuple[str, ...]) -> None:
        self.update_period_s = update_period_s  # how often the sensor refreshes; None: unknown
        self.total_method = total_method  # how ``total`` is formed, said in the report
        self.rail_names = rail_names

    @classmethod
    @abstractmethod
    def detect(cls, root: Path, options: SourceOptions) -> PowerSource:
        """A ready source under ``root`` (``/`` on a real board), else MeasurementUnavailable."""

    def read_energy_j(self) -> RailValues:
        """Cumulative joules since this object was made (``energy_counter`` sources)."""
        raise MeasurementUnavailable(f"{self.name} is a {self.kind}; it has no energy counter")

    def read_power_w(self) -> RailValues:
        """Instantaneous watts (``power_sampler`` sources)."""
        raise MeasurementUnavailable(f"{self.name} is a {self.kind}; it gives no instantaneous power")

    def read_new_samples(self) -> list[TimedPower]:
        """Samples stamped by the source itself since the last call (``self_timed`` sources)."""
        raise MeasurementUnavailable(f"{self.name} does not stamp its own samples")

    def describe(self) -> dict[str, object]:
        return {"name": self.name, "kind": self.kind, "estimate": self.is_estimate,
                "update_period_s": self.update_period_s, "total_method": self.total_method,
                "rails": list(self.rail_names)}

    def close(self) -> None:
        """Release whatever the source holds (a library handle, a service connection)."""


def read_text(path: Path) -> str:
    """A sysfs attribute's text, stripped; MeasurementUnavailable names the file and the cause."""
    try:
        return path.read_text().strip()
    except PermissionError as exc:
        raise MeasurementUnavailable(f"{path}: permission denied (needs root, or a udev rule / chmod "
                                     "that makes it readable)") from exc
    except OSError as exc:
        raise MeasurementUnavailable(f"{path}: unreadable ({exc.strerror or exc})") from exc


def read_number(path: Path) -> float:
    text = read_text(path)
    try:
        return float(text)
    except ValueError:
        raise MeasurementUnavailable(f"{path}: expected a number, read {text[:40]!r}") from None


def under_root(root: Path, absolute: str) -> Path:
    """``absolute`` (e.g. ``/sys/class/powercap``) re-rooted at ``root``."""
    return Path(root) / absolute.lstrip("/")
