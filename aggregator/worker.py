"""An aggregation worker: validates and accumulates the updates of the devices it owns, for a coordinator.

``edgetrain aggregate --workers K`` runs one coordinator (``aggregator.coordinator``) and K of these.
Each worker subscribes to the fleet's ``update/+`` and to the coordinator's retained ``WorkOrder``; per
round it keeps one ``WeightedMean`` (Σw·Δ, Σw: O(model) memory however many updates), and when the order
says ``closing`` it publishes its ``PartialSum``; the coordinator reduces the K partials, steps,
evaluates, checkpoints and announces.

**Routing: topic sharding by device hash, not MQTT 5 shared subscriptions.** A worker owns the devices
with ``crc32(device) % K == index`` and drops every other update by its topic name, before decoding it
(a string hash: microseconds). With a shared subscription (``$share/<group>/…``) the broker picks a
worker per PUBLISH, so a device's re-send (its ack was lost, or it reconnected) can land on another
worker than the first copy; each worker's sum is then blind to the other's, and exactly-once would need
a cross-worker claim protocol (a round trip to the coordinator per update) or the coordinator undoing a
sum it cannot take apart. With ownership every copy of a device's update reaches the one worker that
holds its ``seen_update_ids``, so the existing validation (``REJECT_DUPLICATE``) dedups it locally, and
the coordinator only checks that the partials' update ids are disjoint. The price: every worker
receives every update frame (broker egress K x the uplink). Decoding and validating — the costly part,
~1 ms per 215k-parameter update — is what is split K ways. Past a few workers, devices publishing to
``update/<shard>/<device>`` would cut the egress too; that needs a device-side change (noted in
docs/brokers.md).

**Durability: journal before ack, replay on restart.** A worker journals each accepted update
(``UpdateJournal`` under ``<run>/workers/<run id>/worker-<index>``) before it acks the device, as the
single-process aggregator does. A worker SIGKILLed mid-round is restarted by the coordinator's
``WorkerPool`` with the same index; it reads the retained order, replays its journal through the same
validation (no ack: those were acked) and carries on; its final partial includes every acked update.
Updates that arrived while it was down wait in its persistent MQTT session (QoS 1, fixed client id).
"""
from __future__ import annotations

import argparse
import collections
import logging
import signal
import threading
import time
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from edgetrain.sdk import topics, wire
from edgetrain.sdk.cli_args import add_broker_args, broker_config, positive_int
from edgetrain.sdk.errors import ConfigError, EdgetrainError, TransportError, UpdateRejected, WireError
from edgetrain.sdk.transport import MqttTransport, Transport

from .aggregation import BLOCK_UPDATES, WeightedMean
from .inbox import Inbox
from .publish_retry import OutagePublisher, publish_through_outage
from .round_state import larger_local_epsilon, local_dp_fields
from .update_journal import UpdateJournal
from .validation import REJECT_DUPLICATE, REJECT_LATE, ValidationContext, validate_update

_log = logging.getLogger(__name__)
WORKERS_DIR = "workers"  # under the run directory: one journal per run id and worker index
PROGRESS_EVERY_S = 0.1  # progress reports (accepted devices) are batched at most this often
PARTIAL_PUBLISH_BOUND_S = 300.0  # a final partial waits out a broker outage this long
INBOX_MAX_MESSAGES = 10_000
MAX_EARLY_UPDATES = 1_000  # held (unacked) until the first order names the round; more are left to re-send
MAX_EARLY_BYTES = 256 << 20
INBOX_MAX_BYTES = 512 << 20


def owner_of(device_id: str, num_workers: int) -> int:
    """The index of the worker that owns ``device_id``'s updates: stable across processes and restarts."""
    if num_workers < 1:
        raise ConfigError(f"num_workers must be >= 1, got {num_workers}")
    return zlib.crc32(device_id.encode("utf-8")) % num_workers


def worker_name(index: int) -> str:
    return f"w{index}"


def worker_journal_dir(run_dir: Path, run_id: str, index: int) -> Path:
    return Path(run_dir) / WORKERS_DIR / run_id / f"worker-{index}"


