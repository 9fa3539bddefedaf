"""``edgetrain device``: run one board of a fleet until SIGINT/SIGTERM."""
from __future__ import annotations

import argparse
import json
import logging
import signal
import threading
from pathlib import Path
from typing import Any

from . import topics, wire
from .attack import ATTACK_KINDS, Attack
from .broker_wait import wait_for_broker
from .bundle import RUNTIMES, load_manifest
from .cli_args import (add_broker_args, broker_config, limit_threads, positive_float, positive_int,
                       warm_up_runtime)
from .config_file import add_config_arg
from .data import PartitionSpec
from .device import Device, DeviceConfig, LocalData, check_slowdown
from .device_metrics import bench_values
from .energy.power import SourceOptions
from .energy.round_energy import open_round_energy
from .errors import ConfigError
from .local_dp import LocalDPConfig
from .runtime import AUTO_ORDER, load_runtime, select_bundle
from .transport import MqttTransport


def register(subparsers: Any) -> None:
    p = subparsers.add_parser("device", help="join a fleet and train when a round selects this device",
                              description="Join a fleet over MQTT; train on local data when a round selects this "
                                          "device; send the update; repeat until SIGINT/SIGTERM.")
    add_config_arg(p)
    add_broker_args(p)
    p.add_argument("--fleet", required=True, help="fleet name (topic prefix edgetrain/<fleet>/…)")
    p.add_argument("--device-id", required=True, help="this device's id (also its MQTT client id)")
    p.add_argument("--bundle", required=True, type=Path, help="training bundle directory (edgetrain export)")
    p.add_argument("--runtime", default="auto", choices=["auto", *RUNTIMES],
                   help="which bundle of an 'export --runtime all' directory to use (default auto: the first "
                        f"installed of {' > '.join(AUTO_ORDER)})")
    p.add_argument("--data-dir", type=Path, help="Fashion-MNIST IDX directory (default /usr/share/datasets/fashion-mnist)")
    p.add_argument("--partition", default="iid", help="iid | dirichlet:ALPHA | shards[:K] (default iid)")
    p.add_argument("--seed", type=int, default=0, help="partition seed, the same on every device (default 0)")
    p.add_argument("--index", type=int, help="this device's partition index, 0 … COUNT-1 (with --count; "
                                            "without both, the device trains on the whole training set)")
    p.add_argument("--count", type=positive_int, help="number of partitions in the fleet (with --index)")
    p.add_argument("--limit-examples", type=positive_int, help="use at most N examples of the partition (CI-size runs)")
    p.add_argument("--state-dir", type=Path, help="outbox and progress (default ~/.local/state/edgetrain/FLEET/ID)")
    p.add_argument("--threads", type=positive_int, help="intra-op threads for the runtime")
    p.add_argument("--max-chunk-bytes", type=positive_int, help="split update frames larger than this")
    p.add_argument("--aggregator-key", type=Path, metavar="FILE.pub",
                   help="the aggregator's Ed25519 public key (PEM): obey only announcements it signed")
    p.add_argument("--secure-aggregation", action="store_true",
                   help="send updates only masked (SecAgg+): rounds the aggregator does not run securely are skipped")
    p.add_argument("--wait-for-broker", type=positive_float, metavar="SECONDS",
                   help="wait up to SECONDS for a broker that is not up yet (a board that boots before its "
                        "network); default: fail at once")
    p.add_argument("--attack", type=attack_spec, metavar="KIND[:boost=B]",
                   help=f"TESTING ONLY: act as an adversary ({' | '.join(ATTACK_KINDS)}; to evaluate robust "
                        "aggregation) that sends -4x (sign-flip), 100x (scale) or random updates, or trains on "
                        "flipped labels and sends 10x its update (label-flip); boost=B sets the factor")
    add_local_dp_args(p)
    p.add_argument("--slowdown", type=slowdown_factor, default=1.0, metavar="F",
                   help="TESTING ONLY: make every training step take F times longer (a straggler; default 1)")
    p.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    m = p.add_argument_group("metrics", "per-round step time, CPU, memory, bytes and energy on "
                                        "edgetrain/<fleet>/metrics/<device>")
    m.add_argument("--power-source", default="auto",
                   help="auto (detect; no sensor: no energy, said once in the log) | none | a source name "
                        "(ina3221, jtop, pi5_pmic, rapl, nvml, csv_meter: must work, else the device exits)")
    m.add_argument("--sysfs-root", type=Path, default=Path("/"),
                   help="root under which power sensors are read (default /; tests point it at fakes)")
    m.add_argument("--vcgencmd", default="vcgencmd", help="vcgencmd command (Raspberry Pi 5 PMIC)")
    m.add_argument("--meter-csv", type=Path, help="external power meter log (time_unix_s,power_w lines)")
    m.add_argument("--metrics-every-steps", type=positive_int, default=10,
                   help="large batch: one metrics message per N steps (default 10)")
    m.add_argument("--bench-result", type=Path,
                   help="a bench.json from 'edgetrain bench' to publish once (retained) at start")
    p.set_defaults(func=run)


def add_local_dp_args(p: argparse.ArgumentParser) -> None:
    """The local DP flags (sdk.local_dp), shared with ``simulate``, which passes them to every device."""
    g = p.add_argument_group("local differential privacy", "clip each update and add Gaussian noise on the "
                             "device, before it leaves; the device reports its epsilon with each update")
    g.add_argument("--local-dp-clip", type=positive_float, metavar="S", help="clip each update to L2 norm S")
    g.add_argument("--local-dp-noise-multiplier", type=positive_float, metavar="Z",
                   help="add N(0, (Z*S)^2) per coordinate (needs --local-dp-clip)")
    g.add_argument("--local-dp-delta", type=positive_float, metavar="D",
                   help="report epsilon at this delta (default 1e-5)")


