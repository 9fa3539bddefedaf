"""The paired contrasts docs/results.md's conclusions cite, from the kept runs (no training).

The report's tables pair each configuration with the dense run of the same settings. The conclusions
also compare across settings: Dirichlet(0.3) against IID for one method and codec, 100 short rounds
against 10 epoch rounds, and each codec against the best dense run of its method. Runs are kept as
``docs/results/runs/CONFIG-sSEED``. A contrast pairs two configurations seed by seed, over the seeds
both have, and prints the mean difference with its 95 % CI (Student t: ``aggregator.report_groups``).

    python experiments/contrasts.py [--root DIR]
"""
from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

from edgetrain.aggregator.report import DEFAULT_TARGETS, load_run
from edgetrain.aggregator.report_groups import Interval, t_interval

ROOT = Path(__file__).resolve().parent.parent
RUNS = Path("docs/results/runs")
CODECS = ("dense", "dgc", "sketch", "stc")
METHODS = {"FL epoch rounds": "fl-{codec}-{data}", "FL short rounds": "fl-{codec}-{data}-ls19",
           "LB": "lb-{codec}-{data}"}
# IID only: the frontier tier and the kept tier of experiments/run_all.sh
BESIDE = ("fl-drive99-iid-ls19", "fl-drive998-iid-ls19", "lb-drive99-iid", "lb-drive999-iid", "fl-dgc985-iid-ls19",
          "fl-dgc999-iid-ls19", "fl-dgc-iid-ls19-down90", "fl-stc98-iid-ls19", "fl-stc98-down90-iid-ls19")
_KEPT_NAME = re.compile(r"^(?P<config>.+)-s(?P<seed>\d+)$")


def final_accuracy_by_seed(root: Path) -> dict[str, dict[int, float]]:
    """{config: {seed: final accuracy}} of every kept run named CONFIG-sSEED."""
    found: dict[str, dict[int, float]] = {}
    for run_dir in sorted((root / RUNS).iterdir()):
        match = _KEPT_NAME.match(run_dir.name)
        if match is None or not run_dir.is_dir():
            continue
        report, _ = load_run(run_dir, DEFAULT_TARGETS)
        if report.final_accuracy is not None:
            found.setdefault(match["config"], {})[int(match["seed"])] = report.final_accuracy
    return found


def paired(runs: dict[str, dict[int, float]], a: str, b: str) -> Interval | None:
    """Final accuracy of ``a`` minus ``b`` in points, paired by seed; None when they share no seed."""
    seeds = sorted(set(runs.get(a, {})) & set(runs.get(b, {})))
    if not seeds:
        return None
    return t_interval([100 * (runs[a][s] - runs[b][s]) for s in seeds])


def show(interval: Interval | None) -> str:
    if interval is None:
        return "–"
    spread = f" ± {interval.half_width:.2f}" if interval.half_width is not None else ""
    return f"{interval.mean:+.2f}{spread} pt (n={interval.n})"


def examples_to_targets(root: Path, config: str) -> dict[float, list[float]]:
    """{target: the examples processed to first reach it, one value per kept seed of ``config`` that did}."""
    found: dict[float, list[float]] = {target: [] for target in DEFAULT_TARGETS}
    for run_dir in sorted((root / RUNS).glob(f"{config}-s*")):
        match = _KEPT_NAME.match(run_dir.name)
        if match is None or match["config"] != config:  # e.g. CONFIG-ls19-s0 for CONFIG
            continue
        report, _ = load_run(run_dir, DEFAULT_TARGETS)
        for target, milestone in report.milestones.items():
            if milestone is not None and milestone.examples:
                found[target].append(float(milestone.examples))
    return found


def show_count(interval: Interval) -> str:
    spread = f" ± {interval.half_width:,.0f}" if interval.half_width is not None else ""
    return f"{interval.mean:,.0f}{spread}"


def mean_final(runs: dict[str, dict[int, float]], config: str) -> float | None:
    values = runs.get(config, {})
    return 100 * sum(values.values()) / len(values) if values else None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--root", type=Path, default=ROOT, help="repository root holding docs/results/runs")
    args = parser.parse_args(argv)
    runs = final_accuracy_by_seed(args.root)
    print("Dirichlet(0.3) minus IID, final accuracy, paired by seed:")
    for method, pattern in METHODS.items():
        for codec in CODECS:
            dir03, iid = pattern.format(codec=codec, data="dir03"), pattern.format(codec=codec, data="iid")
            print(f"  {method:16} {codec:7} {show(paired(runs, dir03, iid))}")
    print("FL 100 short rounds minus 10 epoch rounds (the same 1,900 local steps):")
    for data in ("iid", "dir03"):
        for codec in CODECS:
            print(f"  {data:6} {codec:7} {show(paired(runs, f'fl-{codec}-{data}-ls19', f'fl-{codec}-{data}'))}")
    print("Examples processed (all devices) to each target, dense IID, mean ± 95 % CI over the seeds:")
    for config in ("lb-dense-iid", "fl-dense-iid-ls19", "fl-dense-iid"):
        for target, values in examples_to_targets(args.root, config).items():
            shown = show_count(t_interval(values)) if values else "–"
            print(f"  {config:20} {target:.0%}: {shown} (seeds reaching it: {len(values)})")
    print("Against the best dense run of the method (by mean final accuracy, same data):")
    for method_prefix, patterns in (("FL", ("fl-{codec}-{data}", "fl-{codec}-{data}-ls19")), ("LB", ("lb-{codec}-{data}",))):
        for data in ("iid", "dir03"):
            dense = [p.format(codec="dense", data=data) for p in patterns]
            scored = [(mean_final(runs, d), d) for d in dense if mean_final(runs, d) is not None]
            if not scored:
                continue
            best_mean, best = max(scored)
            print(f"  {method_prefix} {data}: best dense {best} ({best_mean:.2f} %)")
            others = [p.format(codec=c, data=data) for p in patterns for c in CODECS if c != "dense"]
            if data == "iid":
                others += [c for c in BESIDE if c.startswith(method_prefix.lower() + "-")]
            for other in others:
                if other in runs:
                    print(f"    {other:28} {show(paired(runs, other, best))}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
