"""``edgetrain device``: run one board of a fleet until SIGINT/SIGTERM."""
from __future__ import annotations

import argparse
import logging
import signal
import threading
from pathlib import Path
from typing import Any

from .cli_args import add_broker_args, broker_config, limit_threads, positive_int


def register(subparsers: Any) -> None:
    p = subparsers.add_parser("device", help="join a fleet and train when a round selects this device",
                              description="Join a fleet over MQTT; train on local data when a round selects this "
                                          "device; send the update; repeat until SIGINT/SIGTERM.")
    add_broker_args(p)
    p.add_argument("--fleet", required=True, help="fleet name (topic prefix edgetrain/<fleet>/…)")
    p.add_argument("--device-id", required=True, help="this device's id (also its MQTT client id)")
    p.add_argument("--bundle", required=True, type=Path, help="training bundle directory (edgetrain export)")
    p.add_argument("--runtime", default="auto", choices=["auto", "torch", "onnx", "executorch"],
                   help="which bundle of an 'export --runtime all' directory to use (default auto: the first "
                        "installed of onnx > torch > executorch)")
    p.add_argument("--data-dir", type=Path, help="Fashion-MNIST IDX directory (default /usr/share/datasets/fashion-mnist)")
    p.add_argument("--partition", default="iid", help="iid | dirichlet:ALPHA | shards[:K] (default iid)")
    p.add_argument("--seed", type=int, default=0, help="partition seed, the same on every device (default 0)")
    p.add_argument("--index", type=int, default=0, help="this device's partition index (default 0)")
    p.add_argument("--count", type=positive_int, default=1, help="number of partitions in the fleet (default 1)")
    p.add_argument("--limit-examples", type=positive_int, help="use at most N examples of the partition (CI-size runs)")
    p.add_argument("--state-dir", type=Path, help="outbox and progress (default ~/.local/state/edgetrain/FLEET/ID)")
    p.add_argument("--threads", type=positive_int, help="intra-op threads for the runtime")
    p.add_argument("--max-chunk-bytes", type=positive_int, help="split update frames larger than this")
    p.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from .bundle import load_manifest
    from .data import PartitionSpec
    from .device import Device, DeviceConfig, LocalData
    from .runtime import load_runtime, select_bundle
    from .transport import Transport
    from . import topics, wire

    logging.basicConfig(level=args.log_level, format=f"%(asctime)s {args.device_id} %(levelname)s %(message)s")
    # First thing: a SIGTERM while the runtime and data load (seconds) must still end in a clean exit 0.
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    state_dir = args.state_dir or Path.home() / ".local/state/edgetrain" / args.fleet / args.device_id
    config = DeviceConfig(fleet=args.fleet, device_id=args.device_id, state_dir=state_dir,
                          partition=PartitionSpec.parse(args.partition), partition_index=args.index,
                          partition_count=args.count, seed=args.seed, max_chunk_bytes=args.max_chunk_bytes)
    broker = broker_config(args)
    bundle = select_bundle(args.bundle, args.runtime)  # a directory from 'export --runtime all' holds several
    runtime = load_runtime(bundle, load_manifest(bundle))
    logging.getLogger(__name__).info("runtime %s (bundle %s)", runtime.name, bundle)
    limit_threads(runtime, args.threads)
    data = LocalData.load(config, runtime, args.data_dir, limit=args.limit_examples)
    offline = wire.encode(wire.Status(device_id=args.device_id, online=False, info={"reason": "connection lost"}))
    transport = Transport(broker, client_id=args.device_id, will=(topics.status_topic(args.fleet, args.device_id),
                                                                   offline, True))
    if stop.is_set():  # stopped while loading: never joined, nothing to say goodbye to
        logging.getLogger(__name__).info("stopped before joining fleet %s", args.fleet)
        return 0
    device = Device(config, transport, runtime, data)
    device.run(stop)
    logging.getLogger(__name__).info("stopped after training %d round(s)", device.rounds_trained)
    return 0
