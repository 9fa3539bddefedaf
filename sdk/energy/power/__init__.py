"""Power sources behind one seam (``PowerSource``) and their detection. Torch-free, board-side."""
from __future__ import annotations

from .base import PowerSource, RailValues, SourceKind, SourceOptions, TimedPower
from .detect import DETECTION_ORDER, SOURCES, Detection, detect_power_source

__all__ = ["DETECTION_ORDER", "SOURCES", "Detection", "PowerSource", "RailValues", "SourceKind",
           "SourceOptions", "TimedPower", "detect_power_source"]
