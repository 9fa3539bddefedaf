"""``edgetrain bench``: measure a bundle on this board; ``edgetrain bench compare``: tabulate results.

Registered in ``edgetrain.cli`` through ``register(subparsers)``; the runtime, paho and matplotlib are
imported only when the command runs. ``python -m edgetrain.device_bench.cli`` runs it stand-alone.
"""
from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from edgetrain.sdk.cli_args import add_broker_args, broker_config, positive_float, positive_int
from edgetrain.sdk.energy.meter import EnergyMeter
from edgetrain.sdk.energy.power import SourceOptions, detect_power_source
from edgetrain.sdk.energy.power.detect import SOURCES
from edgetrain.sdk.errors import ConfigError, EdgetrainError

from .bench import BenchConfig, run_benchmark
from .broker_probe import measure_publish_ack
from .context import collect_context, read_temperatures_c
from .report import build_report, compare_markdown, write_outputs


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "bench", help="benchmark a bundle on this device: latency, memory, bytes, energy",
        description="Benchmark training steps of a bundle on this device: step latency percentiles, "
                    "throughput, peak RSS, CPU time, codec cost and bytes per update, publish->PUBACK "
                    "latency (with --broker) and energy from the board's power sensors. "
                    "'edgetrain bench compare A.json B.json' tabulates several results.")
    parser.add_argument("--bundle", type=Path, help="bundle directory (from 'edgetrain export')")
    parser.add_argument("--out", type=Path, help="output directory for bench.json, CSVs, PNG, summary.md")
    parser.add_argument("--steps", type=positive_int, default=50, help="timed steps (default 50)")
    parser.add_argument("--warmup", type=int, default=5, help="untimed warm-up steps (default 5)")
    parser.add_argument("--batch", type=positive_int, default=None, help="batch size (default 32 or the bundle's)")
    parser.add_argument("--mode", choices=("train", "gradient"), default="train",
                        help="train: SGD steps (federated); gradient: gradient only (large batch)")
    parser.add_argument("--codec", default="dense", help="codec spec for the update (default dense)")
    parser.add_argument("--codec-repeats", type=positive_int, default=5)
    parser.add_argument("--synthetic", action="store_true", help="random inputs instead of Fashion-MNIST")
    parser.add_argument("--data-dir", type=Path, default=None, help="Fashion-MNIST IDX directory")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=positive_int, default=None, help="intra-op threads of the runtime")
    power = parser.add_argument_group("power")
    power.add_argument("--power-source", default="auto", choices=("auto", *SOURCES),
                       help="sensor to use (default: detect)")
    power.add_argument("--sysfs-root", type=Path, default=Path("/"),
                       help="root under which /sys, /proc and /etc are read (default /; tests use fakes)")
    power.add_argument("--vcgencmd", default="vcgencmd", help="vcgencmd command (Raspberry Pi)")
    power.add_argument("--nvpmodel", default="nvpmodel", help="nvpmodel command (Jetson)")
    power.add_argument("--meter-csv", type=Path, default=None, help="external meter log: time_unix_s,power_w")
    power.add_argument("--estimate-watts", type=positive_float, default=None,
                       help="with no sensor: estimate energy as CPU seconds x W (W per busy core; labelled estimate)")
    power.add_argument("--sample-hz", type=positive_float, default=20.0, help="power sampling rate (>= 10)")
    power.add_argument("--idle-s", type=float, default=2.0, help="idle baseline before the run (default 2 s)")
    add_broker_args(parser, default=None)
    parser.add_argument("--fleet", default="bench", help="fleet of the bench update topic (default bench)")
    parser.add_argument("--device-id", default="bench", help="device id in the bench topic (your broker user)")
    parser.add_argument("--publish-repeats", type=positive_int, default=10)
    parser.set_defaults(func=run)
    sub = parser.add_subparsers(dest="bench_command", metavar="compare")
    compare = sub.add_parser("compare", help="side-by-side Markdown table of bench.json files")
    compare.add_argument("reports", nargs="+", type=Path, help="bench.json files")
    compare.set_defaults(func=run_compare)


def run_compare(args: argparse.Namespace) -> int:
    print(compare_markdown(args.reports))
    return 0


def _broker_probe(args: argparse.Namespace) -> Callable[[bytes, Any], dict[str, Any]]:
    """Publish->PUBACK timing against ``--broker`` (imports paho only now)."""


    broker = broker_config(args)

    def probe(frame: bytes, meter: Any) -> dict[str, Any]:
        return measure_publish_ack(broker, frame, meter, fleet=args.fleet, device_id=args.device_id,
                                   repeats=args.publish_repeats)
    return probe