@dataclass
class _RoundPartial:
    """What a worker accumulated in one round."""

    order: wire.WorkOrder
    ctx: ValidationContext
    mean: WeightedMean
    ids: list[str] = field(default_factory=list)
    devices: list[str] = field(default_factory=list)
    norms: list[float] = field(default_factory=list)
    rejected: collections.Counter = field(default_factory=collections.Counter)
    bytes_up: int = 0
    payload_bytes: int = 0
    cpu_s: float = 0.0
    loss_sum: float = 0.0
    loss_examples: int = 0
    claimed_examples: int = 0  # what the accepted updates claimed: the coordinator turns it into examples processed
    local_epsilon: tuple[float, float] | None = None  # (max ε, its δ) the devices with local DP reported
    unreported: int = 0  # accepted since the last progress report
    closed: bool = False  # the final partial went out: nothing more is accepted for this round


class AggregationWorker:
    """Worker ``index`` of ``num_workers`` for ``fleet``; journals under ``run_dir``."""

    def __init__(self, fleet: str, index: int, num_workers: int, transport: Transport, run_dir: Path) -> None:
        if not 0 <= index < num_workers:
            raise ConfigError(f"worker index {index} is outside 0..{num_workers - 1}")
        self.fleet = topics.validate_name(fleet, "fleet")
        self.index, self.num_workers = index, num_workers
        self.name = worker_name(index)
        self.transport = transport
        self.run_dir = Path(run_dir)
        self.publisher = OutagePublisher(transport, PARTIAL_PUBLISH_BOUND_S, log=_log)
        self._inbox = Inbox(INBOX_MAX_MESSAGES, INBOX_MAX_BYTES)
        self._reassembler = wire.Reassembler(60.0, 256 << 20, 16 << 20)
        self._round: _RoundPartial | None = None
        self._journal: UpdateJournal | None = None
        self._seen_update_ids: set[str] = set()  # this run's accepted ids: a late redelivery is "held"
        self._last_progress = 0.0
        self._early: list[tuple[str, wire.Update]] = []  # updates that came before the first order (bounded)
        self._early_bytes = 0

    def start(self) -> None:
        for topic_filter in (topics.update_filter(self.fleet), topics.work_order_topic(self.fleet)):
            self.transport.subscribe(topic_filter, self._inbox.put)
        self.transport.connect()

    def run(self, stop: threading.Event) -> None:
        """Handle messages until ``stop`` is set; then leave the broker cleanly."""
        self.start()
        try:
            while not stop.is_set():
                item = self._inbox.get(0.2)
                if item is not None:
                    self.handle(*item)
                self._maybe_report_progress()
        finally:
            self.transport.close()

    # -- messages ---------------------------------------------------------------------------
    def handle(self, topic: str, payload: bytes) -> None:
        """One message off the wire; nothing it holds can raise out of here."""
        if topic == topics.work_order_topic(self.fleet):
            self._on_order_frame(payload)
            return
        try:
            kind, device = topics.parse_device_topic(topic, self.fleet)
        except EdgetrainError:
            return
        if kind != "update" or owner_of(device, self.num_workers) != self.index:
            return  # another worker's device: dropped before decoding (see the module docstring)
        self._on_update_frame(device, payload)

    def _on_order_frame(self, payload: bytes) -> None:
        if not payload:
            return  # the order was cleared: the run ended
        try:
            order = wire.decode(payload)
        except WireError as exc:
            _log.warning("%s: malformed work order ignored: %s", self.name, exc)
            return
        if isinstance(order, wire.WorkOrder):
            self._on_order(order)

    def _on_order(self, order: wire.WorkOrder) -> None:
        current = self._round
        if current is None or (order.run_id, order.round_id) != (current.order.run_id, current.order.round_id):
            self._open(order)
        else:
            self._widen(current, order)
        assert self._round is not None
        if order.closing and not self._round.closed:
            self._publish_partial(final=True)
            self._round.closed = True

    def _open(self, order: wire.WorkOrder) -> None:
        """A new round (or the first order this process sees): fresh sums, then the journal's replay."""
        if self._round is None or self._round.order.run_id != order.run_id:
            self._journal = UpdateJournal(worker_journal_dir(self.run_dir, order.run_id, self.index))
            self._seen_update_ids = set()
        assert self._journal is not None
        self._journal.forget_through(order.committed_through)
        ctx = ValidationContext(round_id=order.round_id, model_version=order.model_version,
                                selected=frozenset(order.selected), num_params=order.num_params, run_id=order.run_id,
                                max_norm=order.max_norm, max_examples=order.max_examples,
                                example_caps=_caps(order), clip_norm=order.clip_norm,
                                seen_update_ids=self._seen_update_ids)
        self._round = _RoundPartial(order, ctx, WeightedMean(order.num_params, block_updates=BLOCK_UPDATES))
        replayed = sum(self._accept(u.device_id, u, replayed=True) for u in self._journal.replay(order.round_id))
        if replayed:
            _log.info("%s: round %d: %d journaled update(s) replayed", self.name, order.round_id, replayed)
        early, self._early, self._early_bytes = self._early, [], 0
        for device, update in early:
            self._accept(device, update, replayed=False)

    @staticmethod
    def _widen(current: _RoundPartial, order: wire.WorkOrder) -> None:
        """A re-announcement of the same round: the selection may have grown."""
        current.order = order
        current.ctx.selected = frozenset(order.selected) | current.ctx.reported_devices
        current.ctx.example_caps = _caps(order)

    def _on_update_frame(self, device: str, payload: bytes) -> None:
        current = self._round
        if current is not None:
            current.bytes_up += len(payload)
        try:
            message = self._reassembler.feed(payload, source=device)
        except WireError as exc:
            self._count_rejection("malformed", f"frame from {device}: {exc}")
            return
        if message is None:
            return
        if not isinstance(message, wire.Update):
            self._count_rejection("malformed", f"{type(message).__name__} on {device}'s update topic")
            return
        if current is None:  # e.g. a restart: the session's queued updates come before the retained order
            if len(self._early) < MAX_EARLY_UPDATES and self._early_bytes + len(payload) <= MAX_EARLY_BYTES:
                self._early.append((device, message))
                self._early_bytes += len(payload)
            else:
                self._count_rejection("inbox_full", f"{device}'s {message.update_id}: no order yet, buffer full")
            return
        if current.closed:
            reason = REJECT_DUPLICATE if message.update_id in self._seen_update_ids else REJECT_LATE
            self._reject(device, message, UpdateRejected(reason, f"{self.name}: no round open for it"))
            return
        self._accept(device, message, replayed=False)

    def _accept(self, device: str, update: wire.Update, replayed: bool) -> bool:
        """Validate, journal, fold in and ack (a ``replayed`` update is already journaled and acked)."""
        current = self._round
        assert current is not None and self._journal is not None
        try:
            valid = validate_update(update, topic_device=device, ctx=current.ctx)
        except UpdateRejected as rejection:
            self._reject(device, update, rejection, ack=not replayed)
            return False
        if not replayed:
            try:  # before the ack: an acked update survives this worker's SIGKILL
                self._journal.record(current.order.round_id, update)
            except OSError as exc:  # not acked: the device re-sends it
                self._count_rejection("not_durable", f"{device}'s {update.update_id}: journal ({exc})")
                return False
        current.mean.add(valid.accumulable(), float(valid.num_examples))
        current.ctx.mark_accepted(update)
        current.ids.append(update.update_id)
        current.devices.append(device)
        current.norms.append(valid.norm)
        current.payload_bytes += len(update.payload)
        current.cpu_s += float(update.metrics.get("cpu_s", 0.0))
        current.claimed_examples += valid.claimed_examples
        loss = update.metrics.get("train_loss")
        if loss is not None:
            current.loss_sum += float(loss) * valid.num_examples
            current.loss_examples += valid.num_examples
        current.local_epsilon = larger_local_epsilon(current.local_epsilon, update.metrics.get("local_epsilon"),
                                                     update.metrics.get("local_dp_delta"))
        current.unreported += 1
        if not replayed:
            self._ack(device, update, True, "")
        return True

    def _reject(self, device: str, update: wire.Update, rejection: UpdateRejected, ack: bool = True) -> None:
        self._count_rejection(rejection.reason, str(rejection))
        held = rejection.reason == REJECT_DUPLICATE and update.update_id in self._seen_update_ids
        if ack and update.device_id == device:  # never ack on behalf of a spoofed sender
            self._ack(device, update, held, rejection.reason)

    def _count_rejection(self, reason: str, detail: str) -> None:
        _log.warning("%s: rejected (%s): %s", self.name, reason, detail)
        if self._round is not None and not self._round.closed:
            self._round.rejected[reason] += 1

    def _ack(self, device: str, update: wire.Update, accepted: bool, reason: str) -> None:
        frame = wire.encode(wire.Ack(device_id=device, round_id=update.round_id, update_id=update.update_id,
                                     accepted=accepted, reason=reason))
        self.publisher.ack(topics.ack_topic(self.fleet, device), frame, f"ack of {device}'s {update.update_id}")

    # -- reports ----------------------------------------------------------------------------
    def _maybe_report_progress(self) -> None:
        current = self._round
        if current is None or current.closed or not current.unreported:
            return
        if time.monotonic() - self._last_progress < PROGRESS_EVERY_S and not self._inbox.empty():
            return
        self._publish_partial(final=False)

    def _publish_partial(self, final: bool) -> None:
        """A progress report (the updates accepted since the last one) or the round's final sums."""
        current = self._round
        assert current is not None
        first = 0 if final else len(current.ids) - current.unreported
        partial = wire.PartialSum(
            run_id=current.order.run_id, round_id=current.order.round_id, worker_id=self.name, final=final,
            total_weight=current.mean.total_weight if final else 0.0, num_updates=len(current.ids) - first,
            accepted_update_ids=tuple(current.ids[first:]), accepted_devices=tuple(current.devices[first:]),
            rejected=dict(current.rejected) if final else {}, norms=tuple(current.norms[first:]),
            bytes_up=current.bytes_up if final else 0, accepted_payload_bytes=current.payload_bytes if final else 0,
            device_cpu_s=current.cpu_s if final else 0.0, train_loss_sum=current.loss_sum if final else 0.0,
            train_loss_examples=current.loss_examples if final else 0,
            claimed_examples=current.claimed_examples if final else 0,
            payload=current.mean.weighted_sum.astype("<f8").tobytes() if final else b"",
            **local_dp_fields(current.local_epsilon if final else None))
        frame = wire.encode(partial)
        topic = topics.partial_topic(self.fleet, self.name)
        current.unreported = 0
        self._last_progress = time.monotonic()
        if final:  # must arrive: the coordinator waits for it
            publish_through_outage(lambda timeout_s: self.transport.publish(topic, frame, timeout_s=timeout_s),
                                   what=f"{self.name}'s partial of round {partial.round_id}",
                                   broker_url=self.transport.config.url, bound_s=PARTIAL_PUBLISH_BOUND_S,
                                   attempt_timeout_s=10.0, is_connected=lambda: self.transport.is_connected,
                                   clock=time.monotonic, sleep=time.sleep, log=_log)
            return
        try:  # progress is advisory: the final partial carries everything again
            self.transport.publish(topic, frame, timeout_s=5.0)
        except TransportError as exc:
            _log.warning("%s: progress report not sent: %s", self.name, exc)


