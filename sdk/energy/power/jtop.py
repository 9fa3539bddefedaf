"""Jetson power through jtop (jetson-stats), where its service is installed and running.

jtop reads the same INA3221 monitors as ``ina3221.py`` but knows each board's rail names, so it is
the fallback where sysfs is not readable by this user. ``jtop.power`` (jetson-stats >= 4.2) holds
``{"rail": {name: {"power": mW, ...}}, "tot": {"power": mW, ...}}``; the total is jtop's own.
"""
from __future__ import annotations

import importlib
import logging
from pathlib import Path
from typing import Any

from edgetrain.sdk.errors import MeasurementUnavailable

from .base import PowerSource, RailValues, SourceOptions

_log = logging.getLogger(__name__)

JTOP_UPDATE_PERIOD_S = 0.5  # jtop's default refresh interval


class JtopSource(PowerSource):
    name = "jtop"
    kind = "power_sampler"

    def __init__(self, handle: Any, rails: tuple[str, ...]) -> None:
        super().__init__(JTOP_UPDATE_PERIOD_S, "jtop's total (input rail where the board has one)", rails)
        self._handle = handle

    @classmethod
    def detect(cls, root: Path, options: SourceOptions) -> JtopSource:
        try:
            module = importlib.import_module("jtop")
        except ImportError as exc:
            raise MeasurementUnavailable("jtop not installed (pip install jetson-stats)") from exc
        handle = module.jtop()
        try:
            handle.start()
            power = handle.power
            rails = tuple(sorted(power.get("rail", {})))
        except Exception as exc:  # jtop raises its own JtopException when its service is down
            raise MeasurementUnavailable(f"jtop service not reachable: {exc}") from exc
        return cls(handle, rails)

    def read_power_w(self) -> RailValues:
        power = self._handle.power
        rails = {name: float(values["power"]) / 1e3 for name, values in power.get("rail", {}).items()}
        return RailValues(float(power["tot"]["power"]) / 1e3, rails)

    def close(self) -> None:
        try:
            self._handle.close()
        except Exception as exc:  # noqa: BLE001 - closing a reader must never fail a benchmark
            _log.debug("closing %s failed: %s", self.name, exc)
