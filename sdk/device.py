"""The device loop: join a fleet, train when a round selects this device, send the update, repeat.

Everything the device hears arrives as wire frames on the broker (``sdk.topics``): the retained
round announcement and its own ack topic. Handlers run on the transport's network thread, so they
only queue; training, publishing and disk I/O happen on the loop's thread. An update is written to
the on-disk outbox *before* it is published and removed only when the aggregator acknowledges it,
so a crash, a reconnect or a broker restart never loses it; the round it answers is recorded too,
so a restarted device does not train the same round twice.

Every device keeps a replica of the global model from every announcement, selected or not
(``sdk.model_sync``), so announcements can carry deltas. A round asks either for local training
(Federated Learning: the update is the delta w_local − w_round) or for one mini-batch gradient
(Large Batch Training: ``task == "gradient"``, on the device's next batch), with the announcement's
typed ``RoundSettings``. A ``train_continuous`` announcement (FedBuff, Nguyen et al. 2022) asks for local
training again and again: whenever its inbox is empty the device trains once more from the newest model it
holds and sends that update, until a newer announcement, the deadline or the end of the run.

Progress, codec state and outbox belong to one run (the announcement's ``run_id``); a new run starts
them afresh. With the aggregator's public key configured, the device obeys only announcements that
verify (``sdk.wire.signing``). No message ends the device: a malformed, forged or unusable
announcement is logged, its reason published in the device's status (``skip_reason``), and the
device waits for the next one.
"""
from __future__ import annotations

import logging
import platform
import queue
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Mapping

import numpy as np

from . import __version__, topics, wire
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from .attack import Attack
from .data import PartitionSpec, batch_indices, device_indices, load_split, partition_digest, to_model_input
from .errors import ConfigError, EdgetrainError, TransportError, WireError
from .device_metrics import (BENCH_ROUND_ID, EnergyProbe, GradientGroup, StepTimer, energy_values, memory_values,
                             step_stats_ms)
from .device_state import DeviceState
from .host_share import HostShare
from .local_dp import LocalDPConfig, LocalPrivacyLedger, privatize, require_accountant
from .model_sync import ModelReplica
from .outbox import Outbox
from .round_settings import TASK_TRAIN_CONTINUOUS, RoundSettings
from .runtime import Runtime, TrainConfig
from .secagg.device_round import SecureDeviceRound, check_summable_codec
from .transport import Handler, Transport

_log = logging.getLogger(__name__)


MAX_SLOWDOWN = 1000.0  # a straggler 1000x slower is already a dead device; more is a typo


def check_slowdown(factor: float) -> float:
    """``factor`` if it is a finite number in [1, MAX_SLOWDOWN], else ConfigError naming it."""
    if isinstance(factor, bool) or not isinstance(factor, (int, float)) or not 1.0 <= factor <= MAX_SLOWDOWN:
        raise ConfigError(f"slowdown must be a number in [1, {MAX_SLOWDOWN:g}], got {factor!r}")
    return float(factor)


@dataclass(frozen=True)
class DeviceConfig:
    fleet: str
    device_id: str
    state_dir: Path
    partition: PartitionSpec
    partition_index: int = 0
    partition_count: int = 1
    seed: int = 0
    max_chunk_bytes: int | None = None  # split update frames larger than this (broker limits)
    gradient_metrics_every: int = 10  # large batch: one metrics message per this many steps
    attack: Attack | None = None  # an adversarial test device (sdk.attack); None: honest
    slowdown: float = 1.0  # TESTING: every training step takes this many times longer (a straggler)
    local_dp: LocalDPConfig | None = None  # clip and noise every update before it leaves (sdk.local_dp)

    def __post_init__(self) -> None:
        check_slowdown(self.slowdown)
        topics.validate_name(self.fleet, "fleet")
        topics.validate_name(self.device_id, "device id")
        if not 0 <= self.partition_index < self.partition_count:
            raise ConfigError(f"partition index {self.partition_index} not in [0, {self.partition_count})")
        if self.gradient_metrics_every < 1:
            raise ConfigError(f"gradient_metrics_every must be >= 1, got {self.gradient_metrics_every}")


