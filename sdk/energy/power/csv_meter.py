"""An external power meter's log: CSV lines ``time_unix_s,power_w`` (a header line is allowed).

USB and wall meters (and their logging scripts) stamp samples with the wall clock; this source
re-reads the file as it grows and maps each stamp onto ``time.monotonic()`` with one offset taken
when the source opens, so the meter's own sample times (not the polling times) are integrated.
"""
from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

from edgetrain.sdk.errors import MeasurementUnavailable

from .base import PowerSource, SourceOptions, TimedPower


def parse_meter_lines(text: str, source: str, allow_header: bool = True) -> list[tuple[float, float]]:
    """``(time_unix_s, power_w)`` pairs; a non-numeric first line is a header; a bad line fails."""
    rows: list[tuple[float, float]] = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        fields = [f.strip() for f in line.split(",")]
        try:
            stamp, watts = float(fields[0]), float(fields[1])
        except (ValueError, IndexError):
            if number == 1 and allow_header:
                continue  # header
            raise MeasurementUnavailable(f"{source}:{number}: expected 'time_unix_s,power_w', got {line[:60]!r}") from None
        rows.append((stamp, watts))
    return rows


class CsvMeterSource(PowerSource):
    name = "csv_meter"
    kind = "power_sampler"
    self_timed = True

    def __init__(self, path: Path, wall_minus_monotonic_s: float) -> None:
        super().__init__(None, f"external meter log {path}", ("meter",))
        self._path = path
        self._offset_s = wall_minus_monotonic_s
        self._consumed_bytes = 0
        self._pending = ""  # a line the meter has not finished writing yet

    @classmethod
    def detect(cls, root: Path, options: SourceOptions,
               wall: Callable[[], float] = time.time, mono: Callable[[], float] = time.monotonic) -> CsvMeterSource:
        if options.meter_csv is None:
            raise MeasurementUnavailable("no external meter log given (--meter-csv FILE)")
        path = Path(options.meter_csv)
        if not path.is_file():
            raise MeasurementUnavailable(f"{path}: meter log not found")
        return cls(path, wall() - mono())

    def read_new_samples(self) -> list[TimedPower]:
        try:
            with open(self._path, "rb") as fh:
                fh.seek(self._consumed_bytes)
                chunk = fh.read()
        except OSError as exc:
            raise MeasurementUnavailable(f"{self._path}: unreadable meter log ({exc})") from exc
        at_start = self._consumed_bytes == 0 and not self._pending
        self._consumed_bytes += len(chunk)
        text = self._pending + chunk.decode("utf-8", errors="replace")
        complete, _, self._pending = text.rpartition("\n")
        rows = parse_meter_lines(complete, str(self._path), allow_header=at_start)
        return [TimedPower(stamp - self._offset_s, watts) for stamp, watts in rows]
