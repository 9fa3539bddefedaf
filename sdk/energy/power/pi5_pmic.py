"""Raspberry Pi 5 power from its PMIC's ADCs (``vcgencmd pmic_read_adc``).

The firmware prints one current (``<RAIL>_A current(n)=0.0517A``) and one voltage
(``<RAIL>_V volt(n)=3.31V``) per rail; power is the sum of V x I over rails having both. The PMIC
does not see the 5 V input itself (``EXT5V_V`` has no current), so USB peripherals and the
regulators' losses are missing: the total under-reads the wall power, and the report says so.
"""
from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

from edgetrain.sdk.errors import MeasurementUnavailable

from .base import PowerSource, RailValues, SourceOptions

_LINE = re.compile(r"^\s*(?P<rail>\S+)_(?P<unit>[AV])\s+(?:current|volt)\(\d+\)=(?P<value>[-+0-9.eE]+)[AV]\s*$")
PMIC_UPDATE_PERIOD_S = 0.1  # assumed: the firmware gives no figure; one vcgencmd call takes ~10 ms
TIMEOUT_S = 5.0


def parse_pmic_adc(text: str) -> dict[str, float]:
    """Rail name -> watts from ``vcgencmd pmic_read_adc`` output (rails lacking V or I are skipped)."""
    amps: dict[str, float] = {}
    volts: dict[str, float] = {}
    for line in text.splitlines():
        match = _LINE.match(line)
        if match:
            (amps if match["unit"] == "A" else volts)[match["rail"]] = float(match["value"])
    return {rail: amps[rail] * volts[rail] for rail in amps if rail in volts}


def run_vcgencmd(command: str, *args: str) -> str:
    """stdout of ``vcgencmd args``; MeasurementUnavailable when it is missing or fails."""
    path = shutil.which(command)
    if path is None:
        raise MeasurementUnavailable(f"{command}: command not found (not a Raspberry Pi OS image)")
    try:
        done = subprocess.run([path, *args], capture_output=True, text=True, timeout=TIMEOUT_S, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise MeasurementUnavailable(f"{command} {' '.join(args)}: {exc}") from exc
    if done.returncode != 0:
        raise MeasurementUnavailable(f"{command} {' '.join(args)} exited {done.returncode}: "
                                     f"{(done.stderr or done.stdout).strip()[:120]}")
    return done.stdout


class Pi5PmicSource(PowerSource):
    name = "pi5_pmic"
    kind = "power_sampler"

    def __init__(self, command: str, rails: tuple[str, ...]) -> None:
        super().__init__(PMIC_UPDATE_PERIOD_S, "sum of PMIC rails (excludes 5 V input losses and USB devices)",
                         rails)
        self._command = command

    @classmethod
    def detect(cls, root: Path, options: SourceOptions) -> Pi5PmicSource:
        rails = parse_pmic_adc(run_vcgencmd(options.vcgencmd, "pmic_read_adc"))
        if not rails:  # a Pi 4's firmware answers "Command not registered"
            raise MeasurementUnavailable(f"{options.vcgencmd} pmic_read_adc printed no rail readings "
                                         "(not a Raspberry Pi 5?)")
        return cls(options.vcgencmd, tuple(sorted(rails)))

    def read_power_w(self) -> RailValues:
        rails = parse_pmic_adc(run_vcgencmd(self._command, "pmic_read_adc"))
        return RailValues(sum(rails.values()), rails)
