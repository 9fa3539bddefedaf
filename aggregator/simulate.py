"""``edgetrain simulate``: N device processes + the aggregator on one machine, through a real broker.

By default a private Mosquitto on a free loopback port (stopped afterwards), or, where Mosquitto is not
installed, an embedded pure-Python amqtt broker (MQTT 3.1.1; it says so); ``--broker URL`` uses a
running one. Devices are separate processes that live across rounds (paying interpreter and torch
start-up once) with one intra-op thread each, so N devices share the cores without oversubscribing
them; everything they exchange with the aggregator crosses the broker as wire frames.
"""
from __future__ import annotations

import argparse
import contextlib
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

try:  # the server extra brings it; without it BLAS keeps its own thread count
    from threadpoolctl import threadpool_limits
except ImportError:  # pragma: no cover - exercised on installs without the server extra
    threadpool_limits = None

from edgetrain.sdk.attack import ATTACK_KINDS, Attack
from edgetrain.sdk.cli_args import add_broker_args, broker_config, positive_int
from edgetrain.sdk.config_file import add_config_arg
from edgetrain.sdk.device import check_slowdown
from edgetrain.sdk.device_cli import add_local_dp_args, local_dp_config
from edgetrain.sdk.errors import ConfigError
from edgetrain.sdk.wire.signing import public_key_path

from .cli import (LARGE_BATCH, add_round_args, add_run_dir_args, build_aggregator, bundle_optimizer, check_round_args,
                  signing_key_from_args, start_worker_pool, take_bundle_optimizer)
from .local_broker import start_local_broker
from .progress import round_printer
from .robust_strategy import AggregationRule
from .run_dir import prepare_run_dir
from .simulate_hosts import spawn_device_hosts

_log = logging.getLogger(__name__)
_REPO_ROOT = Path(__file__).resolve().parent.parent


def register(subparsers: Any) -> None:
    p = subparsers.add_parser("simulate", help="N devices + aggregator on this machine over a real broker",
                              description="Run a whole fleet on this machine: a private Mosquitto (amqtt where it is "
                                          "missing, or --broker), "
                                          "N device processes and the aggregator.")
    add_broker_args(p, default=None)
    p.add_argument("--devices", type=positive_int, default=10, help="number of device processes (default 10)")
    p.add_argument("--partition", default="iid", help="iid | dirichlet:ALPHA | shards[:K] (default iid)")
    p.add_argument("--model", default="cnn", choices=["cnn", "mlp"], help="model to export when no --bundle")
    p.add_argument("--norm", default="none", choices=["none", "batch", "group"],
                   help="the cnn's normalisation layers (default none; batch norm misbehaves under non-IID data)")
    p.add_argument("--bundle", type=Path, help="use this bundle instead of exporting one")
    p.add_argument("--runtime", default="torch", choices=["torch", "onnx", "executorch", "mixed"],
                   help="device runtime when exporting: one for all, or mixed (torch and onnx alternate)")
    p.add_argument("--label", help="run name shown by 'edgetrain report' (default: the run directory's name)")
    add_config_arg(p)
    p.add_argument("--out", type=Path, help="run directory (default runs/simulate-<time>)")
    add_run_dir_args(p)
    p.add_argument("--fleet", default="sim", help="fleet name (default sim)")
    p.add_argument("--limit-examples", type=positive_int, help="each device uses at most N examples (CI-size runs)")
    p.add_argument("--attackers", metavar="K:KIND[:boost=B]", type=_attackers,
                   help=f"TESTING: devices dev-000 … dev-(K-1) attack with KIND ({' | '.join(ATTACK_KINDS)}) "
                        "and an optional strength (device --attack), e.g. 2:scale or 2:label-flip:boost=10")
    add_local_dp_args(p)  # passed to every device
    p.add_argument("--stragglers", metavar="K:F", type=_stragglers,
                   help="TESTING: the last K devices train F times slower (device --slowdown F), e.g. 3:5")
    p.add_argument("--device-threads", type=positive_int, default=1, help="intra-op threads per device (default 1)")
    p.add_argument("--device-processes", type=positive_int, metavar="P",
                   help="run the devices as identities of P 'edgetrain device-host' processes (one runtime, one "
                        "event loop each) instead of one process per device: how 1,000 devices fit on one machine")
    add_round_args(p)
    p.set_defaults(func=run, min_devices=None)
    p.add_argument("--log-level", default="WARNING", choices=["DEBUG", "INFO", "WARNING", "ERROR"])