def local_dp_config(args: argparse.Namespace) -> LocalDPConfig | None:
    """The local DP the flags ask for (None: off); ConfigError for a set that cannot hold."""
    return LocalDPConfig.from_flags(args.local_dp_clip, args.local_dp_noise_multiplier, args.local_dp_delta)


def attack_spec(text: str) -> Attack:
    """``--attack KIND[:boost=B]``; argparse reports the ConfigError's message."""
    try:
        return Attack.parse(text)
    except ConfigError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def slowdown_factor(text: str) -> float:
    """``--slowdown F``: a number in [1, MAX_SLOWDOWN] (argparse reports the reason)."""
    try:
        return check_slowdown(float(text))
    except (ValueError, ConfigError) as exc:
        raise argparse.ArgumentTypeError(f"--slowdown {text!r}: {exc}") from None


def open_energy(args: argparse.Namespace) -> tuple[Any, str]:
    """(the round's energy meter or None, why not in a few words). The reason of every power source
    tried (a long line) is logged at DEBUG; the short one goes into the device's log once and its status."""
    if args.power_source == "none":
        return None, "turned off (--power-source none)"
    energy, why_not = open_round_energy(args.power_source, args.sysfs_root,
                                        SourceOptions(vcgencmd=args.vcgencmd, meter_csv=args.meter_csv))
    if energy is None and " (" in why_not:
        logging.getLogger(__name__).debug("energy: %s", why_not)
        why_not = why_not.split(" (", 1)[0] + " (--log-level DEBUG lists the sources tried)"
    return energy, why_not


def read_bench_result(path: Path) -> dict[str, float]:
    """The headline figures of a bench.json, as the ``bench_*`` values the device publishes."""
    try:
        report = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise ConfigError(f"--bench-result {path}: cannot read a bench.json ({exc})") from None
    values = bench_values(report) if isinstance(report, dict) else {}
    if not values:
        raise ConfigError(f"--bench-result {path}: no bench figures in it (is it an 'edgetrain bench' bench.json?)")
    return values


def partition_slot(index: int | None, count: int | None) -> tuple[int, int]:
    """(index, count) of this device's partition; one without the other is refused (a device given only
    ``--index 3`` would silently train on the whole training set)."""
    if index is None and count is None:
        return 0, 1
    if count is None:
        raise ConfigError(f"--index {index} needs --count: the number of devices the data is split between")
    if index is None:
        raise ConfigError(f"--count {count} needs --index: which of the {count} partitions this device trains on")
    if not 0 <= index < count:
        raise ConfigError(f"--index {index} is out of range for --count {count} (0 … {count - 1})")
    return index, count


def run(args: argparse.Namespace) -> int:
    logging.basicConfig(level=args.log_level, format=f"%(asctime)s {args.device_id} %(levelname)s %(message)s")
    # First thing: a SIGTERM while the runtime and data load (seconds) must still end in a clean exit 0.
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    index, count = partition_slot(args.index, args.count)
    state_dir = args.state_dir or Path.home() / ".local/state/edgetrain" / args.fleet / args.device_id
    config = DeviceConfig(fleet=args.fleet, device_id=args.device_id, state_dir=state_dir,
                          partition=PartitionSpec.parse(args.partition), partition_index=index,
                          partition_count=count, seed=args.seed, max_chunk_bytes=args.max_chunk_bytes,
                          gradient_metrics_every=args.metrics_every_steps,
                          attack=args.attack, slowdown=args.slowdown, local_dp=local_dp_config(args))
    bench = read_bench_result(args.bench_result) if args.bench_result else None
    aggregator_key = wire.signing.load_public_key(args.aggregator_key) if args.aggregator_key else None
    energy, energy_unavailable = open_energy(args)  # before the slow loads: a named sensor that fails, fails now
    broker = broker_config(args)
    bundle = select_bundle(args.bundle, args.runtime)  # a directory from 'export --runtime all' holds several
    runtime = load_runtime(bundle, load_manifest(bundle))
    logging.getLogger(__name__).info("runtime %s (bundle %s)", runtime.name, bundle)
    limit_threads(runtime, args.threads)
    warm_up_runtime(runtime)
    data = LocalData.load(config, runtime, args.data_dir, limit=args.limit_examples)
    offline = wire.encode(wire.Status(device_id=args.device_id, online=False, info={"reason": "connection lost"}))
    transport = MqttTransport(broker, client_id=args.device_id, will=(topics.status_topic(args.fleet, args.device_id),
                                                                   offline, True))
    if args.wait_for_broker is not None and not stop.is_set():  # after the loads: they overlap the wait
        wait_for_broker(broker, args.wait_for_broker, stop)
    if stop.is_set():  # stopped while loading: never joined, nothing to say goodbye to
        logging.getLogger(__name__).info("stopped before joining fleet %s", args.fleet)
        if energy is not None:
            energy.close()
        return 0
    device = Device(config, transport, runtime, data, energy=energy, energy_unavailable=energy_unavailable,
                    bench=bench, aggregator_key=aggregator_key, secure_only=args.secure_aggregation)
    device.run(stop)  # raises ClientIdInUse when another process took this device id: the CLI exits 1
    logging.getLogger(__name__).info("stopped after training %d round(s)", device.rounds_trained)
    return 0
