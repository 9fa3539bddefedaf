"""The aggregator service: rounds over the broker, on top of the pure pieces.

Each round: wait for enough live devices → ``strategy.configure_round`` → announce (retained; a broker
outage is waited out, ``publish_retry``) → collect until every chosen device reported or the deadline
passed → ``validate_update`` on every update before the strategy sees it → ``strategy.aggregate``
(streaming) → evaluate → checkpoint atomically → one line in ``metrics.jsonl``. Too few updates by the
deadline: the round is announced again with a new deadline (updates already accepted are kept; devices
that already answered skip it), at most ``max_attempts`` times. Network callbacks only queue; the rest runs here.
"""
from __future__ import annotations

import dataclasses
import logging
import os
import signal
import threading
import time
import uuid
from pathlib import Path
from typing import Callable

import numpy as np
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from edgetrain.sdk import topics, wire
from edgetrain.sdk.codecs import CodecSpec, warm_up_decoder
from edgetrain.sdk.errors import EdgetrainError, UnknownCodec, UpdateRejected, WireError
from edgetrain.sdk.atomic_write import atomic_write_text
from edgetrain.sdk.runtime import Runtime
from edgetrain.sdk.transport import Transport

from .config import AggregatorConfig
from .device_metrics import DeviceMetricsCollector
from .downlink import Downlink, DownlinkPayload
from .inbox import Inbox
from .checkpoint import Checkpoint, load_latest, rng_from_state, rng_state, save_checkpoint
from .privacy_metrics import privacy_extra, privacy_summary
from .publish_retry import OutagePublisher
from .results import INITIAL_ROUND, MetricsLog, RoundRecord, plot_run, training_rounds, write_summary
from .secure_rounds import run_secure_round, secure_summary
from .round_state import OpenRound, Progress, RoundTally, examples_processed
from .strategy import AggregateInfo, RoundPlan, Strategy
from .update_caps import CLIP_NORM_MEDIAN, NormHistory, example_caps
from .update_journal import UpdateJournal
from .validation import (REJECT_DUPLICATE, REJECT_LATE, REJECT_UNKNOWN_CODEC, REJECT_WRONG_ROUND, REJECT_WRONG_RUN,
                         ValidatedUpdate, ValidationContext, validate_update)

_log = logging.getLogger(__name__)
WAIT_REPORT_EVERY_S = 10.0  # how often a wait for devices or updates logs who is live and who is missing

__all__ = ["Aggregator", "AggregatorConfig", "RunStopped"]

# Test hook: the round number after whose acks (and before whose checkpoint) the process SIGKILLs itself,
# so a test can reproduce "killed between ack and checkpoint" at exactly that point.
REJECT_MISSING_CHUNK = "missing_chunk"  # a chunked update never completed (expired)
REJECT_NOT_DURABLE = "not_durable"  # valid, but the journal write failed: not acked, so the device re-sends it
CRASH_BEFORE_CHECKPOINT_ENV = "EDGETRAIN_TEST_CRASH_BEFORE_CHECKPOINT"

RUN_ID_FILE = "run_id"  # in the run directory: a resumed run keeps its id, so devices keep their progress


def load_or_create_run_id(out_dir: Path, resume: bool) -> str:
    """The run's id: the one in ``out_dir`` when resuming (if any), else a new random one, written there."""
    path = out_dir / RUN_ID_FILE
    if resume and path.is_file():
        run_id = path.read_text(encoding="ascii", errors="replace").strip()
        if run_id and len(run_id) <= wire.messages.MAX_RUN_ID_CHARS and run_id.isalnum():
            return run_id
        _log.warning("%s holds no usable run id; this run gets a new one", path)
    run_id = uuid.uuid4().hex
    out_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, run_id + "\n")
    return run_id


class RunStopped(EdgetrainError):
    """The run was asked to stop (signal, or the simulation lost its devices) before it finished."""