def _attackers(text: str) -> tuple[int, Attack]:
    """``K:KIND[:boost=B]`` → (K, the attack); argparse reports the ConfigError's message."""
    count, sep, spec = text.partition(":")
    if not sep or not count.strip().isdigit() or int(count) < 1:
        raise argparse.ArgumentTypeError(f"expected K:KIND[:boost=B] with K >= 1 and KIND one of "
                                         f"{', '.join(ATTACK_KINDS)}, got {text!r}")
    try:
        return int(count), Attack.parse(spec)
    except ConfigError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _local_dp_flags(args: argparse.Namespace) -> list[str]:
    """The device's ``--local-dp-*`` flags, as simulate got them (empty when local DP is off)."""
    flags = (("--local-dp-clip", args.local_dp_clip), ("--local-dp-noise-multiplier", args.local_dp_noise_multiplier),
             ("--local-dp-delta", args.local_dp_delta))
    return [part for flag, value in flags if value is not None for part in (flag, repr(value))]


def _stragglers(text: str) -> tuple[int, float]:
    """``K:F`` → (K, F); argparse reports the problem."""
    count, sep, factor = text.partition(":")
    try:
        if not sep or not count.strip().isdigit() or int(count) < 1:
            raise ConfigError("K must be an integer >= 1")
        return int(count), check_slowdown(float(factor))
    except (ConfigError, ValueError) as exc:
        raise argparse.ArgumentTypeError(f"expected K:F (K devices F times slower, F >= 1), got {text!r}: {exc}") from None


def _is_straggler(args: argparse.Namespace, index: int) -> bool:
    """The last K devices are the stragglers (the first are attackers, so the two can be told apart)."""
    return args.stragglers is not None and index >= args.devices - args.stragglers[0]


def _device_runtime(runtime: str, index: int) -> str:
    return ("torch", "onnx")[index % 2] if runtime == "mixed" else runtime


def _export_bundles(args: argparse.Namespace, out: Path) -> Path:
    """One bundle per runtime the fleet uses, plus torch for the aggregator's evaluation, in
    ``out/bundle/<runtime>/``; the same seed gives every runtime the same initial weights."""
    from edgetrain.export.bundle_writer import export_bundle
    from edgetrain.sdk.models import default_config

    bundle = out / "bundle"
    for runtime in {"torch", *(_device_runtime(args.runtime, i) for i in range(args.devices))}:
        if not (bundle / runtime / "manifest.json").is_file():
            config = {**default_config(args.model), **({"norm": args.norm} if args.model == "cnn" else {})}
            export_bundle(args.model, config, runtime=runtime, out_dir=bundle / runtime,
                          seed=args.seed, optimizer={"name": "sgd", "lr": args.lr, "momentum": args.momentum,
                                                          "weight_decay": args.weight_decay},
                          batch_size=args.batch_size if runtime == "executorch" else None)
    return bundle


def _device_env(args: argparse.Namespace) -> dict[str, str]:
    # numpy's OpenBLAS too: its idle worker threads spin, and N devices' spinning on shared cores is CPU lost
    threads = str(args.device_threads)
    return dict(os.environ, OMP_NUM_THREADS=threads, OPENBLAS_NUM_THREADS=threads, PYTHONUNBUFFERED="1",
                PYTHONPATH=os.pathsep.join(filter(None, [str(_REPO_ROOT), os.environ.get("PYTHONPATH")])))


