"""Jetson on-board INA3221 power monitors, read straight from sysfs (what jtop and tegrastats read).

Two kernel layouts exist: JetPack >= 5 binds the mainline ``ina3221`` hwmon driver
(``in<N>_label``, ``in<N>_input`` in mV, ``curr<N>_input`` in mA), older L4T the ``ina3221x`` iio
driver (``rail_name_<N>``, ``in_power<N>_input`` in mW, ``in_current<N>_input``,
``in_voltage<N>_input``). The board total is the input rail (``VDD_IN`` / ``POM_5V_IN``) alone:
the other rails are branches of it, so adding them to it would count power twice.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from edgetrain.sdk.errors import MeasurementUnavailable

from .base import (
    PowerSource,
    RailValues,
    SourceOptions,
    read_number,
    read_text,
    under_root,
)

INPUT_RAILS = ("VDD_IN", "POM_5V_IN")
HWMON_GLOB = "sys/bus/i2c/drivers/ina3221/*/hwmon/hwmon*"
IIO_GLOB = "sys/bus/i2c/drivers/ina3221x/*/iio:device*"


@dataclass(frozen=True)
class RailFiles:
    """Where one rail's numbers live; power is ``power_file`` (mW) or voltage (mV) x current (mA)."""

    name: str
    voltage_mv_file: Path | None
    current_ma_file: Path | None
    power_mw_file: Path | None = None

    def power_w(self) -> float:
        if self.power_mw_file is not None:
            return read_number(self.power_mw_file) / 1e3
        assert self.voltage_mv_file is not None and self.current_ma_file is not None
        return read_number(self.voltage_mv_file) * read_number(self.current_ma_file) / 1e6


def _hwmon_rails(root: Path) -> tuple[list[RailFiles], float | None]:
    rails: list[RailFiles] = []
    period_s: float | None = None
    for hwmon in sorted(root.glob(HWMON_GLOB)):
        for label_file in sorted(hwmon.glob("in*_label")):
            channel = label_file.name[2:-len("_label")]
            label = read_text(label_file)
            current = hwmon / f"curr{channel}_input"
            enable = hwmon / f"in{channel}_enable"
            # summation channels (in7 "sum of shunt voltages") have no current; "NC" = not connected
            if not current.exists() or label.upper() == "NC":
                continue
            if enable.exists() and read_text(enable) == "0":
                continue
            rails.append(RailFiles(label, hwmon / f"in{channel}_input", current))
        interval = hwmon / "update_interval"  # ms, the driver's conversion time for all channels
        if interval.exists():
            period_s = max(period_s or 0.0, read_number(interval) / 1e3)
    return rails, period_s


def _iio_rails(root: Path) -> list[RailFiles]:
    rails: list[RailFiles] = []
    for device in sorted(root.glob(IIO_GLOB)):
        for name_file in sorted(device.glob("rail_name_*")):
            channel = name_file.name.rsplit("_", 1)[1]
            power = device / f"in_power{channel}_input"
            rails.append(RailFiles(read_text(name_file), device / f"in_voltage{channel}_input",
                                   device / f"in_current{channel}_input",
                                   power if power.exists() else None))
    return rails


class Ina3221Source(PowerSource):
    name = "ina3221"
    kind = "power_sampler"

    def __init__(self, rails: list[RailFiles], layout: str, update_period_s: float | None) -> None:
        names = tuple(r.name for r in rails)
        inputs = [r for r in rails if r.name in INPUT_RAILS]
        self._rails = rails
        self._input = inputs[0] if inputs else None
        method = (f"input rail {self._input.name} ({layout} layout)" if self._input else
                  f"sum of all rails ({layout} layout; no input rail, so board losses are missing)")
        super().__init__(update_period_s, method, names)

    @classmethod
    def detect(cls, root: Path, options: SourceOptions) -> Ina3221Source:
        rails, period_s = _hwmon_rails(root)
        layout = "hwmon"
        if not rails:
            rails, period_s, layout = _iio_rails(root), None, "iio"
        if not rails:
            raise MeasurementUnavailable(f"no INA3221 rails under {under_root(root, '/sys/bus/i2c/drivers')}"
                                         "/ina3221{,x} (not a Jetson, or the driver is not bound)")
        source = cls(rails, layout, period_s)
        source.read_power_w()  # fail at detection, not mid-run, if a file is unreadable
        return source

    def read_power_w(self) -> RailValues:
        rails = {r.name: r.power_w() for r in self._rails}
        total = rails[self._input.name] if self._input else sum(rails.values())
        return RailValues(total, rails)
