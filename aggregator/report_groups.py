"""``edgetrain report``'s comparison across seeds: runs grouped by configuration, mean ± 95 % CI.

Runs whose recorded settings (``summary.json`` ``extra``, plus the number of rounds) agree on everything
but the seed form one group. Per group: mean ± 95 % Student-t confidence interval over seeds of final
and best accuracy, the paired delta against the dense run of the same settings (paired by seed: the
seed moves data order and selection, so the difference per seed removes most of the seed noise), and
the mean time, bytes (uplink and downlink, whole frames) and examples processed to each target accuracy.
Compression is shown three ways: the payload ratio (dense fp32 / update payloads, what the codec achieves),
and dense fp32 / uplink frames without and with the devices' metrics and status frames (what the network
carries).
"""
from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Mapping, Sequence

import numpy as np

from edgetrain.sdk.errors import DataError

from .results import RoundRecord, training_rounds

if TYPE_CHECKING:  # report.py imports this module for its CLI
    from .report import RunReport

CONFIDENCE = 0.95
# Per-device or per-run details that do not define a configuration (the label names the seed).
NOT_CONFIGURATION = frozenset({"label", "seed", "device_energy_sources", "device_bench", "shared_partitions"})
DENSE = "dense"
_SEED_IN_LABEL = re.compile(r",?\s*\bseed (\d+)\b")

GroupKey = tuple[tuple[str, str], ...]


@dataclass(frozen=True)
class Interval:
    """Mean and 95 % CI half-width over ``n`` values; ``half_width`` is None for a single value."""

    mean: float
    half_width: float | None
    n: int


@dataclass(frozen=True)
class TargetCost:
    """Mean cost, over the seeds that reached a target, of first reaching it."""

    seeds_reached: int
    wall_s: float | None
    uplink_mb: float | None
    downlink_mb: float | None
    examples: float | None = None  # mean examples processed to reach it, over the seeds that recorded them


@dataclass(frozen=True)
class GroupReport:
    name: str
    key: GroupKey
    settings: Mapping[str, Any]
    rounds: int
    seeds: tuple[int | None, ...]
    final_accuracy: Interval | None
    best_accuracy: Interval | None
    final_delta_vs_dense: Interval | None  # accuracy points (fraction), paired by seed; None without a pair
    best_delta_vs_dense: Interval | None
    payload_ratio: float | None  # mean of extra.uplink_compression over rounds, then over seeds
    frame_ratio: float | None  # dense fp32 / uplink frames per run, mean over seeds
    frame_ratio_with_metrics: float | None  # the same with the devices' metrics and status frames
    uplink_mb: float
    metrics_mb: float
    downlink_mb: float
    wall_s: float
    to_target: Mapping[float, TargetCost]


def t_interval(values: Sequence[float], confidence: float = CONFIDENCE) -> Interval:
    """Mean ± t_{(1+c)/2, n-1} · s / √n (Student 1908), s the sample standard deviation."""
    if not values:
        raise DataError("t_interval: no values")
    data = np.asarray(values, dtype=np.float64)
    if not np.all(np.isfinite(data)):
        raise DataError(f"t_interval: non-finite value in {values!r}")
    if data.size == 1:
        return Interval(float(data[0]), None, 1)
    from scipy import stats  # the server extra's; only needed once there are two seeds

    quantile = float(stats.t.ppf((1 + confidence) / 2, data.size - 1))
    half = quantile * float(data.std(ddof=1)) / math.sqrt(data.size)
    return Interval(float(data.mean()), half, int(data.size))


def run_seed(report: RunReport) -> int | None:
    """The run's seed: ``seed`` in its settings, else ``seed N`` in its label (the runs kept so far)."""
    seed = report.settings.get("seed")
    if isinstance(seed, int) and not isinstance(seed, bool):
        return seed
    found = _SEED_IN_LABEL.search(str(report.settings.get("label") or ""))
    return int(found.group(1)) if found else None


def configuration_key(report: RunReport) -> GroupKey:
    """Everything recorded about a run but its seed (and per-device details), plus its round count."""
    items = {k: json.dumps(v, sort_keys=True) for k, v in report.settings.items()
             if k not in NOT_CONFIGURATION and v not in (None, {}, [])}
    items["rounds"] = str(report.rounds)
    return tuple(sorted(items.items()))


def dense_key(key: GroupKey) -> GroupKey:
    """The key of the same settings with a dense uplink and downlink: the reference for deltas."""
    dense = json.dumps(DENSE)
    return tuple((k, dense if k in ("codec", "downlink_codec") else v) for k, v in key)


def group_name(report: RunReport) -> str:
    """A configuration's name: the run's label without its seed."""
    label = str(report.settings.get("label") or report.name)
    return _SEED_IN_LABEL.sub("", label).strip()


def payload_ratio(records: Sequence[RoundRecord]) -> float | None:
    """Dense payload / payload sent, averaged over the rounds that recorded it (``extra.uplink_compression``)."""
    ratios = []
    for r in training_rounds(records):
        value = r.extra.get("uplink_compression")
        if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
            ratios.append(float(value))
    return sum(ratios) / len(ratios) if ratios else None


def _paired_delta(reports: Sequence[RunReport], dense: Mapping[int, RunReport], field: str) -> Interval | None:
    """Per-seed differences ``run - dense`` of one accuracy field, over the seeds both have."""
    deltas = []
    for report in reports:
        seed = run_seed(report)
        reference = dense.get(seed) if seed is not None else None
        ours, theirs = getattr(report, field), getattr(reference, field, None)
        if ours is not None and theirs is not None:
            deltas.append(ours - theirs)
    return t_interval(deltas) if deltas else None