def _spawn_devices(args: argparse.Namespace, broker_url: str, bundle: Path, out: Path) -> list[subprocess.Popen]:
    env = _device_env(args)
    (out / "devices").mkdir(parents=True, exist_ok=True)
    procs = []
    for i in range(args.devices):
        device_id = f"dev-{i:03d}"
        cmd = [sys.executable, "-m", "edgetrain", "device", "--broker", broker_url, "--fleet", args.fleet,
               "--device-id", device_id, "--bundle", str(bundle), "--partition", args.partition,
               "--seed", str(args.seed), "--index", str(i), "--count", str(args.devices),
               "--state-dir", str(out / "devices" / device_id), "--threads", str(args.device_threads),
               "--runtime", "auto" if args.bundle is not None else _device_runtime(args.runtime, i)]
        for flag, value in (("--data-dir", args.data_dir), ("--limit-examples", args.limit_examples),
                            ("--username", args.username), ("--ca-file", args.ca_file),
                            ("--cert-file", args.cert_file), ("--key-file", args.key_file)):
            if value is not None:
                cmd += [flag, str(value)]
        if args.attackers is not None and i < args.attackers[0]:
            cmd += ["--attack", str(args.attackers[1])]
        cmd += _local_dp_flags(args)
        if _is_straggler(args, i):
            cmd += ["--slowdown", str(args.stragglers[1])]
        if args.signing_key is not None:  # devices obey only this run's aggregator
            cmd += ["--aggregator-key", str(public_key_path(args.signing_key))]
        if args.secure_aggregation:  # devices never send an update unmasked
            cmd.append("--secure-aggregation")
        log = open(out / "devices" / f"{device_id}.log", "ab")
        procs.append(subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env))
        log.close()
    return procs


def _watch(procs: list[subprocess.Popen], needed: int, stop: threading.Event, out: Path,
           devices_per_process: list[int] | None = None) -> None:
    """Stop the run if so many devices die that no round can reach its minimum."""
    sizes = devices_per_process or [1] * len(procs)
    while not stop.wait(1.0):
        alive = sum(n for p, n in zip(procs, sizes) if p.poll() is None)
        if alive < needed:
            logs = sorted((out / "devices").glob("*.log"))
            tail = logs[0].read_text(errors="replace").splitlines()[-5:] if logs else []
            print(f"simulate: only {alive} device process(es) alive, {needed} needed; stopping. "
                  f"First device log ends:\n  " + "\n  ".join(tail), file=sys.stderr)
            stop.set()


def _stop_devices(procs: list[subprocess.Popen]) -> None:
    for p in procs:
        if p.poll() is None:
            p.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + 10
    for p in procs:
        try:
            p.wait(max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()


def _summary_table(records: list, wall_s: float, unit: str) -> str:
    accs = [r.accuracy for r in records if r.accuracy is not None]
    rows = [(unit, f"{len(records)}"),
            ("final test accuracy", f"{100 * accs[-1]:.2f}%" if accs else "-"),
            ("best test accuracy", f"{100 * max(accs):.2f}%" if accs else "-"),
            ("uplink", f"{sum(r.bytes_up for r in records) / 1e6:.2f} MB"),
            ("downlink", f"{sum(r.bytes_down for r in records) / 1e6:.2f} MB"),
            ("rejected updates", f"{sum(sum(r.devices_rejected.values()) for r in records)}"),
            ("wall time", f"{wall_s:.1f} s")]
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"  {k:<{width}}  {v}" for k, v in rows)


