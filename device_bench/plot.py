"""The PNG: power over time with the run's windows and step markers, and step latency per step.
matplotlib (Agg, no display) is imported only here, only when a plot is written."""
from __future__ import annotations

from pathlib import Path
from typing import Any

from edgetrain.sdk.energy.meter import EnergyMeter

WINDOW_COLOURS = {"idle": "tab:gray", "warmup": "tab:olive", "train": "tab:green", "encode": "tab:orange", "communication": "tab:purple"}
MAX_STEP_MARKERS = 400  # beyond this the markers are a solid block; the train span says enough


def power_series(meter: EnergyMeter) -> tuple[list[float], list[float]]:
    """(seconds since start, watts): sampled watts, or counters differenced between polls."""
    times, watts = [], []
    previous = None
    for s in meter.trace:
        if s.power_w is not None:
            times.append(s.time_s - meter.started_s)
            watts.append(s.power_w)
        elif s.energy_j is not None and not s.at_edge:
            if previous is not None and s.time_s > previous.time_s:
                times.append((s.time_s + previous.time_s) / 2 - meter.started_s)
                watts.append((s.energy_j - previous.energy_j) / (s.time_s - previous.time_s))
            previous = s
    return times, watts


def plot_power(meter: EnergyMeter, report: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (top, bottom) = plt.subplots(2, 1, figsize=(10, 6.5))
    times, watts = power_series(meter)
    title = f"{report['model']['name']} ({report['model']['runtime']}) on {report['context'].get('board_model') or 'unknown board'}"
    if times:
        label = meter.source.name if meter.source is not None else ""
        if meter.source is not None and meter.source.is_estimate:
            label = f"estimate: CPU time x {getattr(meter.source, 'watts', '?')} W"
        top.plot(times, watts, lw=1, color="tab:blue", label=label)
        top.set_ylabel("power (W)")
    else:
        reason = meter.unavailable_reason or meter.sampling_error or "no samples"
        top.text(0.5, 0.5, "power unavailable:\n" + reason[:300], ha="center", va="center", wrap=True,
                 transform=top.transAxes, fontsize=8)
        top.set_yticks([])
    steps = [w for w in meter.windows if w.name == "step"]
    for window in meter.windows:
        colour = WINDOW_COLOURS.get(window.name)
        if colour is not None:
            top.axvspan(window.start_s - meter.started_s, window.end_s - meter.started_s, color=colour, alpha=0.12,
                        label=window.name)
    if len(steps) <= MAX_STEP_MARKERS:
        for window in steps:
            top.axvline(window.start_s - meter.started_s, color="k", lw=0.3, alpha=0.4)
    handles, labels = top.get_legend_handles_labels()
    unique = dict(zip(labels, handles))
    if unique:
        top.legend(unique.values(), unique.keys(), loc="upper right", fontsize=8)
    top.set_xlabel("time since start (s); thin lines: step starts")
    top.set_title(title)
    latencies_ms = [s * 1e3 for s in report.get("step_latencies_s", [])]
    bottom.plot(range(1, len(latencies_ms) + 1), latencies_ms, marker=".", lw=0.8)
    bottom.set_xlabel("timed step")
    bottom.set_ylabel("step latency (ms)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
