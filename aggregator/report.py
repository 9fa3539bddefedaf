"""``edgetrain report``: compare run directories — a Markdown table and plots.

A run directory is what ``aggregate`` / ``simulate`` write (``metrics.jsonl`` + ``summary.json``).
For each run: final and best accuracy; the rounds (or steps), cumulative uplink and downlink MB and
wall time needed to first reach each target accuracy; per-device CPU seconds (an energy proxy) and
joules where a power source reported them. Cumulative figures count every round up to and including
the one that reached the target. Then one row per configuration across seeds (``report_groups``).
"""
from __future__ import annotations

import argparse
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

from edgetrain.sdk.errors import ConfigError, DataError

from .report_groups import configuration_key, group_name, group_runs, group_table
from .results import BYTES_PER_MB, METRICS_FILE, SUMMARY_FILE, MetricsLog, RoundRecord, training_rounds

DEFAULT_TARGETS = (0.85, 0.88)


@dataclass(frozen=True)
class Milestone:
    """Cost of first reaching a target accuracy."""

    round_id: int
    uplink_mb: float
    downlink_mb: float
    wall_s: float
    examples: int | None = None  # examples processed up to it; None where the run did not record them


@dataclass(frozen=True)
class RunReport:
    name: str
    settings: Mapping[str, Any]  # strategy, codec, partition… as recorded in summary.json
    rounds: int
    final_accuracy: float | None
    best_accuracy: float | None
    uplink_mb: float
    downlink_mb: float
    wall_s: float
    device_cpu_s: float | None  # summed over devices and rounds, where devices reported it
    energy_j: float | None
    milestones: Mapping[float, Milestone | None]
    metrics_mb: float = 0.0  # the devices' metrics and status frames, on the uplink beside the updates
    examples_processed: int | None = None  # None where the run did not record them (runs before the field)
    frame_ratio: float | None = None  # dense fp32 updates / uplink frames; None without num_params
    frame_ratio_with_metrics: float | None = None  # the same with the metrics and status frames counted


def metrics_bytes(record: RoundRecord) -> int:
    """A round's metrics and status frames: the typed field, else (older runs) ``extra.metrics_bytes``,
    which counted the metrics messages only."""
    if record.metrics_bytes_up:
        return record.metrics_bytes_up
    legacy = record.extra.get("metrics_bytes")
    return int(legacy) if isinstance(legacy, int) and not isinstance(legacy, bool) and legacy > 0 else 0


def frame_ratios(records: Sequence[RoundRecord], num_params: Any) -> tuple[float | None, float | None]:
    """(dense / uplink frames, dense / (uplink frames + metrics frames)) over the whole run, where dense is
    what the accepted updates would have taken as fp32 vectors: 4 bytes x num_params x updates."""
    if isinstance(num_params, bool) or not isinstance(num_params, int) or num_params <= 0:
        return None, None
    dense = 4 * num_params * sum(r.devices_reported for r in training_rounds(records))
    up = sum(r.bytes_up for r in records)
    with_metrics = up + sum(metrics_bytes(r) for r in records)
    return (dense / up if up else None), (dense / with_metrics if with_metrics else None)


def milestone(records: Sequence[RoundRecord], target: float) -> Milestone | None:
    """The first round whose test accuracy is >= ``target`` and what it cost to get there."""
    up = down = wall = 0.0
    examples = 0
    recorded = any(r.examples_processed for r in records)
    for r in records:
        up += r.bytes_up / BYTES_PER_MB
        down += r.bytes_down / BYTES_PER_MB
        wall += r.round_wall_s
        examples += r.examples_processed
        if r.accuracy is not None and math.isfinite(r.accuracy) and r.accuracy >= target:
            return Milestone(r.round_id, up, down, wall, examples if recorded else None)
    return None


def examples_curve(records: Sequence[RoundRecord]) -> list[tuple[int, float]]:
    """(cumulative examples processed, test accuracy) at every evaluation: LB and FL compared at the same
    number of examples; empty where the run did not record them."""
    if not any(r.examples_processed for r in records):
        return []
    examples, points = 0, []
    for r in records:
        examples += r.examples_processed
        if r.accuracy is not None and math.isfinite(r.accuracy):
            points.append((examples, r.accuracy))
    return points


def _sum_extra(records: Sequence[RoundRecord], key: str) -> float | None:
    values = [float(r.extra[key]) for r in records if r.extra.get(key) is not None]
    return sum(values) if values else None


def _run_name(settings: Mapping[str, Any], run_dir: Path) -> str:
    """The run's label (else its directory's name), with its recorded seed where the label does not say it:
    the seeds of one configuration share their config's label."""
    name = str(settings.get("label") or run_dir.name)
    seed = settings.get("seed")
    if isinstance(seed, int) and not isinstance(seed, bool) and "seed" not in name:
        name += f", seed {seed}"
    return name