def _check_args(args: argparse.Namespace) -> None:
    """Fill the defaults that depend on other flags; refuse bad input."""
    if args.min_devices is None:  # 2, or what the aggregation rule needs (Krum: 2f+3), within the fleet
        needed = AggregationRule.parse(args.aggregation or "mean").min_updates()
        args.min_devices = max(1, min(max(2, needed), args.devices))
    if args.attackers is not None and (args.attackers[0] > args.devices or args.device_processes is not None):
        raise ConfigError(f"--attackers {args.attackers[0]}:{args.attackers[1]} needs at most --devices "
                          f"{args.devices} devices, each its own process (not --device-processes)")
    if local_dp_config(args) is not None and args.device_processes is not None:  # refuses a partial set too
        raise ConfigError("--local-dp-* needs each device its own process (not --device-processes): a device "
                          "host has no local DP flags, so the updates would leave un-noised")
    if args.stragglers is not None and (args.stragglers[0] > args.devices or args.device_processes is not None):
        raise ConfigError(f"--stragglers {args.stragglers[0]}:{args.stragglers[1]:g} needs at most --devices "
                          f"{args.devices} devices, each its own process (not --device-processes)")
    if args.min_devices > args.devices:
        raise ConfigError(f"--min-devices {args.min_devices} is more than --devices {args.devices}: "
                          "no round could ever start")
    if args.bundle is not None:  # its optimizer settings are the defaults (a bad bundle fails here)
        for warning in take_bundle_optimizer(args, bundle_optimizer(args.bundle)):
            _log.warning(warning)
    if args.device_processes is not None and (args.device_processes > args.devices or args.runtime == "mixed"):
        raise ConfigError("--device-processes needs at most --devices processes and one runtime (not mixed)")
    if args.norm != "none" and args.model != "cnn":
        raise ConfigError("--norm applies to the cnn only")
    check_round_args(args, args.fleet)
    args.labels = {"partition": args.partition, "fleet_devices": args.devices, "model": args.model, "norm": args.norm,
                   "runtime": "bundle" if args.bundle else args.runtime,
                   **({"attackers": f"{args.attackers[0]}:{args.attackers[1]}"} if args.attackers else {}),
                   **({"stragglers": f"{args.stragglers[0]}:{args.stragglers[1]:g}"} if args.stragglers else {}),
                   # wall times depend on it (one process a device, or hosts of many): said beside them
                   **({"device_processes": args.device_processes} if args.device_processes else {}),
                   **({"label": args.label} if args.label else {})}
    if args.resume and args.out is None:
        raise ConfigError("--resume needs --out: the run directory to continue")


def run(args: argparse.Namespace) -> int:
    logging.basicConfig(level=args.log_level, format="%(asctime)s simulate %(levelname)s %(message)s")
    started = time.monotonic()
    _check_args(args)  # bad input fails here, before a broker or a device process is started
    out = args.out or Path("runs") / time.strftime("simulate-%Y%m%d-%H%M%S")
    prepare_run_dir(out, args.resume, args.overwrite)
    out.mkdir(parents=True, exist_ok=True)
    bundle = args.bundle or _export_bundles(args, out)
    if args.signing_key is None:  # by default every simulated run signs its announcements
        args.signing_key = out / "signing_key.pem"
    signing_key_from_args(args)  # created now, if missing: the devices start with its public half
    local = None
    if args.broker is None:
        local, description = start_local_broker(out / "broker")
        args.broker = local.url
        print(f"simulate: {description}", flush=True)
    procs: list[subprocess.Popen] = []
    pool = None
    stop = threading.Event()
    # SIGTERM/SIGINT end the run through the aggregator's stop (RunStopped), so the finally below still
    # stops every device process and the private broker.
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    unit = "steps" if args.strategy == LARGE_BATCH else "rounds"
    try:
        sizes = None
        if args.device_processes is None:
            procs = _spawn_devices(args, args.broker, bundle, out)
        else:
            hosts = spawn_device_hosts(args, args.broker, bundle, out, _device_env(args))
            procs, sizes = [p for p, _ in hosts], [n for _, n in hosts]
        print(f"simulate: {args.devices} devices ({args.partition}), {args.strategy}, {args.rounds} {unit}; "
              f"results in {out}", flush=True)
        threading.Thread(target=_watch, args=(procs, args.min_devices, stop, out, sizes), daemon=True).start()
        aggregator = build_aggregator(args, broker_config(args), out, bundle, args.fleet, resume=args.resume)
        pool = start_worker_pool(args, broker_config(args), out, args.fleet)
        # One BLAS thread: the aggregator shares the cores with the devices, and OpenBLAS's workers spin while
        # they wait, so a threaded daxpy on busy cores costs milliseconds where one thread takes ~0.1 ms.
        with threadpool_limits(limits=1, user_api="blas") if threadpool_limits else contextlib.nullcontext():
            records = aggregator.run(stop, on_progress=round_printer("step" if args.strategy == LARGE_BATCH
                                                                     else "round"))
    finally:
        stop.set()
        if pool is not None:
            pool.stop()
        _stop_devices(procs)
        if local is not None:
            local.stop()
    print("simulate: summary\n" + _summary_table(records, time.monotonic() - started, unit), flush=True)
    return 0