def _caps(order: wire.WorkOrder) -> dict[str, tuple[int, str]]:
    return {device: (cap, "coordinator") for device, cap in (order.example_caps or {}).items()}


def worker_client_id(fleet: str, index: int) -> str:
    """Fixed per fleet and index: a restarted worker gets its persistent session (queued updates) back."""
    return f"edgetrain-aggregator-{fleet}-{worker_name(index)}"


def build_worker(broker, fleet: str, index: int, num_workers: int, run_dir: Path) -> AggregationWorker:
    transport = MqttTransport(broker, client_id=worker_client_id(fleet, index), clean_start=False, reconnect_max_s=10.0)
    return AggregationWorker(fleet, index, num_workers, transport, run_dir)


def main(argv: list[str] | None = None) -> int:
    """``python -m edgetrain.aggregator.worker``: one worker process (the coordinator's WorkerPool runs these)."""
    parser = argparse.ArgumentParser(prog="edgetrain-aggregation-worker", description=main.__doc__)
    add_broker_args(parser)
    parser.add_argument("--fleet", required=True)
    parser.add_argument("--index", type=int, required=True, help="this worker's index, 0..K-1")
    parser.add_argument("--workers", type=positive_int, required=True, help="K: how many workers share the fleet")
    parser.add_argument("--out", type=Path, required=True, help="the run directory (journals live under it)")
    parser.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    args = parser.parse_args(argv)
    logging.basicConfig(level=args.log_level, format=f"%(asctime)s worker-{args.index} %(levelname)s %(message)s")
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    build_worker(broker_config(args), args.fleet, args.index, args.workers, args.out).run(stop)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