def _mb(value: int | None) -> str:
    return "n/a" if value is None else f"{value / 2**20:.1f} MiB"


def run(args: argparse.Namespace) -> int:
    if args.bundle is None or args.out is None:
        raise ConfigError("--bundle and --out are required (or use 'edgetrain bench compare FILES')")
    config = BenchConfig(bundle=args.bundle, steps=args.steps, warmup=args.warmup, batch_size=args.batch,
                         mode=args.mode, codec=args.codec, codec_repeats=args.codec_repeats,
                         synthetic=args.synthetic, data_dir=args.data_dir, seed=args.seed, idle_s=args.idle_s,
                         threads=args.threads)
    options = SourceOptions(vcgencmd=args.vcgencmd, meter_csv=args.meter_csv, estimate_watts=args.estimate_watts)
    detection = detect_power_source(args.sysfs_root, options, args.power_source)
    meter = EnergyMeter(detection.source, detection.unavailable_reason, sample_hz=args.sample_hz)
    context = collect_context(args.sysfs_root, vcgencmd=args.vcgencmd, nvpmodel=args.nvpmodel)
    probe = _broker_probe(args) if args.broker else None
    try:
        result = run_benchmark(config, meter, probe)
    finally:
        meter.stop()
        if detection.source is not None:
            detection.source.close()
    report = build_report(result, context, meter, read_temperatures_c(args.sysfs_root))
    files = write_outputs(report, meter, args.out)
    _print_summary(report, files)
    return 0


def _print_summary(report: dict[str, Any], files: dict[str, Path]) -> None:
    lat, mem, codec, energy = report["step_latency"], report["memory"], report["codec"], report["energy"]
    print(f"step latency (ms): p50 {lat['p50_s'] * 1e3:.2f}  p90 {lat['p90_s'] * 1e3:.2f}  "
          f"p95 {lat['p95_s'] * 1e3:.2f}  p99 {lat['p99_s'] * 1e3:.2f}  max {lat['max_s'] * 1e3:.2f}  "
          f"({lat['count']} steps)")
    print(f"throughput: {report['samples_per_s']:.1f} samples/s; CPU {report['cpu_s']:.2f} s "
          f"({report['cpu_utilisation']:.2f} cores busy)")
    print(f"memory: peak RSS {_mb(mem['peak_rss_bytes'])}, after load {_mb(mem['rss_after_load_bytes'])}, "
          f"end {_mb(mem['rss_end_bytes'])}")
    print(f"codec {codec['spec']}: {codec['payload_bytes']:,} payload bytes, {codec['frame_bytes']:,} frame bytes "
          f"per update (x{codec['compression_ratio']:.2f} vs dense); encode p50 {codec['encode']['p50_s'] * 1e3:.3f} ms, "
          f"decode p50 {codec['decode']['p50_s'] * 1e3:.3f} ms")
    if report.get("broker"):
        ack = report["broker"]["publish_ack"]
        print(f"broker {report['broker']['broker']}: publish->PUBACK p50 {ack['p50_s'] * 1e3:.2f} ms, "
              f"p90 {ack['p90_s'] * 1e3:.2f} ms for a {report['broker']['frame_bytes']:,}-byte frame")
    if not energy["available"]:
        print(f"energy: unavailable — {energy['unavailable_reason']}")
    else:
        label = " (ESTIMATE)" if energy["estimate"] else ""
        train = energy["windows"].get("train", {})
        per_step = energy["per_step_j"]
        net = "n/a" if per_step["net"] is None else f"{per_step['net'] * 1e3:.2f}"
        print(f"energy{label} via {energy['source']['name']}: train {train.get('gross_j') or 0:.3f} J gross, "
              f"idle baseline {energy['baseline_power_w'] or 0:.3f} W; per step "
              f"{(per_step['gross'] or 0) * 1e3:.2f} mJ gross, {net} mJ net")
    print("wrote " + ", ".join(str(p) for p in files.values()))
    if "plot_png" not in files:
        print("plot skipped: matplotlib is not installed (pip install 'edgetrain[bench]' adds it)")


def main(argv: Sequence[str] | None = None) -> int:
    """Stand-alone entry (``python -m edgetrain.device_bench.cli bench …``) with edgetrain.cli's error handling."""
    parser = argparse.ArgumentParser(prog="edgetrain")
    register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except ConfigError as exc:
        print(f"edgetrain bench: error: {exc}", file=sys.stderr)
        return 2
    except EdgetrainError as exc:
        print(f"edgetrain bench: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
