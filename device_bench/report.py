"""Benchmark outputs: bench.json (versioned), the raw power trace and windows as CSV, a Markdown
summary, and ``compare`` (a side-by-side Markdown table of several bench.json files)."""
from __future__ import annotations

import csv
import json
import math
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from edgetrain.sdk.errors import ConfigError

from edgetrain.sdk.energy.meter import EnergyMeter, WindowEnergy

SCHEMA_VERSION = 1
BENCH_JSON, TRACE_CSV, WINDOWS_CSV, PLOT_PNG, SUMMARY_MD = (
    "bench.json", "power_trace.csv", "windows.csv", "power.png", "summary.md")


def _sum_or_none(values: Sequence[float | None]) -> float | None:
    return None if not values or any(v is None for v in values) else float(sum(values))  # type: ignore[arg-type]


def summarise_windows(energies: list[WindowEnergy]) -> dict[str, dict[str, Any]]:
    """Per window name: how many, total duration, gross/net joules, rails, distinct warnings."""
    by_name: dict[str, list[WindowEnergy]] = {}
    for e in energies:
        by_name.setdefault(e.name, []).append(e)
    summary = {}
    for name, group in by_name.items():
        duration = sum(e.duration_s for e in group)
        gross = _sum_or_none([e.gross_j for e in group])
        rails: dict[str, float] = {}
        for e in group:
            for rail, joules in e.rails_j.items():
                rails[rail] = rails.get(rail, 0.0) + joules
        warnings = sorted({w for e in group for w in e.warnings})
        summary[name] = {
            "count": len(group), "duration_s": duration, "gross_j": gross,
            "net_j": _sum_or_none([e.net_j for e in group]),
            "mean_power_w": gross / duration if gross is not None and duration > 0 else None,
            "rails_j": rails, "method": group[0].method,
            "windows_with_warnings": sum(1 for e in group if e.warnings), "warnings": warnings,
        }
    return summary


def energy_section(meter: EnergyMeter, steps: int, batch_size: int) -> dict[str, Any]:
    source = meter.source
    windows = summarise_windows(meter.energies())
    train = windows.get("train", {})
    per_step = {k: (train[f"{k}_j"] / steps if train.get(f"{k}_j") is not None else None) for k in ("gross", "net")}
    return {
        "available": source is not None,
        "unavailable_reason": meter.unavailable_reason or None,
        "estimate": bool(source is not None and source.is_estimate),
        "source": source.describe() if source is not None else None,
        "sample_hz_requested": meter.sample_hz,
        "sample_hz_achieved": meter.achieved_sample_hz(),
        "sampling_error": meter.sampling_error,
        "baseline_power_w": meter.baseline_power_w(),
        "per_step_j": per_step,
        "per_sample_j": {k: (v / batch_size if v is not None else None) for k, v in per_step.items()},
        "windows": windows,
    }


def build_report(result: dict[str, Any], context: dict[str, Any], meter: EnergyMeter,
                 temperatures_after: dict[str, float] | None) -> dict[str, Any]:
    steps = int(result["config"]["steps"])
    energy = energy_section(meter, steps, int(result["config"]["batch_size"]))
    return {"schema_version": SCHEMA_VERSION, "created_unix_s": time.time(), "context": context,
            "temperatures_after_c": temperatures_after, **result, "energy": energy}


