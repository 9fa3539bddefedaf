"""What a benchmark ran on, recorded with every result (MLPerf Power's "system description").

Everything is read from an overridable root (tests build fake trees) or from commands whose path
is overridable; whatever is absent is None, never guessed. Library versions come from package
metadata, so recording torch's version never imports torch.
"""
from __future__ import annotations

import importlib.metadata
import platform
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

from edgetrain.sdk.energy.power.base import under_root

LIBRARIES = ("edgetrain", "numpy", "torch", "onnxruntime-training-cpu", "onnxruntime", "executorch",
             "paho-mqtt", "safetensors", "psutil")
# vcgencmd get_throttled bits (Raspberry Pi firmware documentation)
THROTTLE_BITS = {0: "under_voltage", 1: "arm_frequency_capped", 2: "throttled", 3: "soft_temperature_limit",
                 16: "under_voltage_occurred", 17: "arm_frequency_capping_occurred",
                 18: "throttling_occurred", 19: "soft_temperature_limit_occurred"}


def _read(root: Path, absolute: str) -> str | None:
    try:
        return under_root(root, absolute).read_text(errors="replace").replace("\x00", "").strip()
    except OSError:
        return None


def _command(command: str, *args: str) -> str | None:
    path = shutil.which(command)
    if path is None:
        return None
    try:
        done = subprocess.run([path, *args], capture_output=True, text=True, timeout=5, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return done.stdout.strip() if done.returncode == 0 else None


def parse_os_release(text: str | None) -> str | None:
    if text is None:
        return None
    fields = dict(line.split("=", 1) for line in text.splitlines() if "=" in line)
    name = fields.get("PRETTY_NAME") or fields.get("NAME")
    return name.strip().strip('"') if name else None


def parse_l4t_release(text: str | None) -> str | None:
    """``# R35 (release), REVISION: 4.1, …`` -> ``35.4.1`` (JetPack 5.1.2 ships L4T 35.4.1)."""
    if not text:
        return None
    match = re.search(r"R(\d+)\s*\(release\),\s*REVISION:\s*([\d.]+)", text)
    return f"{match[1]}.{match[2]}" if match else text.splitlines()[0]


def parse_throttled(text: str | None) -> dict[str, Any] | None:
    """``throttled=0x50005`` -> the raw value and the names of the bits that are set."""
    match = re.search(r"throttled=(0x[0-9a-fA-F]+)", text or "")
    if not match:
        return None
    value = int(match[1], 16)
    return {"raw": match[1], "flags": [name for bit, name in THROTTLE_BITS.items() if value >> bit & 1]}


def parse_nvpmodel(text: str | None) -> str | None:
    match = re.search(r"NV Power Mode:\s*(\S+)", text or "")
    return match[1] if match else None


def read_temperatures_c(root: Path) -> dict[str, float] | None:
    """Each thermal zone's temperature in degrees C, keyed by its type (None: no thermal zones)."""
    zones = sorted(under_root(root, "/sys/class/thermal").glob("thermal_zone*"))
    temps: dict[str, float] = {}
    for zone in zones:
        kind, raw = _read(zone, "type"), _read(zone, "temp")
        try:
            temps[f"{kind or zone.name}" if kind not in temps else f"{kind}.{zone.name}"] = int(raw or "") / 1000.0
        except ValueError:
            continue  # a zone whose sensor is off reads as an error; skip it
    return temps or None


def _governors(root: Path) -> dict[str, str] | None:
    found = {}
    for path in sorted(under_root(root, "/sys/devices/system/cpu").glob("cpu[0-9]*/cpufreq/scaling_governor")):
        value = _read(path, "")
        if value:
            found[path.parent.parent.name] = value
    if not found:
        return None
    distinct = set(found.values())
    return {"all": distinct.pop()} if len(distinct) == 1 else found


def library_versions() -> dict[str, str | None]:
    versions: dict[str, str | None] = {}
    for name in LIBRARIES:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def collect_context(root: Path | str = "/", vcgencmd: str = "vcgencmd", nvpmodel: str = "nvpmodel") -> dict[str, Any]:
    """The board, OS, kernel, governor, power mode, temperatures, throttling and library versions."""
    root = Path(root)
    is_real_root = root.resolve() == Path("/")
    return {
        "board_model": _read(root, "/proc/device-tree/model"),
        "l4t_release": parse_l4t_release(_read(root, "/etc/nv_tegra_release")),
        "os": parse_os_release(_read(root, "/etc/os-release")),
        "kernel": _read(root, "/proc/sys/kernel/osrelease"),
        "machine": platform.machine() if is_real_root else None,
        "cpu_count": len(list(under_root(root, "/sys/devices/system/cpu").glob("cpu[0-9]*"))) or None,
        "cpu_governor": _governors(root),
        "nvpmodel_mode": parse_nvpmodel(_command(nvpmodel, "-q")),
        "temperatures_c": read_temperatures_c(root),
        "pi_throttled": parse_throttled(_command(vcgencmd, "get_throttled")),
        "python": sys.version.split()[0],
        "libraries": library_versions(),
    }