def _interval_of(reports: Sequence[RunReport], field: str) -> Interval | None:
    values = [getattr(r, field) for r in reports if getattr(r, field) is not None]
    return t_interval(values) if values else None


def _mean(values: Sequence[float]) -> float | None:
    return sum(values) / len(values) if values else None


def _mean_of(reports: Sequence[RunReport], field: str) -> float | None:
    """The mean of one figure over the runs that have it."""
    return _mean([getattr(r, field) for r in reports if getattr(r, field) is not None])


def _target_cost(reports: Sequence[RunReport], target: float) -> TargetCost:
    reached = [m for m in (r.milestones.get(target) for r in reports) if m is not None]
    return TargetCost(len(reached), _mean([m.wall_s for m in reached]), _mean([m.uplink_mb for m in reached]),
                      _mean([m.downlink_mb for m in reached]),
                      _mean([float(m.examples) for m in reached if m.examples is not None]))


def group_runs(runs: Sequence[tuple[RunReport, Sequence[RoundRecord]]],
               targets: Sequence[float]) -> list[GroupReport]:
    """Groups in order of first appearance of ``load_run``'s (report, records) pairs."""
    grouped: dict[GroupKey, list[tuple[RunReport, Sequence[RoundRecord]]]] = {}
    for report, records in runs:
        grouped.setdefault(configuration_key(report), []).append((report, records))
    for members in grouped.values():
        seeds = [run_seed(r) for r, _ in members]
        repeated = {s for s in seeds if s is not None and seeds.count(s) > 1}
        if repeated:
            names = ", ".join(r.name for r, _ in members if run_seed(r) in repeated)
            raise DataError(f"two runs of one configuration share seed(s) {sorted(repeated)}: {names}")
    groups = []
    for key, members in grouped.items():
        reports = [r for r, _ in members]
        dense_runs = {run_seed(r): r for r, _ in grouped.get(dense_key(key), []) if run_seed(r) is not None}
        is_dense = dense_key(key) == key
        ratios = [x for x in (payload_ratio(records) for _, records in members) if x is not None]
        groups.append(GroupReport(
            name=group_name(reports[0]), key=key, settings=reports[0].settings, rounds=reports[0].rounds,
            seeds=tuple(run_seed(r) for r in reports),
            final_accuracy=_interval_of(reports, "final_accuracy"), best_accuracy=_interval_of(reports, "best_accuracy"),
            final_delta_vs_dense=None if is_dense else _paired_delta(reports, dense_runs, "final_accuracy"),
            best_delta_vs_dense=None if is_dense else _paired_delta(reports, dense_runs, "best_accuracy"),
            payload_ratio=_mean(ratios), frame_ratio=_mean_of(reports, "frame_ratio"),
            frame_ratio_with_metrics=_mean_of(reports, "frame_ratio_with_metrics"),
            uplink_mb=_mean([r.uplink_mb for r in reports]) or 0.0, metrics_mb=_mean_of(reports, "metrics_mb") or 0.0,
            downlink_mb=_mean([r.downlink_mb for r in reports]) or 0.0, wall_s=_mean([r.wall_s for r in reports]) or 0.0,
            to_target={t: _target_cost(reports, t) for t in targets}))
    return groups


def _pct_interval(x: Interval | None, signed: bool = False) -> str:
    if x is None:
        return "–"
    sign = "+" if signed else ""
    mean = f"{100 * x.mean:{sign}.2f}"
    return mean if x.half_width is None else f"{mean} ± {100 * x.half_width:.2f}"


def _num(x: float | None, digits: int) -> str:
    return "–" if x is None else f"{x:.{digits}f}"


def _ratio(x: float | None) -> str:
    return "–" if x is None else f"{x:.0f}×"


def group_table(groups: Sequence[GroupReport], targets: Sequence[float]) -> str:
    """One row per configuration; accuracies in %, "±" the 95 % CI half-width, deltas in points."""
    head = ["configuration", "codec", "downlink codec", "data", "rounds", "seeds", "final acc %", "best acc %",
            "Δ final vs dense (pt)", "Δ best vs dense (pt)", "payload ratio", "ratio in frames",
            "ratio in frames + metrics", "up MB", "metrics MB", "down MB", "wall s"]
    for t in targets:
        p = f"{100 * t:g}%"
        head += [f"seeds reaching {p}", f"wall s to {p}", f"up MB to {p}", f"down MB to {p}", f"examples to {p}"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for g in groups:
        row = [g.name, str(g.settings.get("codec", "–")), str(g.settings.get("downlink_codec", "–")),
               str(g.settings.get("partition", "–")), str(g.rounds), str(len(g.seeds)),
               _pct_interval(g.final_accuracy), _pct_interval(g.best_accuracy),
               _pct_interval(g.final_delta_vs_dense, signed=True), _pct_interval(g.best_delta_vs_dense, signed=True),
               _ratio(g.payload_ratio), _ratio(g.frame_ratio), _ratio(g.frame_ratio_with_metrics),
               _num(g.uplink_mb, 2), _num(g.metrics_mb, 2), _num(g.downlink_mb, 2), _num(g.wall_s, 1)]
        for t in targets:
            cost = g.to_target[t]
            row += [f"{cost.seeds_reached}/{len(g.seeds)}", _num(cost.wall_s, 1), _num(cost.uplink_mb, 2),
                    _num(cost.downlink_mb, 2), _num(cost.examples, 0)]
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines) + "\n"