def write_trace_csv(meter: EnergyMeter, path: Path) -> None:
    """Every reading: time since the meter started, watts (counters: derived between polls),
    the cumulative counter, and each rail's value (watts for samplers, joules for counters)."""
    trace = meter.trace
    rails = sorted({r for s in trace for r in s.rails})
    unit = "j" if meter.source is not None and meter.source.kind == "energy_counter" else "w"
    previous = None
    with open(path, "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["time_s", "power_w", "energy_j", "at_window_edge", *(f"{r}_{unit}" for r in rails)])
        for s in trace:
            power = s.power_w
            if s.energy_j is not None and not s.at_edge:
                if previous is not None and s.time_s > previous.time_s:
                    power = (s.energy_j - previous.energy_j) / (s.time_s - previous.time_s)
                previous = s
            writer.writerow([f"{s.time_s - meter.started_s:.6f}", "" if power is None else f"{power:.6f}",
                             "" if s.energy_j is None else f"{s.energy_j:.6f}", int(s.at_edge),
                             *("" if r not in s.rails else f"{s.rails[r]:.6f}" for r in rails)])


def write_windows_csv(meter: EnergyMeter, path: Path) -> None:
    with open(path, "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["name", "start_s", "duration_s", "gross_j", "net_j", "method", "warnings"])
        for e in meter.energies():
            writer.writerow([e.name, f"{e.start_s - meter.started_s:.6f}", f"{e.duration_s:.6f}",
                             "" if e.gross_j is None else f"{e.gross_j:.6f}",
                             "" if e.net_j is None else f"{e.net_j:.6f}", e.method, " | ".join(e.warnings)])


def _fmt(value: Any, scale: float = 1.0, digits: int = 2) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    return f"{value * scale:,.{digits}f}"


def _get(report: dict[str, Any], *keys: str) -> Any:
    node: Any = report
    for key in keys:
        if not isinstance(node, dict) or key not in node:
            return None
        node = node[key]
    return node


# (row label, path into bench.json, scale, digits)
ROWS: tuple[tuple[str, tuple[str, ...], float, int], ...] = (
    ("model", ("model", "name"), 1, 0), ("runtime", ("model", "runtime"), 1, 0),
    ("parameters", ("model", "num_params"), 1, 0), ("mode", ("config", "mode"), 1, 0),
    ("batch", ("config", "batch_size"), 1, 0), ("timed steps", ("config", "steps"), 1, 0),
    ("step p50 (ms)", ("step_latency", "p50_s"), 1e3, 2), ("step p90 (ms)", ("step_latency", "p90_s"), 1e3, 2),
    ("step p95 (ms)", ("step_latency", "p95_s"), 1e3, 2), ("step p99 (ms)", ("step_latency", "p99_s"), 1e3, 2),
    ("samples/s", ("samples_per_s",), 1, 1), ("CPU utilisation (cores)", ("cpu_utilisation",), 1, 2),
    ("peak RSS (MiB)", ("memory", "peak_rss_bytes"), 1 / 2**20, 1),
    ("codec", ("codec", "spec"), 1, 0), ("update payload (bytes)", ("codec", "payload_bytes"), 1, 0),
    ("update frame (bytes)", ("codec", "frame_bytes"), 1, 0),
    ("encode p50 (ms)", ("codec", "encode", "p50_s"), 1e3, 3), ("decode p50 (ms)", ("codec", "decode", "p50_s"), 1e3, 3),
    ("publish→PUBACK p50 (ms)", ("broker", "publish_ack", "p50_s"), 1e3, 2),
    ("power source", ("energy", "source", "name"), 1, 0),
    ("idle power (W)", ("energy", "baseline_power_w"), 1, 3),
    ("train power (W)", ("energy", "windows", "train", "mean_power_w"), 1, 3),
    ("energy/step gross (mJ)", ("energy", "per_step_j", "gross"), 1e3, 2),
    ("energy/step net (mJ)", ("energy", "per_step_j", "net"), 1e3, 2),
    ("energy/sample net (mJ)", ("energy", "per_sample_j", "net"), 1e3, 3),
)


def _cell(report: dict[str, Any], path: tuple[str, ...], scale: float, digits: int) -> str:
    value = _get(report, *path)
    if isinstance(value, str):
        return value
    if path[-1] == "name" and path[0] == "energy" and value is None:
        return "none"
    if isinstance(value, bool) or value is None:
        return _fmt(value)
    estimated = path[:2] in (("energy", "per_step_j"), ("energy", "per_sample_j")) or path[-1] in (
        "mean_power_w", "baseline_power_w")
    if estimated and _get(report, "energy", "estimate"):
        return _fmt(float(value), scale, digits) + " (estimate)"
    return _fmt(float(value), scale, digits)


def markdown_table(reports: Sequence[dict[str, Any]], labels: Sequence[str]) -> str:
    header = "| metric | " + " | ".join(labels) + " |"
    lines = [header, "|---" * (len(labels) + 1) + "|"]
    lines += [f"| {label} | " + " | ".join(_cell(r, path, scale, digits) for r in reports) + " |"
              for label, path, scale, digits in ROWS]
    return "\n".join(lines)


def summary_markdown(report: dict[str, Any]) -> str:
    ctx = report["context"]
    energy = report["energy"]
    board = ctx.get("board_model") or "unknown board"
    system = (f"OS {ctx.get('os')}, kernel {ctx.get('kernel')}, L4T {ctx.get('l4t_release')}, "
              f"governor {ctx.get('cpu_governor')}, nvpmodel {ctx.get('nvpmodel_mode')}.")
    parts = [f"# edgetrain bench: {report['model']['name']} on {board}", "", system, "",
             markdown_table([report], ["this run"]), ""]
    if not energy["available"]:
        parts.append(f"Energy: **unavailable** — {energy['unavailable_reason']}")
    else:
        src = energy["source"]
        parts.append(f"Energy: {src['name']} ({src['kind']}, total = {src['total_method']})"
                     + (" — **estimate**, not a measurement" if energy["estimate"] else ""))
        for name, w in energy["windows"].items():
            if w["warnings"]:
                parts.append(f"- window `{name}` ({w['windows_with_warnings']} of {w['count']}): "
                             + "; ".join(w["warnings"]))
    if report.get("broker"):
        parts.append(f"\nBroker: {report['broker']['measures']}.")
    return "\n".join(parts) + "\n"


def load_report(path: Path | str) -> dict[str, Any]:
    path = Path(path)
    try:
        report = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ConfigError(f"{path}: cannot read a bench.json ({exc})") from exc
    if not isinstance(report, dict) or report.get("schema_version") != SCHEMA_VERSION:
        raise ConfigError(f"{path}: schema_version {report.get('schema_version') if isinstance(report, dict) else None!r}"
                          f" is not {SCHEMA_VERSION}; not a bench.json this edgetrain reads")
    return report


def compare_markdown(paths: Sequence[Path | str]) -> str:
    """A side-by-side table; columns are labelled by board model (or file name) and runtime."""
    if len(paths) < 1:
        raise ConfigError("compare needs at least one bench.json")
    reports = [load_report(p) for p in paths]
    labels = [f"{_get(r, 'context', 'board_model') or Path(p).parent.name or Path(p).name} "
              f"({_get(r, 'model', 'runtime')})" for r, p in zip(reports, paths)]
    return markdown_table(reports, labels)


def plotting_available() -> bool:
    """Whether matplotlib imports (the ``bench`` extra); a board installed without it still benches."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True


def write_outputs(report: dict[str, Any], meter: EnergyMeter, out_dir: Path) -> dict[str, Path]:
    """bench.json, the trace and window CSVs and summary.md, then the PNG (skipped without matplotlib),
    in ``out_dir``: the results are on disk before a plot can fail. Returns what was written."""
    out_dir.mkdir(parents=True, exist_ok=True)
    files = {"json": out_dir / BENCH_JSON, "trace_csv": out_dir / TRACE_CSV, "windows_csv": out_dir / WINDOWS_CSV,
             "summary_md": out_dir / SUMMARY_MD}
    plot = plotting_available()
    if plot:
        files["plot_png"] = out_dir / PLOT_PNG
    write_trace_csv(meter, files["trace_csv"])
    write_windows_csv(meter, files["windows_csv"])
    report = report | {"files": {k: v.name for k, v in files.items()}}
    files["json"].write_text(json.dumps(report, indent=2, sort_keys=False, default=str))
    files["summary_md"].write_text(summary_markdown(report))
    if plot:
        from .plot import plot_power

        plot_power(meter, report, files["plot_png"])
    return files