def load_run(run_dir: Path | str, targets: Sequence[float] = DEFAULT_TARGETS) -> tuple[RunReport, list[RoundRecord]]:
    run_dir = Path(run_dir)
    if not (run_dir / METRICS_FILE).is_file():
        raise DataError(f"{run_dir}: not a run directory (no {METRICS_FILE})")
    records = MetricsLog(run_dir).read()
    if not records:
        raise DataError(f"{run_dir / METRICS_FILE}: no completed round")
    settings: dict[str, Any] = {}
    summary_path = run_dir / SUMMARY_FILE
    if summary_path.is_file():
        try:
            settings = dict(json.loads(summary_path.read_text()).get("extra") or {})
        except (json.JSONDecodeError, AttributeError) as exc:
            raise DataError(f"{summary_path}: unreadable ({exc})") from exc
    evaluated = [r.accuracy for r in records if r.accuracy is not None and math.isfinite(r.accuracy)]
    ratio, ratio_with_metrics = frame_ratios(records, settings.get("num_params"))
    processed = sum(r.examples_processed for r in records)
    report = RunReport(
        name=_run_name(settings, run_dir), settings=settings, rounds=len(training_rounds(records)),
        final_accuracy=evaluated[-1] if evaluated else None, best_accuracy=max(evaluated) if evaluated else None,
        uplink_mb=sum(r.bytes_up for r in records) / BYTES_PER_MB,
        downlink_mb=sum(r.bytes_down for r in records) / BYTES_PER_MB,
        wall_s=sum(r.round_wall_s for r in records),
        device_cpu_s=_sum_extra(records, "device_cpu_s"), energy_j=_sum_extra(records, "device_energy_j"),
        milestones={t: milestone(records, t) for t in targets},
        metrics_mb=sum(metrics_bytes(r) for r in records) / BYTES_PER_MB, examples_processed=processed or None,
        frame_ratio=ratio, frame_ratio_with_metrics=ratio_with_metrics)
    return report, records


def _pct(x: float | None) -> str:
    return "–" if x is None else f"{100 * x:.2f}"


def _num(x: float | None, digits: int = 1) -> str:
    return "–" if x is None else f"{x:.{digits}f}"


def markdown_table(reports: Sequence[RunReport], targets: Sequence[float] = DEFAULT_TARGETS) -> str:
    """One row per run; "–" where a run never reached a target or a figure is unavailable."""
    head = ["run", "strategy", "codec", "data", "rounds", "final acc %", "best acc %"]
    for t in targets:
        p = f"{100 * t:g}%"
        head += [f"rounds to {p}", f"up MB to {p}", f"down MB to {p}", f"wall s to {p}"]
    head += ["up MB", "down MB", "wall s", "device CPU s", "energy J"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in reports:
        row = [r.name, str(r.settings.get("strategy", "–")), str(r.settings.get("codec", "–")),
               str(r.settings.get("partition", "–")), str(r.rounds), _pct(r.final_accuracy), _pct(r.best_accuracy)]
        for t in targets:
            m = r.milestones.get(t)
            row += ["–"] * 4 if m is None else [str(m.round_id), _num(m.uplink_mb, 2), _num(m.downlink_mb, 2),
                                                  _num(m.wall_s)]
        row += [_num(r.uplink_mb, 2), _num(r.downlink_mb, 2), _num(r.wall_s), _num(r.device_cpu_s),
                _num(r.energy_j)]
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines) + "\n"


RUN_MARKERS = ("o", "s", "^", "D", "v", "P")  # one per block of ten runs (the colours repeat every ten)


PLOT_ACCURACY_VS_EXAMPLES = "accuracy_vs_examples.png"


def _curve(plot: str, records: Sequence[RoundRecord]) -> list[tuple[float, float]]:
    """(x, accuracy) at each evaluation for one of ``plot_runs``' plots."""
    if plot == PLOT_ACCURACY_VS_EXAMPLES:
        return [(float(x), y) for x, y in examples_curve(records)]
    up = wall = 0.0
    points = []
    for r in records:
        up += r.bytes_up / BYTES_PER_MB
        wall += r.round_wall_s
        if r.accuracy is not None and math.isfinite(r.accuracy):
            points.append(({"accuracy_vs_round.png": r.round_id, "accuracy_vs_uplink_mb.png": up}.get(plot, wall),
                           r.accuracy))
    return points


@dataclass(frozen=True)
class PlotLine:
    """One line of a report plot: a run, or a configuration's mean over its seeds."""

    label: str
    large_batch: bool
    points: tuple[tuple[float, float], ...]


