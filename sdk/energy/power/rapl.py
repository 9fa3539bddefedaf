"""Intel (and recent AMD) RAPL energy counters via the Linux powercap interface.

Each domain ``/sys/class/powercap/intel-rapl:<pkg>[:<sub>]`` has ``energy_uj``, a counter that
wraps to 0 after ``max_energy_range_uj``; reading it often enough (every few minutes at most at
100 W) and adding the range on each backwards step recovers the true total (the method of
Khan et al., "RAPL in Action", ACM TOMPECS 2018). Since Linux 5.10 (CVE-2020-8694) the files are
root-only; detection says so rather than failing mid-run.
"""
from __future__ import annotations

import threading
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

POWERCAP_GLOB = "sys/class/powercap/intel-rapl:*"
RAPL_UPDATE_PERIOD_S = 0.001  # the hardware refreshes the counters about every millisecond


@dataclass(frozen=True)
class RaplDomain:
    name: str  # package-0, core, uncore, dram, psys (prefixed with the zone for uniqueness)
    energy_file: Path
    max_range_uj: float
    top_level: bool


def unwrap_delta_uj(previous_uj: float, current_uj: float, max_range_uj: float) -> float:
    """Energy between two reads of a counter that wraps to 0 after ``max_range_uj``."""
    delta = current_uj - previous_uj
    return delta + max_range_uj if delta < 0 else delta


class RaplSource(PowerSource):
    name = "rapl"
    kind = "energy_counter"

    def __init__(self, domains: list[RaplDomain]) -> None:
        self._domains = domains
        names = {d.name.split("/")[-1] for d in domains}
        # psys covers the whole SoC platform (packages included); else packages plus DRAM, which
        # sits outside the package domain. core/uncore are inside the package: never added.
        if "psys" in names:
            self._total = [d for d in domains if d.name.endswith("psys")]
            method = "psys domain (platform)"
        else:
            self._total = [d for d in domains if d.name.split("/")[-1].startswith("package") and d.top_level]
            self._total += [d for d in domains if d.name.endswith("dram")]
            method = "sum of package domains" + (" and dram" if any(d.name.endswith("dram") for d in domains) else "")
        super().__init__(RAPL_UPDATE_PERIOD_S, method, tuple(d.name for d in domains))
        self._lock = threading.Lock()  # window edges (main thread) and the sampler both read
        self._last_uj = {d.name: read_number(d.energy_file) for d in domains}
        self._joules = {d.name: 0.0 for d in domains}

    @classmethod
    def detect(cls, root: Path, options: SourceOptions) -> RaplSource:
        zones = sorted(root.glob(POWERCAP_GLOB))
        if not zones:
            raise MeasurementUnavailable(f"no RAPL domains under {under_root(root, '/sys/class/powercap')} "
                                         "(not an Intel/AMD x86 host, or a VM that hides them)")
        domains = []
        for zone in zones:
            if not (zone / "energy_uj").exists():
                continue
            label = f"{zone.name.split(':', 1)[1]}/{read_text(zone / 'name')}"  # e.g. "0/package-0"
            domains.append(RaplDomain(label, zone / "energy_uj", read_number(zone / "max_energy_range_uj"),
                                      top_level=zone.name.count(":") == 1))
        if not domains:
            raise MeasurementUnavailable(f"RAPL zones under {root} expose no energy_uj")
        return cls(domains)  # the constructor's first read fails here if energy_uj is root-only

    def read_energy_j(self) -> RailValues:
        with self._lock:
            for d in self._domains:
                now_uj = read_number(d.energy_file)
                self._joules[d.name] += unwrap_delta_uj(self._last_uj[d.name], now_uj, d.max_range_uj) / 1e6
                self._last_uj[d.name] = now_uj
            rails = dict(self._joules)
        return RailValues(sum(rails[d.name] for d in self._total), rails)
