"""What a run leaves behind: one JSON line per round, a summary, and two plots.

Round 0 (``INITIAL_ROUND``) is the initial model's test evaluation, logged once before round 1, so every
plot starts where training started; it is not a round (``training_rounds``): summaries and reports count
rounds from 1.

``metrics.jsonl`` is append-only, each line flushed and fsynced, so a killed aggregator loses at
most the line it was writing. On resume, ``MetricsLog.truncate_after(checkpoint_round)`` drops the
rounds the checkpoint does not cover, so no round appears twice. Lines are strict JSON: a
non-finite loss or accuracy (a diverged model) is written as null.
"""
from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Iterable, Mapping

from edgetrain.sdk.atomic_write import atomic_write_text
from edgetrain.sdk.errors import ConfigError, DataError

METRICS_FILE = "metrics.jsonl"
SUMMARY_FILE = "summary.json"
PLOT_ACCURACY_VS_ROUND = "accuracy_vs_round.png"
PLOT_ACCURACY_VS_UPLINK = "accuracy_vs_uplink_mb.png"
BYTES_PER_MB = 1_000_000  # decimal megabytes, as network figures are usually quoted
INITIAL_ROUND = 0  # the initial model's evaluation; training rounds count from 1


def training_rounds(records: Iterable["RoundRecord"]) -> list["RoundRecord"]:
    """``records`` without round 0 (the initial model's evaluation): the rounds that trained."""
    return [r for r in records if r.round_id != INITIAL_ROUND]


def _finite_or_none(value: float | None) -> float | None:
    return None if value is None or not math.isfinite(value) else float(value)


@dataclass(frozen=True)
class RoundRecord:
    """One completed round: what was asked, what came back, what it cost, how good the model is."""

    round_id: int
    model_version: int
    accuracy: float | None  # test accuracy after the round, in [0, 1]; None if not evaluated
    loss: float | None  # test loss after the round
    devices_chosen: int
    devices_reported: int  # accepted updates
    devices_rejected: Mapping[str, int]  # reject reason -> count
    rejected_detail: tuple[str, ...]  # one human-readable line per rejection
    bytes_up: int  # device -> aggregator update frames this round, chunk and frame headers included (accepted and rejected)
    bytes_down: int  # aggregator -> devices frames this round: the announcement once per live device, plus acks
    round_wall_s: float
    retried: bool = False  # the round had to be re-run (too few updates the first time)
    total_examples: int = 0  # examples behind the accepted updates (after capping)
    devices_timed_out: int = 0
    # Examples the accepted updates trained on, from the round's settings: E epochs x the device's examples,
    # K steps x B, or one batch of B for a large-batch step (nominal: a short last batch counts whole).
    examples_processed: int = 0
    # Device -> aggregator instrumentation frames (metrics and status messages): not in bytes_up, on the network.
    metrics_bytes_up: int = 0
    extra: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for name in ("round_id", "model_version", "devices_chosen", "devices_reported", "bytes_up",
                     "bytes_down", "total_examples", "devices_timed_out", "examples_processed", "metrics_bytes_up"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ConfigError(f"RoundRecord.{name} must be an int >= 0, got {value!r}")
        if not self.round_wall_s >= 0:
            raise ConfigError(f"RoundRecord.round_wall_s must be >= 0, got {self.round_wall_s}")

    def to_json_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["accuracy"] = _finite_or_none(self.accuracy)
        data["loss"] = _finite_or_none(self.loss)
        data["devices_rejected"] = dict(self.devices_rejected)
        data["rejected_detail"] = list(self.rejected_detail)
        data["extra"] = dict(self.extra)
        return data

    @classmethod
    def from_json_dict(cls, raw: Mapping[str, Any]) -> "RoundRecord":
        known = {f.name for f in fields(cls)}
        unknown = set(raw) - known
        if unknown:
            raise DataError(f"round record has unknown field(s) {sorted(unknown)}")
        values = dict(raw)
        values["devices_rejected"] = {str(k): int(v) for k, v in dict(values.get("devices_rejected", {})).items()}
        values["rejected_detail"] = tuple(str(x) for x in values.get("rejected_detail", ()))
        values["extra"] = dict(values.get("extra") or {})
        try:
            return cls(**values)
        except TypeError as exc:
            raise DataError(f"round record is missing a field ({exc})") from exc


class MetricsLog:
    """``<run_dir>/metrics.jsonl``: one ``RoundRecord`` per line, round ids strictly increasing.

    Opening the log cuts a torn last line (a write killed mid-way), so the next append starts on
    a fresh line.
    """

    def __init__(self, run_dir: Path | str) -> None:
        self.path = Path(run_dir) / METRICS_FILE
        self.path.parent.mkdir(parents=True, exist_ok=True)
        entries, torn = self._entries()
        if torn:
            self._rewrite([line for line, _ in entries])
        self._last_round: int | None = entries[-1][1].round_id if entries else None

    def _entries(self) -> tuple[list[tuple[str, RoundRecord]], bool]:
        """(line, record) for every complete line, and whether a torn last line was found."""
        if not self.path.exists():
            return [], False
        lines = self.path.read_text(encoding="utf-8").split("\n")
        torn = lines[-1] != ""  # every complete line ends with "\n"
        entries = []
        for number, line in enumerate(lines[:-1], start=1):
            if not line.strip():
                continue
            try:
                entries.append((line, RoundRecord.from_json_dict(json.loads(line))))
            except (json.JSONDecodeError, DataError, TypeError, ValueError, AttributeError) as exc:
                raise DataError(f"{self.path}:{number}: not a round record ({exc})") from exc
        return entries, torn

    def _rewrite(self, lines: list[str]) -> None:
        atomic_write_text(self.path, "".join(line + "\n" for line in lines))

    def read(self) -> list[RoundRecord]:
        """Every complete record; a torn final line is ignored, a corrupt earlier one is an error."""
        return [record for _, record in self._entries()[0]]

    def append(self, record: RoundRecord) -> None:
        """Append one round, durably (flush + fsync) before returning."""
        if self._last_round is not None and record.round_id <= self._last_round:
            raise ConfigError(f"{self.path}: round {record.round_id} logged after round {self._last_round}; "
                              "on resume call truncate_after(checkpoint_round) first")
        line = json.dumps(record.to_json_dict(), sort_keys=True, allow_nan=False)
        with open(self.path, "a", encoding="utf-8") as fh:
            fh.write(line + "\n")
            fh.flush()
            os.fsync(fh.fileno())
        self._last_round = record.round_id

    def truncate_after(self, round_id: int) -> int:
        """Keep only rounds ``<= round_id`` (the checkpoint's round); return how many records went."""
        entries, torn = self._entries()
        kept = [(line, record) for line, record in entries if record.round_id <= round_id]
        if len(kept) != len(entries) or torn:
            self._rewrite([line for line, _ in kept])
        self._last_round = kept[-1][1].round_id if kept else None
        return len(entries) - len(kept)


def write_summary(run_dir: Path | str, records: Iterable[RoundRecord], extra: Mapping[str, Any] | None = None) -> Path:
    """``<run_dir>/summary.json``: totals and best/final accuracy over ``records`` plus ``extra``;
    ``num_rounds`` counts training rounds, ``initial_accuracy`` is round 0's (None without one)."""
    records = list(records)
    initial = next((r for r in records if r.round_id == INITIAL_ROUND), None)
    evaluated = [r for r in records if r.accuracy is not None and math.isfinite(r.accuracy)]
    best = max(evaluated, key=lambda r: r.accuracy or 0.0) if evaluated else None
    rejections: dict[str, int] = {}
    for record in records:
        for reason, count in record.devices_rejected.items():
            rejections[reason] = rejections.get(reason, 0) + count
    summary = {
        "num_rounds": len(training_rounds(records)),
        "initial_accuracy": _finite_or_none(initial.accuracy) if initial else None,
        "last_round": records[-1].round_id if records else None,
        "final_accuracy": _finite_or_none(evaluated[-1].accuracy) if evaluated else None,
        "final_loss": _finite_or_none(evaluated[-1].loss) if evaluated else None,
        "best_accuracy": _finite_or_none(best.accuracy) if best else None,
        "best_accuracy_round": best.round_id if best else None,
        "total_bytes_up": sum(r.bytes_up for r in records),
        "total_bytes_down": sum(r.bytes_down for r in records),
        "total_wall_s": sum(r.round_wall_s for r in records),
        "total_examples": sum(r.total_examples for r in records),
        "total_examples_processed": sum(r.examples_processed for r in records),
        "total_metrics_bytes_up": sum(r.metrics_bytes_up for r in records),
        "updates_accepted": sum(r.devices_reported for r in records),
        "updates_rejected": rejections,
        "rounds_retried": sum(1 for r in records if r.retried),
        "extra": dict(extra or {}),
    }
    try:
        text = json.dumps(summary, indent=2, sort_keys=True, allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"summary extra is not plain JSON ({exc})") from exc
    path = Path(run_dir) / SUMMARY_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, text + "\n")
    return path