def plot_lines(plot: str, runs: Sequence[tuple[RunReport, list[RoundRecord]]]) -> list[PlotLine]:
    """The lines of one plot: a configuration run with several seeds (the report's groups) is one line, the mean
    x and accuracy over its seeds at each evaluation (seeds evaluate at the same rounds; a shorter run cuts the
    line to its length); a configuration with one run is that run, under its name."""
    by_configuration: dict[Any, list[tuple[RunReport, list[RoundRecord]]]] = {}
    for report, records in runs:
        by_configuration.setdefault(configuration_key(report), []).append((report, records))
    lines = []
    for members in by_configuration.values():
        curves = [_curve(plot, records) for _, records in members]
        curves = [c for c in curves if c]  # e.g. a run that did not record the examples it processed
        if not curves:
            continue
        length = min(len(c) for c in curves)
        points = tuple((sum(c[i][0] for c in curves) / len(curves), sum(c[i][1] for c in curves) / len(curves))
                       for i in range(length))
        report = members[0][0]
        label = report.name if len(members) == 1 else f"{group_name(report)} (mean of {len(curves)} seeds)"
        lines.append(PlotLine(label, report.settings.get("strategy") == "large-batch", points))
    return lines


def plot_runs(runs: Sequence[tuple[RunReport, list[RoundRecord]]], out_dir: Path) -> list[Path]:
    """Accuracy vs round/step, vs cumulative uplink MB (log axis), vs wall time and vs examples processed
    (where the runs recorded them): one line per configuration (``plot_lines``), all overlaid."""
    import matplotlib
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    outputs = []
    for name, xlabel, log in (("accuracy_vs_round.png", "round / step", False),
                              ("accuracy_vs_uplink_mb.png", "cumulative uplink MB (log)", True),
                              ("accuracy_vs_wall_s.png", "wall time (s)", False),
                              (PLOT_ACCURACY_VS_EXAMPLES, "examples processed (all devices)", False)):
        lines = plot_lines(name, runs)
        if name == PLOT_ACCURACY_VS_EXAMPLES and not lines:
            continue  # runs from before the examples were recorded: no such plot rather than an empty one
        figure = Figure(figsize=(12, 6), dpi=100)
        FigureCanvasAgg(figure)
        axes = figure.add_subplot(1, 1, 1)
        # tab10's ten clearly different colours, then the same colours with another marker: tab20 pairs
        # a dark and a light shade of one hue, which read as one run on a plot with many.
        colors = matplotlib.colormaps["tab10"]
        for index, line in enumerate(lines):
            points = [(x, y) for x, y in line.points if not (log and x <= 0)]  # no 0 on a log axis
            if not points:
                continue
            xs, ys = zip(*points)
            # large batch dashed, so the two methods read apart even where colours are close
            axes.plot(xs, ys, "--" if line.large_batch else "-", marker=RUN_MARKERS[(index // 10) % len(RUN_MARKERS)],
                      markersize=4, linewidth=1.5, label=line.label, color=colors(index % 10))
        if log:
            axes.set_xscale("log")
        elif name == "accuracy_vs_round.png":
            axes.xaxis.set_major_locator(MaxNLocator(integer=True))
        axes.set_xlabel(xlabel)
        axes.set_ylabel("test accuracy")
        axes.grid(True, alpha=0.3)
        axes.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0), ncol=1 if len(lines) <= 20 else 2,
                    frameon=False)
        figure.tight_layout()
        path = out_dir / name
        figure.savefig(path)
        outputs.append(path)
    return outputs


def register(subparsers: Any) -> None:
    p = subparsers.add_parser("report", help="compare run directories: Markdown table + plots",
                              description="Compare runs (aggregate/simulate output directories).")
    p.add_argument("runs", nargs="+", type=Path, metavar="RUN_DIR")
    p.add_argument("--out", type=Path, required=True, help="directory for report.md and the PNGs")
    p.add_argument("--targets", default=",".join(str(t) for t in DEFAULT_TARGETS),
                   help="target accuracies, comma-separated (default 0.85,0.88)")
    p.set_defaults(func=run)


def parse_targets(text: str) -> tuple[float, ...]:
    try:
        targets = tuple(float(t) for t in text.split(","))
    except ValueError:
        raise ConfigError(f"--targets {text!r}: expected numbers like 0.85,0.88") from None
    if not targets or not all(0 < t <= 1 for t in targets):
        raise ConfigError(f"--targets {text!r}: each target must be in (0, 1]")
    return targets


def run(args: argparse.Namespace) -> int:
    targets = parse_targets(args.targets)
    runs = [load_run(d, targets) for d in args.runs]
    args.out.mkdir(parents=True, exist_ok=True)
    table = markdown_table([r for r, _ in runs], targets)
    groups = group_table(group_runs(runs, targets), targets)
    plots = plot_runs(runs, args.out)
    (args.out / "report.md").write_text("# edgetrain report\n\n" + table + "\n## By configuration (mean ± 95 % CI "
                                        "over seeds; deltas paired by seed)\n\n" + groups + "\n" +
                                        "".join(f"![{p.stem}]({p.name})\n" for p in plots))
    print(table, end="")
    print()
    print(groups, end="")
    print(f"report: {args.out / 'report.md'} and {len(plots)} plots")
    return 0
