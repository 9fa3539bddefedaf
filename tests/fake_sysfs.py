"""Fake sysfs/proc/etc trees and fake commands for device_bench tests.

Each builder writes the files a real kernel driver or tool exposes, in its units, under a test's
tmp root; ``set_*`` methods change readings between polls so tests drive the trace explicitly.
"""
from __future__ import annotations

import stat
from dataclasses import dataclass, field
from pathlib import Path


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


class FakeClock:
    """A monotonic clock a test sets by hand."""

    def __init__(self, start_s: float = 0.0) -> None:
        self.now_s = start_s

    def __call__(self) -> float:
        return self.now_s


@dataclass
class FakeIna3221Hwmon:
    """JetPack >= 5: ``/sys/bus/i2c/drivers/ina3221/1-0040/hwmon/hwmon3`` with in/curr channels."""

    root: Path
    rails: dict[str, tuple[float, float]]  # label -> (bus mV, mA), channels numbered from 1
    update_interval_ms: int | None = None
    device: str = "1-0040"
    hwmon: Path = field(init=False)

    def __post_init__(self) -> None:
        self.hwmon = self.root / "sys/bus/i2c/drivers/ina3221" / self.device / "hwmon/hwmon3"
        self._channel: dict[str, int] = {}
        for channel, (label, (mv, ma)) in enumerate(self.rails.items(), start=1):
            self._channel[label] = channel
            write(self.hwmon / f"in{channel}_label", label + "\n")
            write(self.hwmon / f"in{channel}_enable", "1\n")
            self.set(label, mv, ma)
        # the driver's summation channel: a label, a voltage, no current (must be skipped)
        write(self.hwmon / "in7_label", "sum of shunt voltages\n")
        write(self.hwmon / "in7_input", "123\n")
        if self.update_interval_ms is not None:
            write(self.hwmon / "update_interval", f"{self.update_interval_ms}\n")

    def set(self, label: str, mv: float, ma: float) -> None:
        channel = self._channel[label]
        write(self.hwmon / f"in{channel}_input", f"{int(mv)}\n")
        write(self.hwmon / f"curr{channel}_input", f"{int(ma)}\n")


@dataclass
class FakeIna3221Iio:
    """Older L4T: ``/sys/bus/i2c/drivers/ina3221x/6-0040/iio:device0`` with rail_name_N files."""

    root: Path
    rails: dict[str, float]  # rail name -> mW (voltage/current written consistently at 5 V)
    device: str = "6-0040"
    iio: Path = field(init=False)

    def __post_init__(self) -> None:
        self.iio = self.root / "sys/bus/i2c/drivers/ina3221x" / self.device / "iio:device0"
        self._channel = {name: i for i, name in enumerate(self.rails)}
        for name, mw in self.rails.items():
            write(self.iio / f"rail_name_{self._channel[name]}", name + "\n")
            self.set(name, mw)

    def set(self, name: str, mw: float) -> None:
        channel = self._channel[name]
        write(self.iio / f"in_power{channel}_input", f"{int(mw)}\n")
        write(self.iio / f"in_voltage{channel}_input", "5000\n")
        write(self.iio / f"in_current{channel}_input", f"{int(mw / 5)}\n")


@dataclass
class FakeRapl:
    """``/sys/class/powercap/intel-rapl:<zone>`` directories with wrapping energy_uj counters."""

    root: Path
    zones: dict[str, tuple[str, int, int]]  # zone id ("0", "0:0") -> (name, energy_uj, max_energy_range_uj)

    def __post_init__(self) -> None:
        for zone, (name, energy_uj, max_uj) in self.zones.items():
            directory = self.path(zone)
            write(directory / "name", name + "\n")
            write(directory / "max_energy_range_uj", f"{max_uj}\n")
            self.set(zone, energy_uj)

    def path(self, zone: str) -> Path:
        return self.root / f"sys/class/powercap/intel-rapl:{zone}"

    def set(self, zone: str, energy_uj: int) -> None:
        write(self.path(zone) / "energy_uj", f"{energy_uj}\n")


def pmic_adc_text(rails: dict[str, tuple[float, float]], input_volts: float = 5.1) -> str:
    """``vcgencmd pmic_read_adc`` output for rails name -> (amps, volts), in the firmware's format."""
    lines = [f"{name + '_A':>16} current({i})={amps:.8f}A" for i, (name, (amps, _)) in enumerate(rails.items())]
    lines += [f"{name + '_V':>16} volt({i + 8})={volts:.8f}V" for i, (name, (_, volts)) in enumerate(rails.items())]
    lines.append(f"{'EXT5V_V':>16} volt(24)={input_volts:.8f}V")  # input voltage: no current, not a rail
    return "\n".join(lines) + "\n"


@dataclass
class FakeVcgencmd:
    """An executable stand-in for vcgencmd: ``pmic_read_adc`` prints ``pmic.txt``,
    ``get_throttled`` prints ``throttled.txt``; anything else fails like the real one."""

    directory: Path
    script: Path = field(init=False)

    def __post_init__(self) -> None:
        self.script = write(self.directory / "vcgencmd", (
            "#!/bin/sh\n"
            f'case "$1" in\n'
            f'  pmic_read_adc) cat "{self.directory}/pmic.txt" ;;\n'
            f'  get_throttled) cat "{self.directory}/throttled.txt" ;;\n'
            '  *) echo \'error=2 error_msg="Command not registered"\'; exit 2 ;;\n'
            "esac\n"))
        self.script.chmod(self.script.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
        self.set_throttled(0)

    def set_pmic(self, rails: dict[str, tuple[float, float]]) -> None:
        write(self.directory / "pmic.txt", pmic_adc_text(rails))

    def set_throttled(self, value: int) -> None:
        write(self.directory / "throttled.txt", f"throttled={value:#x}\n")


def fake_command(directory: Path, name: str, output: str) -> Path:
    """An executable that prints ``output`` (e.g. ``nvpmodel -q``)."""
    script = write(directory / name, "#!/bin/sh\ncat <<'EOF'\n" + output + "\nEOF\n")
    script.chmod(0o755)
    return script


def jetson_board_files(root: Path) -> None:
    """The /proc and /etc files a Jetson Orin Nano on JetPack 5.1.2 has, plus thermal zones and governors."""
    write(root / "proc/device-tree/model", "NVIDIA Jetson Orin Nano Developer Kit\x00")
    write(root / "etc/nv_tegra_release",
          "# R35 (release), REVISION: 4.1, GCID: 33958178, BOARD: t186ref, EABI: aarch64, DATE: Tue Aug  1 19:57:35 UTC 2023\n")
    write(root / "etc/os-release", 'NAME="Ubuntu"\nPRETTY_NAME="Ubuntu 20.04.6 LTS"\nID=ubuntu\n')
    write(root / "proc/sys/kernel/osrelease", "5.10.120-tegra\n")
    for i, (kind, milli_c) in enumerate((("cpu-thermal", 48500), ("gpu-thermal", 47000))):
        write(root / f"sys/class/thermal/thermal_zone{i}/type", kind + "\n")
        write(root / f"sys/class/thermal/thermal_zone{i}/temp", f"{milli_c}\n")
    for cpu in range(2):
        write(root / f"sys/devices/system/cpu/cpu{cpu}/cpufreq/scaling_governor", "schedutil\n")