def plot_run(run_dir: Path | str) -> tuple[Path, Path]:
    """PNGs of test accuracy vs round and vs cumulative uplink MB, from ``metrics.jsonl``."""
    # The object API with the Agg canvas: no pyplot, no global backend switch, no display needed.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    run_dir = Path(run_dir)
    records = MetricsLog(run_dir).read()
    uplink_mb, points = 0.0, []
    for record in records:
        uplink_mb += record.bytes_up / BYTES_PER_MB  # every round's bytes count, evaluated or not
        if record.accuracy is not None and math.isfinite(record.accuracy):
            points.append((record.round_id, uplink_mb, record.accuracy))
    if not points:
        raise DataError(f"{run_dir / METRICS_FILE}: no evaluated round to plot")
    rounds, cumulative_mb, accuracy = zip(*points)
    outputs = []
    for x, xlabel, name in ((rounds, "round", PLOT_ACCURACY_VS_ROUND),
                            (cumulative_mb, "cumulative uplink (MB, 10^6 bytes)", PLOT_ACCURACY_VS_UPLINK)):
        figure = Figure(figsize=(6, 4), dpi=100)
        FigureCanvasAgg(figure)
        axes = figure.add_subplot(1, 1, 1)
        axes.plot(x, accuracy, marker="o", markersize=3)
        axes.set_xlabel(xlabel)
        if name == PLOT_ACCURACY_VS_ROUND:  # rounds are whole: no 1.5 tick on a 3-round run
            axes.xaxis.set_major_locator(MaxNLocator(integer=True))
        axes.set_ylabel("test accuracy")
        axes.set_title(run_dir.name)
        axes.grid(True, alpha=0.3)
        figure.tight_layout()
        path = run_dir / name
        figure.savefig(path)
        outputs.append(path)
    return outputs[0], outputs[1]