class Aggregator:
    """Runs ``config.rounds`` rounds of ``strategy`` over ``transport``; evaluates with ``runtime``."""

    def __init__(self, config: AggregatorConfig, strategy: Strategy, transport: Transport, runtime: Runtime,
                 initial_params: np.ndarray, test_data: tuple[np.ndarray, np.ndarray],
                 signing_key: Ed25519PrivateKey | None = None) -> None:
        """``signing_key``: signs every announcement (``sdk.wire.signing``); devices configured with its
        public half obey nothing else."""
        self.config = config
        self.signing_key = signing_key
        self.run_id = ""  # set by start(): new, or the run directory's when resuming
        self.strategy = strategy
        self.transport = transport
        self.runtime = runtime
        self.params = initial_params.astype(np.float32, copy=True)
        self.test_x, self.test_y = test_data
        self.model_version = 0
        self.next_round = 1
        self.rng = np.random.default_rng(config.seed)
        self.live: set[str] = set()
        self.seen_update_ids: set[str] = set()
        self.metrics = MetricsLog(config.out_dir)
        self._inbox = Inbox(config.inbox_max_messages, config.inbox_max_bytes)
        # One reassembler keyed by sender: bounded per device and in total, expired on a timer in _pump.
        self._reassembler = wire.Reassembler(config.chunk_timeout_s, config.max_pending_chunk_bytes,
                                             config.max_pending_chunk_bytes_per_device)
        self._next_expiry_mono = 0.0
        self._silent: set[str] = set()  # missed a deadline while "live": not selected until heard from
        self._early: list[tuple[str, wire.Update, int]] = []  # updates for the round about to open
        # Rejections while no round is open (a flood between rounds) are counted in the next round's record.
        self._idle_tally = RoundTally()
        self._norms = NormHistory(config.norm_clip_factor, config.norm_clip_window, config.norm_clip_min_history)
        self._stop = threading.Event()
        self.downlink = Downlink(config.resync_every, config.downlink_codec, runtime.manifest.shapes)
        self.uplink_codec = CodecSpec.parse(config.uplink_codec)  # checked by the config: known, valid
        self._settled = False
        self.device_metrics = DeviceMetricsCollector()
        self.publisher = OutagePublisher(transport, config.broker_outage_s, self._sleep_unless_stopped, _log)
        self.journal = UpdateJournal(config.out_dir)
        if config.resume:
            self._restore()
        else:
            self.journal.clear()  # a fresh run: an earlier run's accepted updates are not this run's

    # -- resume ----------------------------------------------------------------------------
    def _restore(self) -> None:
        ckpt = load_latest(self.config.out_dir)
        if ckpt is None:
            _log.info("no checkpoint in %s; starting from round 1", self.config.out_dir)
            self.metrics.truncate_after(0)
            return
        self.journal.forget_through(ckpt.round_completed)  # a kill between checkpoint and journal cleanup
        self.params = ckpt.params.copy()
        self.model_version = ckpt.model_version
        self.next_round = ckpt.round_completed + 1
        self.rng = rng_from_state(ckpt.rng_state)
        self.strategy.load_state_dict(ckpt.strategy_state, ckpt.strategy_meta)
        dropped = self.metrics.truncate_after(ckpt.round_completed)
        logged = self.metrics.read()
        if (not logged or logged[-1].round_id < ckpt.round_completed) and "record" in ckpt.extra:
            self.metrics.append(RoundRecord.from_json_dict(ckpt.extra["record"]))  # killed before its line
        _log.info("resumed after round %d (model version %d); %d metric line(s) after it dropped",
                  ckpt.round_completed, ckpt.model_version, dropped)

    # -- network → queue --------------------------------------------------------------------
    def _enqueue(self, topic: str, payload: bytes) -> None:  # network thread: only queue
        self._inbox.put(topic, payload)  # full: dropped and counted (never acked, so a device re-sends)

    def start(self) -> None:
        fleet = self.config.fleet
        self.run_id = load_or_create_run_id(self.config.out_dir, self.config.resume)
        _log.info("run %s", self.run_id)
        if not self.config.resume:
            # Drop what the broker kept for our client id from an earlier run (updates for its rounds).
            self.transport.discard_session()
        warm_up_decoder(self.config.uplink_codec)  # before any round: a kernel compile is not round 1's time
        for topic_filter in (topics.update_filter(fleet), topics.status_filter(fleet), topics.metrics_filter(fleet)):
            self.transport.subscribe(topic_filter, self._enqueue)
        self.transport.connect()

    def _pump(self, until: Callable[[], bool], deadline_mono: float, tally: RoundTally | None,
              ctx: ValidationContext | None) -> None:
        """Handle incoming messages until ``until()`` holds or the monotonic deadline passes."""
        next_report = time.monotonic() + WAIT_REPORT_EVERY_S
        while not until():
            if time.monotonic() >= next_report:  # a silent wait looks like a hang: say who is missing
                self._report_waiting(ctx)
                next_report += WAIT_REPORT_EVERY_S
            if self._stop.is_set():
                raise RunStopped(f"stopped during round {self.next_round}; --resume continues from the last "
                                 "completed round")
            left = deadline_mono - time.monotonic()
            if left <= 0:
                return
            self._expire_chunks(tally)
            item = self._inbox.get(min(left, 0.2))
            if item is not None:
                self._handle(*item, tally, ctx)

    def _expire_chunks(self, tally: RoundTally | None) -> None:
        """Drop chunked messages that stopped arriving (``Reassembler.expire``), at most once a second."""
        now = time.monotonic()
        if now < self._next_expiry_mono:
            return
        self._next_expiry_mono = now + 1.0
        for error in self._reassembler.expire(now):
            self._count_rejection(tally, REJECT_MISSING_CHUNK, str(error))

    def _report_waiting(self, ctx: ValidationContext | None) -> None:
        live = ", ".join(sorted(self.live)) or "none"
        if ctx is None:
            _log.info("waiting for devices: %d live (%s), %d needed", len(self.live), live,
                      self.strategy.min_devices if self._settled else max(self.strategy.min_devices,
                                                                            self.config.expect_devices))
            return
        pending = ctx.pending_devices()
        _log.info("round %d: %d update(s) in; waiting for %s; offline: %s", ctx.round_id, len(ctx.reported_devices),
                  ", ".join(sorted(pending & self.live)) or "none", ", ".join(sorted(pending - self.live)) or "none")

    def _sleep_unless_stopped(self, seconds: float) -> None:
        if self._stop.wait(seconds):  # a stop request also ends a wait for the broker
            raise RunStopped(f"stopped in round {self.next_round} while waiting for the broker; --resume continues")

    def _handle(self, topic: str, payload: bytes, tally: RoundTally | None, ctx: ValidationContext | None) -> None:
        fleet = self.config.fleet
        try:
            kind, device = topics.parse_device_topic(topic, fleet)
        except EdgetrainError:
            _log.warning("message on unexpected topic %r ignored", topic)
            return
        if kind in ("status", "metrics"):  # instrumentation: on the network, but not counted in bytes_up
            (self._idle_tally if tally is None else tally).metrics_bytes_up += len(payload)
        if kind == "status":
            self._on_status(device, payload)
            return
        if kind in ("update", "metrics"):
            self._silent.discard(device)  # a device that missed a deadline is back
        if kind == "metrics":  # never fails the round
            self.device_metrics.receive(device, payload, self.next_round)
            return
        if tally is not None:
            tally.bytes_up += len(payload)
        try:
            message = self._reassembler.feed(payload, source=device)
        except UnknownCodec as exc:  # a whole frame this server cannot decode: the reason validation uses
            self._count_rejection(tally, REJECT_UNKNOWN_CODEC, f"frame on {topic}: {exc}")
            return
        except WireError as exc:
            self._count_rejection(tally, "malformed", f"frame on {topic}: {exc}")
            return
        if message is None:
            return  # a chunk; the message is not whole yet
        if not isinstance(message, wire.Update):
            self._count_rejection(tally, "malformed", f"{type(message).__name__} on update topic {topic}")
            return
        if ctx is None:
            if message.update_id in self.seen_update_ids:  # accepted before; its ack was lost: say "held"
                self._reject(device, message, UpdateRejected(REJECT_DUPLICATE, f"update {message.update_id!r} "
                                                             "already accepted"), None)
            elif message.run_id != self.run_id:  # validate_update's check, for the between-rounds path
                self._reject(device, message, UpdateRejected(REJECT_WRONG_RUN, f"update for run {message.run_id!r}, "
                                                             f"this is run {self.run_id!r}"), None)
            elif message.round_id == self.next_round and message.model_version == self.model_version:
                self._early.append((device, message, len(payload)))  # e.g. queued while we restarted
            else:  # the same reason codes as validate_update: a past round is late, a future one wrong
                reason = REJECT_LATE if message.round_id < self.next_round else REJECT_WRONG_ROUND
                self._reject(device, message, UpdateRejected(reason, f"round {message.round_id}: no round is open"),
                             None)
            return
        self._on_update(device, message, tally, ctx)

    def _on_status(self, device: str, payload: bytes) -> None:
        if not payload:
            return  # a cleared retained status
        try:
            status = wire.decode(payload)
        except WireError as exc:
            _log.warning("malformed status from %s: %s", device, exc)
            return
        if not isinstance(status, wire.Status) or status.device_id != device:
            _log.warning("status on %s's topic names %r; ignored", device, getattr(status, "device_id", None))
            return
        self.device_metrics.note_status(device, status.info)
        self.device_metrics.note_platform(device, status)
        if status.online and (device not in self.live or status.info.get("needs_resync")):
            self.downlink.request_resync()  # a (re)joining or drifted device needs the whole model
        self._silent.discard(device)
        (self.live.add if status.online else self.live.discard)(device)

    def _on_update(self, device: str, update: wire.Update, tally: RoundTally | None,
                   ctx: ValidationContext, replayed: bool = False) -> bool:
        """Validate, journal, fold in and ack one update (a ``replayed`` one is already journaled and acked)."""
        try:
            valid = validate_update(update, topic_device=device, ctx=ctx)
        except UpdateRejected as rejection:
            self._reject(device, update, rejection, tally, ack=not replayed)
            return False
        if not self.strategy.accepts_more():  # a large-batch step already has its gradients
            self._reject(device, update, UpdateRejected(REJECT_LATE, f"{device}: step {update.round_id} is full"),
                         tally, ack=not replayed)
            return False
        if not replayed:
            try:  # before the ack: an acked update must survive a SIGKILL before the round's checkpoint
                self.journal.record(ctx.round_id, update)
            except OSError as exc:  # not acked: the device keeps it in its outbox and sends it again
                self._count_rejection(tally, REJECT_NOT_DURABLE, f"{device}'s {update.update_id}: journal ({exc})")
                return False
        self.strategy.accumulate_stale(valid.accumulable(), valid.num_examples, valid.device_id, valid.staleness)
        ctx.mark_accepted(update)
        self._norms.add(valid.norm)
        ctx.clip_norm = self._norms.bound()  # adapts within the round too: round 1 is bounded after a few
        if tally is not None:
            tally.accepted_payload_bytes += len(update.payload)
            if tally.settings is not None:
                tally.examples_processed += examples_processed(tally.settings, valid.claimed_examples)
            tally.device_cpu_s += float(update.metrics.get("cpu_s", 0.0))
            tally.add_train_loss(update.metrics.get("train_loss"), valid.num_examples)
            tally.add_local_epsilon(update.metrics.get("local_epsilon"), update.metrics.get("local_dp_delta"))
            self._tally_caps(device, valid, tally)
        if not replayed:
            self._ack(device, update, True, "", tally)
        return True

    @staticmethod
    def _tally_caps(device: str, valid: ValidatedUpdate, tally: RoundTally) -> None:
        if valid.capped:
            tally.capped += 1
            tally.capped_by[valid.cap_reason] += 1
            tally.note(f"{device}: example count {valid.claimed_examples} capped to {valid.num_examples} "
                       f"({valid.cap_reason})")
        if valid.clipped:
            tally.clipped += 1
            tally.note(f"{device}: update norm {valid.claimed_norm:.4g} clipped to {valid.norm:.4g} "
                       f"({CLIP_NORM_MEDIAN})")

    def _reject(self, device: str, update: wire.Update, rejection: UpdateRejected, tally: RoundTally | None,
                ack: bool = True) -> None:
        self._count_rejection(tally, rejection.reason, str(rejection))
        # An update we already hold (QoS 1 redelivery, outbox re-send) is acknowledged as accepted, so
        # the device stops re-sending it; it is still counted once only.
        already_held = rejection.reason == REJECT_DUPLICATE and update.update_id in self.seen_update_ids
        if ack and update.device_id == device:  # never ack on behalf of a spoofed sender
            self._ack(device, update, already_held, rejection.reason, tally)

    def _count_rejection(self, tally: RoundTally | None, reason: str, detail: str) -> None:
        _log.warning("rejected (%s): %s", reason, detail)
        tally = self._idle_tally if tally is None else tally  # no round open: the next round's record
        tally.rejected[reason] += 1
        tally.note(detail)

    def _ack(self, device: str, update: wire.Update, accepted: bool, reason: str, tally: RoundTally | None) -> None:
        frame = wire.encode(wire.Ack(device_id=device, round_id=update.round_id, update_id=update.update_id,
                                     accepted=accepted, reason=reason))
        # Best effort: waiting out an outage here would stall the round. A lost ack is safe: the device keeps
        # the update in its outbox and re-sends it after its reconnect or when the round is announced again;
        # that copy is acked then, and seen_update_ids keeps it from being counted twice.
        self.publisher.ack(topics.ack_topic(self.config.fleet, device), frame, f"ack of {device}'s {update.update_id}")
        if tally is not None:
            tally.bytes_down += len(frame)

    # -- rounds ----------------------------------------------------------------------------
    def _wait_for_devices(self) -> list[str]:
        minimum = self.strategy.min_devices
        deadline = time.monotonic() + self.config.join_timeout_s
        wanted = minimum if self._settled else max(minimum, self.config.expect_devices)
        self._pump(lambda: len(self.live) >= wanted, deadline, None, None)
        if len(self.live) < wanted:
            _log.warning("%d of the %d expected devices joined within %.0f s", len(self.live), wanted,
                         self.config.join_timeout_s)
        if len(self.live) < minimum:
            raise EdgetrainError(f"only {len(self.live)} device(s) live in fleet {self.config.fleet!r} after "
                                 f"{self.config.join_timeout_s:.0f} s; {minimum} needed (are the devices running "
                                 "and pointed at the same broker and fleet?)")
        if not self._settled:  # let devices that start together all say hello before the first selection
            self._pump(lambda: False, time.monotonic() + 0.2, None, None)
            self._settled = True
        heard = self.live - self._silent  # ghosts (silent through a deadline) only when too few others
        return sorted(heard) if len(heard) >= minimum else sorted(self.live)

    def _announcement(self, plan: RoundPlan, selected: tuple[str, ...], down: DownlinkPayload) -> wire.Announcement:
        """The round's announcement, signed when this aggregator has a key. The deadline runs from now."""
        announcement = wire.Announcement(
            run_id=self.run_id, round_id=plan.round_id, model_version=self.model_version, strategy=self.strategy.name,
            task=plan.task, selected=selected, deadline_unix_s=time.time() + self.config.round_timeout_s,
            settings=plan.settings, uplink_codec=self.uplink_codec, payload_kind=down.payload_kind,
            downlink_codec=down.codec, base_version=down.base_version, payload=down.payload)
        return announcement if self.signing_key is None else wire.signing.sign(announcement, self.signing_key)

    def _announce(self, plan: RoundPlan, selected: tuple[str, ...]) -> tuple[int, float]:
        """Publish the round (retained), waiting out a broker outage: (bytes down, monotonic deadline)."""
        round_id = plan.round_id
        # The whole model or the delta from what the devices hold (sdk.model_sync); with a lossless codec
        # the server continues from exactly the parameters the devices reconstruct.
        down, self.params = self.downlink.announce(self.params, self.model_version)

        def frame() -> bytes:  # per attempt: the deadline runs from the one that got through, not from before an
            # outage. An earlier copy the outage cut off may reach the broker too: harmless, the same round, retained.
            return wire.encode(self._announcement(plan, selected, down))
        topic = topics.announce_topic(self.config.fleet)
        size, sent = self.publisher.announce(topic, frame, f"round {round_id} announcement")
        return size * len(self.live | set(selected)), sent + self.config.round_timeout_s  # all live devices download it

    def run_round(self, round_id: int, on_progress: Callable[[Progress], None] | None = None) -> RoundRecord:
        """Collect, aggregate, evaluate, record and checkpoint one round."""
        waiting = time.monotonic()
        live = self._wait_for_devices()
        # The clock starts once enough devices are online: waiting for a fleet that is still starting
        # (round 1: imports, bundles, connects) is its start-up, recorded apart as ``join_wait_s``.
        started = time.monotonic()
        open_round = self._open_round(round_id, started, live)
        open_round.join_wait_s = started - waiting
        secure_extra = {}
        if self.config.secure_aggregation is None:
            self._collect(open_round, on_progress)
        else:
            secure_extra = self._collect_secure(open_round)
        self.params, info = self.strategy.aggregate(self.params)
        self.model_version += 1
        record = self._round_record(open_round, info, *self._evaluate(round_id))
        if secure_extra:
            record = dataclasses.replace(record, extra={**record.extra, **secure_extra})
        self._commit(round_id, record)
        if on_progress:
            on_progress(Progress(round_id, self.config.rounds, record.devices_reported, record.devices_chosen, record))
        return record

    def _collect_secure(self, open_round: OpenRound) -> dict:
        """A secure round (``aggregator.secure_rounds``): the strategy gets the survivors' mean, uniformly
        weighted (one accumulate of the unmasked sum / n); the round's extra metrics come back."""
        tally = open_round.tally

        def announce(plan: RoundPlan, selected: tuple[str, ...]) -> int:
            open_round.selected = set(selected)
            return self._announce(plan, selected)[0]

        def reselect(previous: tuple[str, ...]) -> tuple[str, ...]:
            return tuple(sorted(self._choosable(self.live | set(previous))[: len(previous)]))

        outcome = run_secure_round(
            self.config.secure_aggregation, self.transport, self.config.fleet, self.run_id, open_round.plan,
            self.params.size, self.config.round_timeout_s, self.config.max_attempts, announce,
            lambda s: self._pump(lambda: False, time.monotonic() + s, tally, None), reselect)
        survivors = outcome.result.survivors
        self.strategy.accumulate(outcome.result.total / len(survivors), len(survivors), "secure-aggregate")
        open_round.attempts = outcome.attempts
        open_round.ctx.reported_devices.update(survivors)
        tally.bytes_up += outcome.bytes_up
        tally.bytes_down += outcome.bytes_down
        tally.accepted_payload_bytes += 8 * self.params.size * len(survivors)  # uint64 per masked value
        return outcome.extra()

    def _open_round(self, round_id: int, started: float, live: list[str]) -> OpenRound:
        plan = self.strategy.configure_round(round_id, live, self.rng)
        self.strategy.begin_round(self.params)
        selected = set(plan.selected)
        ctx = self._validation_context(round_id, selected)
        tally, self._idle_tally = self._idle_tally, RoundTally()  # what was rejected while no round was open
        tally.settings = plan.settings
        open_round = OpenRound(round_id, started, plan, selected, ctx, tally)
        self._replay_journal(open_round)
        return open_round

    def _validation_context(self, round_id: int, selected: set[str]) -> ValidationContext:
        """What the round's updates are checked against (``aggregator.validation``)."""
        return ValidationContext(round_id=round_id, model_version=self.model_version, selected=frozenset(selected),
                                 num_params=self.params.size, run_id=self.run_id, max_norm=self.config.max_norm,
                                 max_examples=self.config.max_examples, example_caps=self._example_caps(selected),
                                 clip_norm=self._norms.bound(), seen_update_ids=self.seen_update_ids,
                                 allowed_codecs=frozenset({self.uplink_codec.name}))  # the one the round announced

    def _example_caps(self, selected: set[str]) -> dict[str, tuple[int, str]]:
        """Each device's default example cap, from the partition sizes the fleet reported (update_caps)."""
        return example_caps(self.live | selected, self.device_metrics.partition_size, self.config.examples_cap_factor)

    def _replay_journal(self, open_round: OpenRound) -> None:
        """Fold in the updates this round accepted (and acked) before the aggregator was restarted."""
        for update in self.journal.replay(open_round.round_id):
            open_round.selected.add(update.device_id)  # it was selected when it was accepted
            open_round.ctx.selected = frozenset(open_round.selected)
            open_round.ctx.example_caps = self._example_caps(open_round.selected)
            if self._on_update(update.device_id, update, open_round.tally, open_round.ctx, replayed=True):
                open_round.tally.replayed += 1
        if open_round.tally.replayed:
            _log.info("round %d: %d update(s) accepted before the restart replayed from the journal",
                      open_round.round_id, open_round.tally.replayed)

    def _collect(self, open_round: OpenRound, on_progress: Callable[[Progress], None] | None) -> None:
        """Announce and collect until enough updates arrived; re-announce at most ``max_attempts`` times."""
        minimum = self.strategy.min_devices
        ctx = open_round.ctx
        while True:
            open_round.attempts += 1
            self._collect_attempt(open_round, on_progress)
            if len(ctx.reported_devices) >= minimum:
                return
            if open_round.attempts >= self.config.max_attempts:
                raise EdgetrainError(f"round {open_round.round_id}: {len(ctx.reported_devices)} of the {minimum} "
                                     f"updates needed after {open_round.attempts} attempt(s); giving up")
            # Retry: keep what arrived, add live devices that have not answered to the selection.
            spare = self._choosable(self.live - ctx.reported_devices)
            open_round.selected = set(ctx.reported_devices) | set(spare[: max(len(open_round.selected), minimum)])
            ctx.selected = frozenset(open_round.selected)
            ctx.example_caps = self._example_caps(open_round.selected)
            _log.warning("round %d: only %d update(s) by the deadline, %d needed; announcing again (attempt %d)",
                         open_round.round_id, len(ctx.reported_devices), minimum, open_round.attempts + 1)

    def _announce_round(self, open_round: OpenRound) -> float:
        """Announce the round to its selection, then handle the updates for it that arrived before it
        opened (e.g. queued while we restarted); the monotonic deadline."""
        bytes_down, deadline_mono = self._announce(open_round.plan, tuple(sorted(open_round.selected)))
        open_round.tally.bytes_down += bytes_down
        early, self._early = self._early, []
        for device, update, size in early:
            open_round.tally.bytes_up += size
            self._on_update(device, update, open_round.tally, open_round.ctx)
        return deadline_mono

    def _collect_attempt(self, open_round: OpenRound, on_progress: Callable[[Progress], None] | None) -> None:
        """One announcement of the round and the wait for its updates."""
        round_id, ctx, tally = open_round.round_id, open_round.ctx, open_round.tally
        minimum = self.strategy.min_devices
        deadline_mono = self._announce_round(open_round)

        def round_done() -> bool:
            if on_progress:
                on_progress(Progress(round_id, self.config.rounds, len(ctx.reported_devices),
                                     len(open_round.selected)))
            pending = ctx.pending_devices()
            if not pending or self.strategy.enough(len(ctx.reported_devices)):
                return True
            # Waiting on devices that went offline (last will) gains nothing once enough updates are in.
            # With too few, wait for the deadline: a broker restart fires every device's will, and the
            # devices come back with their updates.
            # Only with the inbox drained: an "offline" status (possibly forged, without an ACL) must not close
            # the round ahead of an update that had already arrived.
            return not (pending & self.live) and len(ctx.reported_devices) >= minimum and self._inbox.empty()

        self._pump(round_done, deadline_mono, tally, ctx)
        if time.monotonic() >= deadline_mono:
            self._drop_ghosts(ctx.pending_devices() & self.live, round_id)
        if len(self.live | ctx.reported_devices) < minimum:  # e.g. a broker restart fired every device's will
            _log.warning("round %d: %d device(s) live, %d needed; waiting up to %.0f s for them before choosing "
                         "again", round_id, len(self.live), minimum, self.config.join_timeout_s)
            self._pump(lambda: len(self.live | ctx.reported_devices) >= minimum,
                       time.monotonic() + self.config.join_timeout_s, tally, ctx)

    def _drop_ghosts(self, silent: frozenset[str], round_id: int) -> None:
        """Devices that let a whole deadline pass without answering are chosen last (a retained "online"
        status of a device that died is a ghost) until they publish or send anything again. Not removed
        from ``live``: after a broker restart every device is silent for a while and still comes back."""
        if silent:
            _log.warning("round %d: %s did not answer by the deadline; chosen last until heard from",
                         round_id, ", ".join(sorted(silent)))
            self._silent |= silent

    def _choosable(self, devices: set[str]) -> list[str]:
        """``devices`` sorted, those heard from since their last missed deadline first."""
        return sorted(devices - self._silent) + sorted(devices & self._silent)

    def _evaluate(self, round_id: int) -> tuple[float | None, float | None]:
        """(accuracy, loss) on the test set every ``eval_every`` rounds and after the last; else Nones."""
        if round_id % self.config.eval_every != 0 and round_id != self.config.rounds:
            return None, None
        self.runtime.set_parameters(self.params)
        result = self.runtime.evaluate(self.test_x, self.test_y)
        return result.accuracy, result.loss

    def _round_record(self, open_round: OpenRound, info: AggregateInfo, accuracy: float | None,
                      loss: float | None) -> RoundRecord:
        ctx, tally = open_round.ctx, open_round.tally
        return RoundRecord(
            round_id=open_round.round_id, model_version=self.model_version, accuracy=accuracy, loss=loss,
            devices_chosen=len(open_round.selected), devices_reported=len(ctx.reported_devices),
            devices_rejected=dict(tally.rejected), rejected_detail=tally.detail_lines(), bytes_up=tally.bytes_up,
            bytes_down=tally.bytes_down, round_wall_s=time.monotonic() - open_round.started_mono_s,
            retried=open_round.attempts > 1, total_examples=info.total_examples,
            devices_timed_out=len(ctx.pending_devices()), examples_processed=tally.examples_processed,
            metrics_bytes_up=tally.metrics_bytes_up,
            extra={"attempts": open_round.attempts, "join_wait_s": open_round.join_wait_s, "capped": tally.capped, "capped_by": dict(tally.capped_by),
                   "clipped": tally.clipped, "step_norm": info.step_norm, **info.rule_metrics,
                   "device_cpu_s": tally.device_cpu_s, "replayed": tally.replayed,
                   **dict(zip(("inbox_dropped", "inbox_dropped_bytes"), self._inbox.take_dropped())),
                   **({"train_loss": tally.train_loss()} if tally.train_loss() is not None else {}),
                   # dense fp32 bytes over the bytes the accepted updates' payloads really took
                   "uplink_compression": (4 * self.params.size * len(ctx.reported_devices)
                                          / max(1, tally.accepted_payload_bytes)),
                   **self.device_metrics.take(open_round.round_id, open_round.selected),
                   **privacy_extra(info.privacy), **tally.local_dp_extra()})

    def _record_initial_model(self) -> None:
        """Round 0 in ``metrics.jsonl``: the initial model's test accuracy, so the plots start there."""
        started = time.monotonic()
        self.runtime.set_parameters(self.params)
        result = self.runtime.evaluate(self.test_x, self.test_y)
        self.metrics.append(RoundRecord(
            round_id=INITIAL_ROUND, model_version=self.model_version, accuracy=result.accuracy, loss=result.loss,
            devices_chosen=0, devices_reported=0, devices_rejected={}, rejected_detail=(), bytes_up=0,
            bytes_down=0, round_wall_s=0.0, extra={"evaluation_s": time.monotonic() - started}))
        _log.info("round 0 (the initial model): test accuracy %.4f, loss %.4f", result.accuracy, result.loss)

    def _commit(self, round_id: int, record: RoundRecord) -> None:
        """Checkpoint (every ``checkpoint_every`` rounds and after the last), then the metrics line."""
        if os.environ.get(CRASH_BEFORE_CHECKPOINT_ENV) == str(round_id):
            os.kill(os.getpid(), signal.SIGKILL)
        if round_id % self.config.checkpoint_every == 0 or round_id == self.config.rounds:
            save_checkpoint(self.config.out_dir, Checkpoint(
                round_completed=round_id, model_version=self.model_version, params=self.params,
                strategy_state=self.strategy.state_dict(), strategy_meta=self.strategy.state_meta(),
                rng_state=rng_state(self.rng), extra={"record": record.to_json_dict()}))
            self.journal.forget_through(round_id)  # the checkpoint holds these rounds' updates now
        # After the checkpoint: a resumed run truncates anything beyond it, and re-appends this line from
        # the checkpoint if a kill came between the two.
        self.metrics.append(record)

    def run(self, stop: threading.Event | None = None,
            on_progress: Callable[[Progress], None] | None = None) -> list[RoundRecord]:
        """Round 0 (the initial model's evaluation, once per run), all remaining rounds; then
        ``summary.json`` and the plots. Returns every training round's record (round 0 is in
        ``metrics.jsonl`` and the plots)."""
        self._stop = stop or threading.Event()
        self.start()
        if self.next_round == 1 and not self.metrics.read():  # once: a resumed run has its round-0 line
            self._record_initial_model()
        try:
            while self.next_round <= self.config.rounds:
                self.run_round(self.next_round, on_progress)
                self.next_round += 1
            # Clear the retained announcement so a device joining later does not train a finished run.
            self.publisher.announce(topics.announce_topic(self.config.fleet), lambda: b"", "clearing the announcement")
        finally:
            self.transport.close()
        records = self.metrics.read()
        write_summary(self.config.out_dir, records, {
            "fleet": self.config.fleet, "strategy": self.strategy.name, "num_params": int(self.params.size),
            "codec": self.config.uplink_codec, "downlink_codec": self.config.downlink_codec, **self.config.labels,
            **self.device_metrics.summary(), **privacy_summary(records),
            **secure_summary(self.config.secure_aggregation)})
        if records:
            plot_run(self.config.out_dir)
        return training_rounds(records)

