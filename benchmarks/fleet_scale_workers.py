"""Fleet scale, part 2 (run by ``fleet_scale.py``; ``--workers-only`` runs it alone): synthetic updates
through K aggregation workers.

Part 2 starts a private Mosquitto, K ``edgetrain.aggregator.worker`` processes (``WorkerPool``, as
``edgetrain aggregate --workers K`` does), and plays the coordinator and the devices: one work order
selecting N devices, N dense updates published at QoS 1 (at most ``--window`` unacknowledged, as a
fleet of devices each with one update in flight would be), then the closing order. The time runs from the
first publish to the last final partial sum; updates/s is N over it. In the same run it measures numpy's
``acc += x`` on a float32 update of the same size and prints the ratios, so the figure is comparable across
machines: ``ratio`` to a float32 accumulator (``acc += x`` of the update's own dtype: the baseline of
issue 14's goal, as ``benchmarks/hot_path.py`` prints it) and ``r64`` to a float64 one. Workers validate and accumulate; every worker receives every frame and drops
the devices it does not own by topic (``aggregator.worker``), so K workers split the decode+validate+
accumulate cost, not the socket reads.

    .venv/bin/python benchmarks/fleet_scale.py --workers-only [--updates 10000] [--params 25450] [--workers 1 2 4]
"""
from __future__ import annotations

import argparse
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

from edgetrain.aggregator.coordinator import WorkerPool, reduce_partials
from edgetrain.aggregator.local_broker import LocalMosquitto
from edgetrain.sdk import topics, wire
from edgetrain.sdk.broker_config import BrokerConfig
from edgetrain.sdk.codecs import get_codec
from edgetrain.sdk.transport import MqttTransport

FLEET = "scale"
RUN_ID = "bench"
# Many updates in flight to K workers: Mosquitto's default per-client queue (1000 messages) would drop them.
BROKER_CONFIG = "max_queued_messages 0\nmax_inflight_messages 100\n"


def numpy_accumulate_rate(params: int, repeats: int = 2000, accumulator_dtype: type = np.float32) -> float:
    """Updates per second of the floor: ``acc += x`` into ``accumulator_dtype``, x a float32 vector of ``params``."""
    acc = np.zeros(params, accumulator_dtype)
    x = np.random.default_rng(0).normal(size=params).astype(np.float32)
    started = time.perf_counter()
    for _ in range(repeats):
        acc += x
    return repeats / (time.perf_counter() - started)


class _Counter:
    """Acks and final partials seen by the benchmark's client (network thread -> main thread)."""

    def __init__(self) -> None:
        self.acked = 0
        self.finals: dict[int, dict[str, wire.PartialSum]] = {0: {}, 1: {}}  # round -> worker -> final
        self.changed = threading.Condition()

    def on_message(self, topic: str, payload: bytes) -> None:
        message = wire.decode(payload)
        with self.changed:
            if isinstance(message, wire.Ack) and message.accepted:
                self.acked += 1
            elif isinstance(message, wire.PartialSum) and message.final and message.round_id in self.finals:
                self.finals[message.round_id][message.worker_id] = message
            self.changed.notify_all()

    def wait(self, predicate, timeout_s: float) -> None:
        with self.changed:
            if not self.changed.wait_for(predicate, timeout_s):
                raise TimeoutError("benchmark stalled: see the worker logs")


def _order(devices: tuple[str, ...], params: int, closing: bool, round_id: int = 1) -> bytes:
    return wire.encode(wire.WorkOrder(run_id=RUN_ID, round_id=round_id, model_version=0, num_params=params,
                                      selected=devices, committed_through=0, closing=closing))


def _frames(updates: int, params: int) -> tuple[tuple[str, ...], list[bytes]]:
    """Devices and their encoded update frames (made before the clock starts)."""
    rng = np.random.default_rng(1)
    payload, _ = get_codec("dense").encode(rng.normal(0, 0.01, params).astype(np.float32), None, {})
    devices = tuple(f"d{i:05d}" for i in range(updates))
    return devices, [wire.encode(wire.Update(device_id=d, round_id=1, model_version=0, update_id=f"{d}-1",
                                             num_examples=10, codec="dense", payload=payload, metrics={},
                                             run_id=RUN_ID)) for d in devices]


