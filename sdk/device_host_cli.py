"""``edgetrain device-host``: run many device identities in one process until SIGINT/SIGTERM.

A command of its own rather than ``edgetrain device --ids``: ``device`` is one board, and its per-board
flags (``--device-id``, ``--index``, ``--state-dir``, ``--power-source``, ``--bench-result``) have no
meaning for a range of identities sharing one processor; here the range gives the ids and partition
indices, and ``--state-root`` holds one state directory per identity.
"""
from __future__ import annotations

import argparse
import logging
import resource
import signal
import threading
from pathlib import Path
from typing import Any

from . import wire
from .bundle import RUNTIMES, load_manifest
from .broker_wait import wait_for_broker
from .cli_args import (add_broker_args, broker_config, limit_threads, positive_float, positive_int,
                       warm_up_runtime)
from .config_file import add_config_arg
from .data import PartitionSpec
from .device_host import DeviceHost, HostConfig, build_devices, parse_id_range
from .runtime import AUTO_ORDER, load_runtime, select_bundle
from .transport.selector import SelectorLoop

_log = logging.getLogger(__name__)


def register(subparsers: Any) -> None:
    p = subparsers.add_parser("device-host", help="run many device identities in one process (simulation at scale)",
                              description="Join a fleet as many devices at once: each identity has its own MQTT "
                                          "connection, partition, outbox and state directory; they share one "
                                          "runtime, one copy of the data and one event loop; training is serialised.")
    add_config_arg(p)
    add_broker_args(p)
    p.add_argument("--fleet", required=True, help="fleet name (topic prefix edgetrain/<fleet>/…)")
    p.add_argument("--ids", required=True, metavar="FIRST..LAST",
                   help="the identities, e.g. dev-000..dev-499: each id's number is its partition index")
    p.add_argument("--count", required=True, type=positive_int, help="number of partitions in the whole fleet")
    p.add_argument("--bundle", required=True, type=Path, help="training bundle directory (edgetrain export)")
    p.add_argument("--runtime", default="auto", choices=["auto", *RUNTIMES],
                   help=f"which bundle of an 'export --runtime all' directory (default auto: {' > '.join(AUTO_ORDER)})")
    p.add_argument("--data-dir", type=Path, help="Fashion-MNIST IDX directory (default /usr/share/datasets/fashion-mnist)")
    p.add_argument("--partition", default="iid", help="iid | dirichlet:ALPHA | shards[:K] (default iid)")
    p.add_argument("--seed", type=int, default=0, help="partition seed, the same on every device (default 0)")
    p.add_argument("--limit-examples", type=positive_int, help="each identity uses at most N examples")
    p.add_argument("--state-root", type=Path, required=True, help="one state directory per identity under it")
    p.add_argument("--threads", type=positive_int, help="intra-op threads for the shared runtime")
    p.add_argument("--max-chunk-bytes", type=positive_int, help="split update frames larger than this")
    p.add_argument("--max-handshakes", type=positive_int, default=50,
                   help="CONNECTs awaiting their CONNACK at once, at start and in a reconnect storm (default 50; "
                        "Mosquitto's listen backlog is 100)")
    p.add_argument("--aggregator-key", type=Path, metavar="FILE.pub",
                   help="the aggregator's Ed25519 public key (PEM): obey only announcements it signed")
    p.add_argument("--wait-for-broker", type=positive_float, metavar="SECONDS",
                   help="wait up to SECONDS for a broker that is not up yet")
    p.add_argument("--log-level", default="WARNING", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    p.set_defaults(func=run)


def raise_fd_limit(needed: int) -> None:
    """One socket per identity: lift the soft descriptor limit towards the hard one when it is short."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and soft < needed:
        target = needed if hard == resource.RLIM_INFINITY else min(needed, hard)
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        if target < needed:
            _log.warning("descriptor limit %d is below the %d this host needs; some identities cannot connect",
                         target, needed)


def run(args: argparse.Namespace) -> int:
    logging.basicConfig(level=args.log_level, format=f"%(asctime)s host {args.ids} %(levelname)s %(message)s")
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    identities = parse_id_range(args.ids)
    host = HostConfig(fleet=args.fleet, state_root=args.state_root, partition=PartitionSpec.parse(args.partition),
                      partition_count=args.count, seed=args.seed, limit_examples=args.limit_examples,
                      max_chunk_bytes=args.max_chunk_bytes)
    aggregator_key = wire.signing.load_public_key(args.aggregator_key) if args.aggregator_key else None
    broker = broker_config(args)
    raise_fd_limit(len(identities) + 256)
    bundle = select_bundle(args.bundle, args.runtime)
    runtime = load_runtime(bundle, load_manifest(bundle))
    limit_threads(runtime, args.threads)
    warm_up_runtime(runtime)
    loop = SelectorLoop(max_handshakes=args.max_handshakes)
    devices = build_devices(host, identities, broker, loop, runtime, args.data_dir, aggregator_key)
    if args.wait_for_broker is not None and not stop.is_set():
        wait_for_broker(broker, args.wait_for_broker, stop)
    if stop.is_set():
        return 0
    device_host = DeviceHost(devices, loop)
    device_host.run(stop)
    _log.info("stopped after training %d round(s) over %d identities", device_host.rounds_trained, len(devices))
    return 0