@dataclass(frozen=True)
class LocalData:
    """This device's share of the training set, already in model-input form."""

    x: np.ndarray  # float32 (n, *input_shape)
    y: np.ndarray  # int64 (n,)
    digest: str  # identifies the partition, so a mismatch between devices shows up in status

    @classmethod
    def load(cls, config: DeviceConfig, runtime: Runtime, data_dir: Path | None,
             limit: int | None = None) -> "LocalData":
        train = load_split("train", data_dir)
        idx = device_indices(train.labels, config.partition, config.seed, config.partition_index,
                             config.partition_count)[:limit]
        return cls.from_indices(train.images, train.labels, idx, runtime, config.attack)

    @classmethod
    def from_indices(cls, images: np.ndarray, labels: np.ndarray, idx: np.ndarray, runtime: Runtime,
                     attack: Attack | None = None) -> "LocalData":
        """The partition ``idx`` (an index array) of a split already in memory: a device host loads the split
        once and gives each identity its rows."""
        m = runtime.manifest
        own = labels[idx].astype(np.int64)
        if attack is not None:  # a test attacker trains on flipped labels (sdk.attack)
            own = attack.poison_labels(own, m.num_classes)
        return cls(to_model_input(images[idx], m.input_mean, m.input_std), own, partition_digest([idx]))


class RoundInterrupted(Exception):
    """Training stopped between two steps because the device is shutting down (never leaves ``Device``)."""


def round_batches(data: LocalData, settings: RoundSettings,
                  rng: np.random.Generator) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """E local epochs of shuffled mini-batches, or exactly ``local_steps`` batches when given
    (``RoundSettings`` checked the numbers when the announcement was decoded)."""
    return _round_batches(data, settings.batch_size, settings.local_steps, settings.local_epochs, rng)


def _round_batches(data: LocalData, batch_size: int, steps: int | None, epochs: int,
                   rng: np.random.Generator) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    if steps is not None:
        done = 0
        while done < steps:
            for idx in batch_indices(len(data.y), batch_size, rng):
                yield data.x[idx], data.y[idx]
                done += 1
                if done == steps:
                    return
        return
    for _ in range(epochs):
        for idx in batch_indices(len(data.y), batch_size, rng):
            yield data.x[idx], data.y[idx]


def gradient_batches(data: LocalData, batch_size: int, seed: tuple[int, ...]) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """The endless stream of mini-batches a large-batch worker draws from, one per step; epoch e is
    shuffled by ``default_rng([*seed, e])``, so a test can reproduce exactly what a device used."""
    epoch = 0
    while True:
        for idx in batch_indices(len(data.y), batch_size, np.random.default_rng([*seed, epoch])):
            yield data.x[idx], data.y[idx]
        epoch += 1


