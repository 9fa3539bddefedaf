"""NVIDIA GPU energy from NVML's total-energy counter (Volta and newer), as Zeus reads it.

``nvmlDeviceGetTotalEnergyConsumption`` returns millijoules since the driver loaded, so windows are
counter differences. It covers the GPU board only, not the host CPU. ``pynvml`` (from the
``nvidia-ml-py`` package) is optional: without it this source is simply not detected.
"""
from __future__ import annotations

import importlib
import logging
from pathlib import Path
from typing import Any

from edgetrain.sdk.errors import MeasurementUnavailable

from .base import PowerSource, RailValues, SourceOptions

_log = logging.getLogger(__name__)

NVML_UPDATE_PERIOD_S = 0.1  # assumed; the counter's refresh rate is not documented per GPU


def _import_pynvml() -> Any:
    try:
        return importlib.import_module("pynvml")
    except ImportError as exc:
        raise MeasurementUnavailable("pynvml not installed (pip install nvidia-ml-py) or no NVIDIA driver") from exc


class NvmlSource(PowerSource):
    name = "nvml"
    kind = "energy_counter"

    def __init__(self, nvml: Any, handles: list[Any]) -> None:
        super().__init__(NVML_UPDATE_PERIOD_S, "sum of GPU total-energy counters (GPU boards only)",
                         tuple(f"gpu{i}" for i in range(len(handles))))
        self._nvml = nvml
        self._handles = handles
        self._start_mj = [float(nvml.nvmlDeviceGetTotalEnergyConsumption(h)) for h in handles]

    @classmethod
    def detect(cls, root: Path, options: SourceOptions) -> NvmlSource:
        nvml = _import_pynvml()
        try:
            nvml.nvmlInit()
            handles = [nvml.nvmlDeviceGetHandleByIndex(i) for i in range(nvml.nvmlDeviceGetCount())]
            if not handles:
                raise MeasurementUnavailable("NVML sees no GPU")
            return cls(nvml, handles)
        except nvml.NVMLError as exc:  # no driver, or a GPU older than Volta (not supported)
            raise MeasurementUnavailable(f"NVML total-energy counter unavailable: {exc}") from exc

    def read_energy_j(self) -> RailValues:
        rails = {f"gpu{i}": (float(self._nvml.nvmlDeviceGetTotalEnergyConsumption(h)) - start) / 1e3
                 for i, (h, start) in enumerate(zip(self._handles, self._start_mj))}
        return RailValues(sum(rails.values()), rails)

    def close(self) -> None:
        try:
            self._nvml.nvmlShutdown()
        except Exception as exc:  # noqa: BLE001 - shutting down a library we only read from must not fail a benchmark
            _log.debug("closing %s failed: %s", self.name, exc)