def run_workers(broker: BrokerConfig, num_workers: int, updates: int, params: int, window: int, out: Path) -> float:
    """Seconds from the first publish to the last final partial, with ``num_workers`` worker processes."""
    devices, frames = _frames(updates, params)
    counter = _Counter()
    client = MqttTransport(broker, client_id=f"bench-{num_workers}", clean_start=True)
    for topic_filter in (topics.ack_filter(FLEET), topics.partial_filter(FLEET)):
        client.subscribe(topic_filter, counter.on_message)
    client.connect()
    pool = WorkerPool(broker, FLEET, num_workers, out).start()
    try:
        # Round 0 closed at once: a worker that answers it is subscribed (so no update goes unheard).
        client.publish(topics.work_order_topic(FLEET), _order(("none",), params, True, round_id=0), retain=True)
        counter.wait(lambda: len(counter.finals[0]) == num_workers, 120)
        client.publish(topics.work_order_topic(FLEET), _order(devices, params, False), retain=True)
        started = time.perf_counter()
        for sent, (device, frame) in enumerate(zip(devices, frames), 1):
            client.publish(topics.update_topic(FLEET, device), frame)
            if sent - counter.acked > window:
                counter.wait(lambda: sent - counter.acked <= window // 2, 120)
        counter.wait(lambda: counter.acked >= updates, 300)
        client.publish(topics.work_order_topic(FLEET), _order(devices, params, True), retain=True)
        counter.wait(lambda: len(counter.finals[1]) == num_workers, 120)
        elapsed = time.perf_counter() - started
        reduced = reduce_partials(counter.finals[1], params)
        assert reduced.mean.count == updates, f"{reduced.mean.count} of {updates} updates counted"
        client.publish(topics.work_order_topic(FLEET), b"", retain=True)
        return elapsed
    finally:
        pool.stop()
        client.close()


def workers_part(args: argparse.Namespace) -> None:
    """Part 2: ``--updates`` synthetic updates through each of ``--workers`` worker counts."""
    floor, floor64 = numpy_accumulate_rate(args.params), numpy_accumulate_rate(args.params, accumulator_dtype=np.float64)
    print(f"part 2: {args.updates} dense updates of {args.params} parameters ({4 * args.params / 1e3:.0f} kB); "
          f"numpy acc += x: {floor:,.0f} updates/s (float32 acc), {floor64:,.0f} updates/s (float64 acc)")
    print(f"{'workers':>7}  {'seconds':>8}  {'updates/s':>10}  {'ratio':>8}  {'r64':>8}")
    with tempfile.TemporaryDirectory(prefix="fleet-scale-", dir=args.run_root) as tmp:
        for count in args.workers:
            broker = LocalMosquitto(Path(tmp) / f"broker-{count}", persistence=False, extra_config=BROKER_CONFIG)
            try:
                seconds = run_workers(BrokerConfig(broker.url), count, args.updates, args.params, args.window,
                                      Path(tmp) / f"run-{count}")
            finally:
                broker.stop()
            rate = args.updates / seconds
            print(f"{count:>7}  {seconds:>8.2f}  {rate:>10,.0f}  {rate / floor:>8.4f}  {rate / floor64:>8.4f}", flush=True)


def add_args(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("part 2: aggregation workers")
    g.add_argument("--updates", type=int, default=10_000)
    g.add_argument("--params", type=int, default=25_450, help="model size (default: the tests' 784-32-10 MLP)")
    g.add_argument("--workers", type=int, nargs="+", default=[1, 2, 4])
    g.add_argument("--window", type=int, default=500, help="unacknowledged updates in flight at most")
    g.add_argument("--run-root", help="where the workers journal (default: the system temp dir; its fsyncs are "
                   "part of the cost: an ack means the update is on disk)")