class Device:
    """One board in a fleet. ``run`` blocks until ``stop`` is set.

    ``energy`` (device_bench's ``RoundEnergy``, or None with ``energy_unavailable`` saying why) measures
    each round's joules; ``bench`` (``sdk.device_metrics.bench_values``) is published once, retained.
    ``aggregator_key``: the aggregator's Ed25519 public key; when given, only announcements it signed
    are obeyed. ``share``: what a device host's identities share (``sdk.host_share``): announcement
    frames decoded and verified once, model replicas by version; None on a board of its own.
    """

    def __init__(self, config: DeviceConfig, transport: Transport, runtime: Runtime, data: LocalData,
                 energy: EnergyProbe | None = None, energy_unavailable: str = "",
                 bench: Mapping[str, float] | None = None, aggregator_key: Ed25519PublicKey | None = None,
                 share: HostShare | None = None, secure_only: bool = False) -> None:
        self.config = config
        self.transport = transport
        self.runtime = runtime
        self.data = data
        config.state_dir.mkdir(parents=True, exist_ok=True)
        self.outbox = Outbox(config.state_dir / "outbox")
        self.state = DeviceState(config.state_dir)
        self.share = share
        self.replica = ModelReplica(runtime.manifest.num_params, share.models if share is not None else None)
        self.aggregator_key = aggregator_key
        # --secure-aggregation: this device's update never leaves it unmasked (plain rounds are skipped).
        self.secure_only = secure_only
        self._secure_round: SecureDeviceRound | None = None
        self._secure_announcement: wire.Announcement | None = None  # the announcement _secure_round answers
        self.run_id = self.state.run_id()  # the run this device serves; "" before its first
        self.skip_reason = ""  # why the last round was skipped or announcement refused (in status)
        self._awaiting_resync = False
        self._reset_codec_on_resync = False
        self._pending_codec_state: tuple[str, dict | None] = ("dense", None)
        self._gradient_stream: tuple[int, Iterator[tuple[np.ndarray, np.ndarray]]] | None = None
        self._inbox: queue.Queue[tuple[str, bytes]] = queue.Queue()
        self._stop = threading.Event()
        self._reassembler = wire.Reassembler()
        self.rounds_trained = 0
        self._answered_deadline = float("-inf")  # deadline of the last announcement answered or re-sent for
        self.energy = energy
        self.energy_unavailable = energy_unavailable if energy is None else ""
        self.bench = dict(bench) if bench else None
        self._measured: dict[str, float] = {}  # the round's figures, filled by train_round / compute_gradient
        self._group = GradientGroup(config.gradient_metrics_every)
        # The newest train_continuous announcement that selected this device: trained again whenever idle.
        self._continuous: wire.Announcement | None = None
        # Flow control for continuous rounds: the next update starts only once the aggregator acknowledged the
        # last one, so a fleet faster than the server's steps cannot pile a backlog of ever staler updates up.
        self._unacked: set[str] = set()
        self._local_dp: tuple[LocalPrivacyLedger, np.random.Generator] | None = None
        if config.local_dp is not None:  # fail at start when the accountant is missing or the ledger unreadable
            require_accountant()
            # Fresh OS entropy: noise that a seed could reproduce protects nothing.
            self._local_dp = (LocalPrivacyLedger(config.state_dir), np.random.default_rng())

    # -- the loop ---------------------------------------------------------------------------
    def _status(self, online: bool, needs_resync: bool = False) -> bytes:
        info = {"num_examples": int(len(self.data.y)),
                "partition": str(self.config.partition), "partition_digest": self.data.digest,
                "model_version": self.replica.version, "needs_resync": needs_resync}
        if self.energy is not None:
            info.update(self.energy.describe())
        else:
            info["energy_unavailable"] = self.energy_unavailable or "no power source given"
        return wire.encode(wire.Status(device_id=self.config.device_id, online=online, info=info,
                                       run_id=self.run_id, skip_reason=self.skip_reason,
                                       machine=platform.machine(), python_version=platform.python_version(),
                                       runtime=self.runtime.name, edgetrain_version=__version__))

    def _publish_status(self, needs_resync: bool = False) -> None:
        try:
            self.transport.publish(topics.status_topic(self.config.fleet, self.config.device_id),
                                   self._status(True, needs_resync), retain=True)
        except TransportError as exc:  # the next status (reconnect, next skip) says it again
            _log.warning("could not publish status: %s", exc)

    def run(self, stop: threading.Event) -> None:
        self.join(stop)
        try:
            # A transport that gave up for good (another process took this device id: ClientIdInUse) ends
            # the loop, and run() raises its reason after saying goodbye.
            while not stop.is_set() and self.transport.failure is None:
                try:  # continuous training: messages first (a newer model, acks), then train again
                    topic, payload = (self._inbox.get_nowait() if self.has_continuous_work()
                                      else self._inbox.get(timeout=0.2))
                except queue.Empty:
                    self.continue_work()
                    continue
                self.handle(topic, payload)
        finally:
            self.leave()
        if self.transport.failure is not None:
            raise self.transport.failure

    def join(self, stop: threading.Event, deliver: Handler | None = None) -> None:
        """Subscribe, connect, say "online": the start of ``run``. A device host (``sdk.device_host``) calls
        it itself, with ``deliver`` putting this device's messages on the host's one queue, and then calls
        ``handle`` for each of them and ``leave`` at the end, as ``run`` does."""
        self._stop = stop  # also checked between training steps: a long round must not delay a shutdown
        fleet, me = self.config.fleet, self.config.device_id
        enqueue = deliver or (lambda topic, payload: self._inbox.put((topic, payload)))  # network thread
        self.transport.subscribe(topics.announce_topic(fleet), enqueue)
        self.transport.subscribe(topics.ack_topic(fleet, me), enqueue)
        self.transport.subscribe(topics.secagg_inbox_topic(fleet, me), enqueue)
        self.transport.connect()
        self.transport.attach_outbox(self.outbox)  # re-sends anything a previous run left unacknowledged
        self.transport.publish(topics.status_topic(fleet, me), self._status(True), retain=True)
        # The broker publishes our last will ("offline") whenever the connection drops, a broker restart
        # included; say "online" again after every reconnect or the aggregator never selects us again.
        self.transport.on_reconnect.append(
            lambda: self.transport.publish(topics.status_topic(fleet, me), self._status(True), retain=True))
        _log.info("device %s joined fleet %s with %d examples", me, fleet, len(self.data.y))
        if self.energy is None:  # said once; every round's metrics then simply lack energy_j
            _log.info("energy not measured: %s", self.energy_unavailable or "no power source given")
        if self.bench:  # retained: an aggregator started later still gets it
            self._send_metrics(BENCH_ROUND_ID, self.bench, retain=True)

    def handle(self, topic: str, payload: bytes, superseded: bool = False) -> None:
        """One message from the broker (see ``_handle_safely``); on the caller's thread. ``superseded``: a
        newer announcement is already queued for this device (a device host knows), so this one only
        brings the model along (the newer one may be a delta on it) and is not answered."""
        self._handle_safely(topic, payload, superseded)

    def leave(self) -> None:
        """Say "offline" and disconnect: the end of ``run``."""
        try:
            self.transport.publish(topics.status_topic(self.config.fleet, self.config.device_id),
                                   self._status(False), retain=True, timeout_s=2)
        except TransportError as exc:
            _log.warning("could not publish offline status: %s", exc)
        self.transport.close()
        if self.energy is not None:
            self.energy.close()

    def _handle_safely(self, topic: str, payload: bytes, superseded: bool = False) -> None:
        """``_handle``, but no message ends the device: whatever one raises is logged, published in the
        status, and the device waits for the next message. Broad on purpose: a message comes from the
        network, and a defect it uncovers must cost that message, not the fleet."""
        try:
            self._handle(topic, payload, superseded)
        except Exception as exc:  # noqa: BLE001 (see the docstring)
            _log.exception("message on %s could not be handled", topic)
            self._skip(None, f"message on {topic} could not be handled: {type(exc).__name__}: {exc}")

    def _handle(self, topic: str, payload: bytes, superseded: bool = False) -> None:
        if not payload:  # a cleared retained announcement: the run is over
            self._continuous = None
            if self._group.steps:  # a partial group of steps nobody will record: close its window
                self._group.flush()
                if self.energy is not None:
                    self.energy.end()
            return
        if topic == topics.secagg_inbox_topic(self.config.fleet, self.config.device_id):
            self._on_secagg(payload)
            return
        try:
            message = self._decode(topic, payload)
        except WireError as exc:
            if topic == topics.announce_topic(self.config.fleet):
                self._skip(None, f"malformed announcement refused: {exc}")
            else:
                _log.warning("dropped a malformed frame on %s: %s", topic, exc)
            return
        if isinstance(message, wire.Announcement):
            self._on_announcement(message, answer=not superseded)
        elif isinstance(message, wire.Ack) and message.device_id == self.config.device_id:
            self._on_ack(message)

    def _decode(self, topic: str, payload: bytes) -> wire.Message | None:
        """The message ``payload`` completes; an announcement frame a host already decoded is not decoded again."""
        if self.share is not None and topic == topics.announce_topic(self.config.fleet):
            return self.share.frames.decode(payload, self._reassembler.feed)
        return self._reassembler.feed(payload)

    def _verify(self, a: wire.Announcement) -> None:
        """BadSignature unless the aggregator's key signed ``a`` (checked once per frame on a host)."""
        assert self.aggregator_key is not None
        if self.share is not None:
            self.share.frames.verify(a, self.aggregator_key)
        else:
            wire.signing.verify(a, self.aggregator_key)

    def _on_ack(self, ack: wire.Ack) -> None:
        self._unacked.discard(ack.update_id)
        for entry in self.outbox.pending():
            if entry.key.split("#")[0] == ack.update_id:
                self.outbox.remove(entry.key)
        if not ack.accepted:
            _log.warning("round %d: update %s rejected: %s", ack.round_id, ack.update_id, ack.reason)

    def _skip(self, a: wire.Announcement | None, reason: str, level: int = logging.WARNING) -> None:
        """Log why this device does not answer (``a``, or a frame that is no announcement), and say it
        in the status so an operator sees it without the device's log."""
        where = "" if a is None else f"run {a.run_id} round {a.round_id}: "
        self.skip_reason = f"{where}{reason}"
        _log.log(level, "%s", self.skip_reason)
        self._publish_status()

    # -- one announcement ---------------------------------------------------------------------
    def _on_announcement(self, a: wire.Announcement, answer: bool = True) -> None:
        """Verify, adopt its run, sync the model, then answer if selected, not answered yet and ``answer``."""
        try:
            if self.aggregator_key is not None:
                self._verify(a)
            self._enter_run(a.run_id)
            synced = self._sync_model(a)
        except WireError as exc:  # forged, unsigned, or a payload that is no usable model: state unchanged
            self._skip(a, f"announcement refused: {exc}")
            return
        if synced:  # an older continuous round no longer matches the model this device holds
            self._continuous = None
        if not synced or not answer or self.config.device_id not in a.selected:
            return
        if a.task == TASK_TRAIN_CONTINUOUS:  # trained by continue_work once the inbox is empty
            if self._unacked and a.deadline_unix_s > self._answered_deadline and \
                    self.state.last_done() == (a.round_id, a.model_version):  # announced again: an ack may be lost
                self._answered_deadline = a.deadline_unix_s
                self._resend_pending(a.round_id)
            self._continuous = a
            return
        if self._already_answered(a):  # normal after a reconnect or a retry: said at info level
            self._skip(a, f"already answered (model version {a.model_version}); skipped", logging.INFO)
            return
        if time.time() > a.deadline_unix_s:
            self._skip(a, "announcement arrived after its deadline; skipped")
            return
        self._answer(a)

    def has_continuous_work(self) -> bool:
        """Whether a continuous round (FedBuff) wants another update from this device now."""
        return self._continuous is not None and not self._unacked

    def continue_work(self) -> None:
        """One more update of the continuous round, from the newest model held (FedBuff: a device that
        finishes an update starts the next at once); a no-op without one. Called when the inbox is empty."""
        a = self._continuous
        if a is None or self._unacked:
            return
        if self.replica.version != a.model_version:  # cannot happen after a sync; never train a mislabelled base
            self._continuous = None
            return
        if time.time() > a.deadline_unix_s:
            self._continuous = None
            self._skip(a, "continuous round past its deadline; waiting for the next announcement", logging.INFO)
            return
        self._answer(a)

    def _enter_run(self, run_id: str) -> None:
        """Adopt ``run_id``; a new run starts progress, codec state, outbox and model afresh (its round
        numbers and model versions start again, so nothing from the last run applies)."""
        if run_id == self.run_id:
            return
        _log.info("new run %s (was %s): per-run state reset", run_id, self.run_id or "none")
        self.state.begin_run(run_id)
        for entry in self.outbox.pending():  # updates for the old run's rounds: nobody will aggregate them
            self.outbox.remove(entry.key)
        self.replica.reset()
        self.run_id = run_id
        self._continuous = None
        self._unacked.clear()
        self._awaiting_resync = self._reset_codec_on_resync = False
        self._gradient_stream = None
        self._answered_deadline = float("-inf")
        if self._group.steps:  # the old run's partial group of steps: nobody will record it
            self._group.flush()
            if self.energy is not None:
                self.energy.end()

    def _sync_model(self, a: wire.Announcement) -> bool:
        """Bring the replica to ``a``'s model; False while a resync is needed (asked for once)."""
        if not self.replica.apply(a):
            if not self._awaiting_resync:  # ask once; the aggregator's next announcement is a full model
                _log.info("model version %s cannot take the delta to %d; asking for a resync",
                          self.replica.version, a.model_version)
                self._awaiting_resync = True
                # A restarted device (no model yet) keeps its residuals; a drifted one starts them afresh.
                self._reset_codec_on_resync = self.replica.version is not None
                self._publish_status(needs_resync=True)
            return False
        if self._awaiting_resync:
            if self._reset_codec_on_resync:  # residuals belonged to a model this device no longer holds
                self.state.reset_codec_state()
            self._awaiting_resync = False
        return True

    def _already_answered(self, a: wire.Announcement) -> bool:
        """Whether this run's progress already holds ``a``'s round. A round announced again with a new
        deadline means the aggregator still lacks updates: re-send what it has not acknowledged."""
        done = self.state.last_done()
        if (a.round_id, a.model_version) > done:
            return False
        if (a.round_id, a.model_version) == done and a.deadline_unix_s > self._answered_deadline:
            self._answered_deadline = a.deadline_unix_s
            self._resend_pending(a.round_id)
        return True  # else a retained announcement seen again after a reconnect or a restart

    def _answer(self, a: wire.Announcement) -> None:
        """Train (or take one gradient), then send the update; a failure skips the round, saying why."""
        gradient = a.task == "gradient"
        refusal = self._secure_refusal(a, gradient)
        if refusal:
            self._skip(a, refusal)
            return
        if self.energy is not None and not (gradient and self._group.steps):  # a group's window is open
            self.energy.begin()
        try:
            update = self.compute_gradient(a) if gradient else self.train_round(a)
        except (RoundInterrupted, EdgetrainError, ValueError, ArithmeticError) as exc:
            # Nothing sent, the round not marked done (a restarted device trains it again while it is open),
            # the codec state untouched. E.g. a codec parameter this codec refuses, or a diverged update.
            if self.energy is not None and not gradient:
                self.energy.end()  # close the round's window; it measured no update
            if isinstance(exc, RoundInterrupted):
                _log.info("round %d: stopped mid-training; not answered", a.round_id)
            else:
                self._skip(a, f"cannot produce an update: {exc}")
            return
        if a.settings.secure_aggregation:
            self._start_secure_round(a, update)
            return
        self._send_update(a, update, gradient)

    # -- secure aggregation (sdk.secagg.device_round) ---------------------------------------------
    def _secure_refusal(self, a: wire.Announcement, gradient: bool) -> str:
        """Why this device will not answer ``a`` given secure aggregation ("" when it will)."""
        open_one = self._secure_announcement if self._secure_round is not None else None
        if open_one is not None and (open_one.round_id, open_one.deadline_unix_s) == (a.round_id, a.deadline_unix_s):
            return "secure round already in progress (the announcement was seen again)"
        if not a.settings.secure_aggregation:
            return "plain round refused: this device sends its updates only under secure aggregation" \
                if self.secure_only else ""
        if gradient:
            return "secure aggregation is for training rounds, not large-batch gradients"
        try:
            check_summable_codec(a.uplink_codec.name)
        except ConfigError as exc:
            return str(exc)
        return ""

    def _start_secure_round(self, a: wire.Announcement, update: wire.Update) -> None:
        """Mask the values the update carries (decoded: a lossy codec's rounding included) and advertise."""
        spec = a.uplink_codec.with_layout(self.runtime.manifest.shapes)
        vector = spec.codec.decode(bytes(update.payload), self.runtime.manifest.num_params, spec.params)
        self._secure_round = SecureDeviceRound(self.transport, self.config.fleet, self.config.device_id, a.run_id,
                                               a.round_id, vector)
        self._secure_announcement = a
        self._secure_round.start()

    def _on_secagg(self, payload: bytes) -> None:
        secure = self._secure_round
        if secure is None:
            _log.warning("secure-aggregation message with no secure round open; dropped")
            return
        secure.receive(payload)
        if not secure.finished:
            return
        self._secure_round = None
        a = self._secure_announcement
        if secure.session.aborted:
            if self.energy is not None:
                self.energy.end()  # close the round's window; nothing was summed
            self._skip(a, f"secure aggregation aborted: {secure.session.aborted}")
            return
        # Done only now: a device that dies earlier is a dropout and trains the round again if it is re-announced.
        self.state.save_codec_state(*self._pending_codec_state)
        self.state.mark_done(a.round_id, a.model_version)
        self._answered_deadline = a.deadline_unix_s
        self.rounds_trained += 1
        self._publish_metrics(a.round_id, False, 8 * self.runtime.manifest.num_params)
        _log.info("round %d: masked update summed (secure aggregation)", a.round_id)

    def _send_update(self, a: wire.Announcement, update: wire.Update, gradient: bool) -> None:
        """Durable first (outbox, codec state, progress), then on the wire."""
        frame = wire.encode(update)
        parts = wire.split(frame, self.config.max_chunk_bytes, update.update_id) if self.config.max_chunk_bytes else [frame]
        update_topic = topics.update_topic(self.config.fleet, self.config.device_id)
        for i, part in enumerate(parts):
            self.outbox.put(f"{update.update_id}#{i}", update_topic, part)
        # The codec's new state only once the update it goes with is durable, and before the round counts
        # as done: a crash in between re-trains the round from the old state, losing no residual.
        self.state.save_codec_state(*self._pending_codec_state)
        self.state.mark_done(a.round_id, a.model_version)
        if a.task == TASK_TRAIN_CONTINUOUS:
            self._unacked.add(update.update_id)
        self._answered_deadline = a.deadline_unix_s
        self.rounds_trained += 1
        self._publish_metrics(a.round_id, gradient, len(frame))
        if not gradient or a.round_id % self.config.gradient_metrics_every == 0:  # a large-batch step is short
            _log.info("round %d: %d step(s), loss %.4f, %.1f s, %d bytes sent", a.round_id,
                      int(update.metrics.get("steps", 0)), float(update.metrics.get("train_loss", float("nan"))),
                      float(update.metrics.get("compute_s", 0.0)), len(frame))
        for part in parts:
            try:
                self.transport.publish(update_topic, part)
            except TransportError as exc:  # stays in the outbox; re-sent after the reconnect
                _log.warning("round %d: publish failed, kept in outbox: %s", a.round_id, exc)
                break

    def _publish_metrics(self, round_id: int, gradient: bool, frame_bytes: int) -> None:
        """The round's figures on the metrics topic, *before* its update: publish waits for the
        broker's PUBACK and Mosquitto forwards to a subscriber in the order it received, so the
        aggregator holds them before the update that may close the round. A large-batch step joins
        its group instead (``sdk.device_metrics``); the group goes out on aligned step numbers."""
        measured = {**self._measured, "update_frame_bytes": float(frame_bytes)}
        if gradient:
            self._group.add(round_id, measured.pop("compute_s", 0.0), measured)
            if not self._group.due(round_id):
                return
            measured = self._group.flush()
        if self.energy is not None:
            measured.update(energy_values(*self.energy.end()))
        self._send_metrics(round_id, {**measured, **memory_values()})

    def _send_metrics(self, round_id: int, values: Mapping[str, float], retain: bool = False) -> None:
        message = wire.DeviceMetrics(device_id=self.config.device_id, round_id=round_id, values=values)
        try:  # best effort, never in the outbox: a lost message costs a figure, not a model update
            self.transport.publish(topics.metrics_topic(self.config.fleet, self.config.device_id),
                                   wire.encode(message), retain=retain, timeout_s=2.0)
        except TransportError as exc:
            _log.warning("round %d: metrics not published: %s", round_id, exc)

    def _resend_pending(self, round_id: int) -> None:
        for entry in self.outbox.pending():
            try:
                self.transport.publish(entry.topic, entry.payload)
            except TransportError as exc:  # stays in the outbox; re-sent after the reconnect
                _log.warning("round %d: re-send failed, kept in outbox: %s", round_id, exc)
                return

    def _encode(self, vector: np.ndarray, a: wire.Announcement) -> tuple[str, bytes]:
        """Compress with the round's uplink codec, carrying its state (residuals…) across rounds on disk."""
        spec = a.uplink_codec.with_layout(self.runtime.manifest.shapes)
        text = str(spec)
        payload, state = spec.codec.encode(vector, self.state.codec_state(text), spec.params)
        self._pending_codec_state = (text, state)  # saved once the update is in the outbox
        return text, payload

    def _update(self, a: wire.Announcement, vector: np.ndarray, num_examples: int, metrics: dict,
                measured: dict[str, float]) -> wire.Update:
        """The update frame's message; ``measured`` (plus the encode time) becomes the round's metrics."""
        if self._local_dp is not None:  # the one place an update is privatized, before any other step
            vector, metrics = self._privatize(vector, metrics)
        if self.config.attack is not None:  # a test adversary: the one place an update is poisoned
            # Its own stream (the trailing 1), apart from the round's shuffle.
            rng = np.random.default_rng([self.config.seed, self.config.partition_index, a.round_id, 1])
            vector = self.config.attack.poison_update(vector, rng)
        started = time.perf_counter()
        spec, payload = self._encode(vector, a)
        self._measured = {**measured, "encode_ms": (time.perf_counter() - started) * 1e3}
        return wire.Update(device_id=self.config.device_id, round_id=a.round_id, model_version=a.model_version,
                           update_id=uuid.uuid4().hex, num_examples=num_examples, codec=spec, payload=payload,
                           metrics=metrics, run_id=a.run_id)

    def _privatize(self, vector: np.ndarray, metrics: dict) -> tuple[np.ndarray, dict]:
        """Local DP (sdk.local_dp): the clipped, noised update, and the metrics with this device's ε so far."""
        assert self._local_dp is not None and self.config.local_dp is not None
        ledger, rng = self._local_dp
        config = self.config.local_dp
        noised = privatize(vector, config, rng)
        ledger.record(config.mechanism_multiplier)
        return noised, {**metrics, "local_epsilon": ledger.epsilon(config.delta), "local_dp_delta": config.delta}

    def train_round(self, a: wire.Announcement) -> wire.Update:
        """Local training from the announced model; the update is the delta w_local − w_round."""
        assert self.replica.params is not None  # apply() succeeded
        start = self.replica.params
        self.runtime.set_parameters(start)
        settings = a.settings
        config = TrainConfig(lr=settings.lr, momentum=settings.momentum, weight_decay=settings.weight_decay,
                             nesterov=settings.nesterov, prox_mu=settings.prox_mu)
        # Distinct, reproducible shuffles per (seed, device, round); a continuous round trains many times from
        # one announcement, each time on another shuffle.
        rng = np.random.default_rng([self.config.seed, self.config.partition_index, a.round_id]
                                    + ([self.rounds_trained] if a.task == TASK_TRAIN_CONTINUOUS else []))
        cpu = time.process_time()
        timer = StepTimer(self._slowed(self._until_stopped(round_batches(self.data, settings, rng))))
        result = self.runtime.train(timer, config)
        timer.finish()
        cpu_s = time.process_time() - cpu
        delta = self.runtime.get_parameters() - start
        return self._update(a, delta, int(len(self.data.y)), {
            "train_loss": result.mean_loss, "compute_s": result.compute_s, "steps": float(result.steps),
            "cpu_s": cpu_s}, {"compute_s": result.compute_s, **step_stats_ms(timer.durations_s),
                              "steps": float(result.steps), "examples": float(result.examples), "cpu_s": cpu_s})

    def _until_stopped(self, batches: Iterator[tuple[np.ndarray, np.ndarray]]
                       ) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """``batches``, but RoundInterrupted (out of the runtime's training loop) once ``stop`` is set."""
        for batch in batches:
            if self._stop.is_set():
                raise RoundInterrupted("stop requested")
            yield batch

    def _slowed(self, batches: Iterator[tuple[np.ndarray, np.ndarray]]) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """``batches``, each step stretched to ``slowdown`` times its compute time by sleeping after it
        (a straggler for tests and ``simulate --stragglers``); a stop request ends the sleep."""
        extra = self.config.slowdown - 1.0
        for batch in batches:
            started = time.perf_counter()
            yield batch  # the runtime computes the step, then asks for the next batch
            if extra > 0:
                self._stop.wait(extra * (time.perf_counter() - started))

    def compute_gradient(self, a: wire.Announcement) -> wire.Update:
        """One mini-batch gradient at the announced model (a large-batch worker never trains ahead)."""
        assert self.replica.params is not None
        batch_size = a.settings.batch_size
        if self._gradient_stream is None or self._gradient_stream[0] != batch_size:
            seed = (self.config.seed, self.config.partition_index)
            self._gradient_stream = (batch_size, gradient_batches(self.data, batch_size, seed))
        x, y = next(self._gradient_stream[1])
        cpu, started = time.process_time(), time.perf_counter()
        self.runtime.set_parameters(self.replica.params)
        result = self.runtime.gradient(x, y)
        compute_s, cpu_s = time.perf_counter() - started, time.process_time() - cpu
        return self._update(a, result.gradient, result.examples, {
            "train_loss": result.loss, "compute_s": compute_s, "steps": 1.0, "cpu_s": cpu_s},
            {"compute_s": compute_s, "examples": float(result.examples), "cpu_s": cpu_s})
