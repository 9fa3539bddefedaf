"""The coordinator of K aggregation workers (``aggregator.worker``): the ``Aggregator`` minus the update path.

It selects, announces, tracks which devices reported (from the workers' progress reports), and at the end
of the collection publishes a closing ``WorkOrder``; it then waits for one final ``PartialSum`` per worker,
reduces them (``reduce_partials``: Σ of the Σw·Δ and Σw, associative as ``WeightedMean.merge``), steps the
strategy (``FedAvg.merge_partial``), evaluates, checkpoints and announces as before. Exactly-once: workers
own devices by hash (see ``aggregator.worker``), so the accepted ids of two partials are disjoint by
construction; ``reduce_partials`` checks it and refuses a round whose partials overlap rather than count an
update twice. ``WorkerPool`` runs the K worker processes and restarts one that dies (its journal replays).
"""
from __future__ import annotations

import logging
import os
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Mapping

import numpy as np

from edgetrain.sdk import topics, wire
from edgetrain.sdk.broker_config import BrokerConfig
from edgetrain.sdk.cli_args import PASSWORD_ENV
from edgetrain.sdk.errors import ConfigError, EdgetrainError, WireError

from .aggregation import WeightedMean
from .round_state import OpenRound, Progress, examples_processed
from .service import Aggregator, RunStopped, load_or_create_run_id
from .worker import WORKERS_DIR, worker_name

_log = logging.getLogger(__name__)
SINGLE_THREAD_BLAS_ENV = {"OPENBLAS_NUM_THREADS": "1", "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


@dataclass(frozen=True)
class ReducedRound:
    """The sum of the workers' final partials of one round."""

    mean: WeightedMean
    total_examples: int
    update_ids: frozenset[str]
    devices: frozenset[str]


def reduce_partials(partials: Mapping[str, wire.PartialSum], num_params: int) -> ReducedRound:
    """Add up final partials (one per worker); WireError when one is malformed for this round or two
    claim the same update (that would count it twice)."""
    mean = WeightedMean(num_params)
    ids: set[str] = set()
    devices: set[str] = set()
    for name, partial in sorted(partials.items()):
        if not partial.final:
            raise WireError(f"partial of {name} is a progress report, not final sums")
        if partial.num_updates == 0:
            continue
        if len(partial.payload) != 8 * num_params:
            raise WireError(f"partial of {name}: {len(partial.payload)} payload bytes, expected {8 * num_params}")
        overlap = ids.intersection(partial.accepted_update_ids)
        if overlap:
            raise WireError(f"partial of {name} repeats update(s) another worker counted: {sorted(overlap)[:5]}")
        sums = np.frombuffer(partial.payload, dtype="<f8")
        if not np.isfinite(sums).all():
            raise WireError(f"partial of {name} holds non-finite sums")
        mean.merge(WeightedMean.from_partial_sums(sums, partial.total_weight, partial.num_updates))
        ids.update(partial.accepted_update_ids)
        devices.update(partial.accepted_devices)
    return ReducedRound(mean, int(round(mean.total_weight)), frozenset(ids), frozenset(devices))


class Coordinator(Aggregator):
    """``Aggregator`` whose updates go to ``num_workers`` aggregation workers (module docstring)."""

    def __init__(self, *args: object, num_workers: int, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        if num_workers < 1:
            raise ConfigError(f"--workers must be >= 1, got {num_workers}")
        if not hasattr(self.strategy, "merge_partial"):
            raise ConfigError(f"--workers needs a strategy that merges partial sums (the FedAvg family); "
                              f"{self.strategy.name!r} does not")
        self.num_workers = num_workers
        self._finals: dict[str, wire.PartialSum] = {}
        self._committed_through = self.next_round - 1  # a resumed run's checkpoint covers these rounds

    def start(self) -> None:
        """As ``Aggregator.start``, but subscribed to the workers' partials instead of the devices' updates."""
        fleet = self.config.fleet
        self.run_id = load_or_create_run_id(self.config.out_dir, self.config.resume)
        _log.info("run %s with %d aggregation workers", self.run_id, self.num_workers)
        if not self.config.resume:
            self.transport.discard_session()
        for topic_filter in (topics.status_filter(fleet), topics.metrics_filter(fleet), topics.partial_filter(fleet)):
            self.transport.subscribe(topic_filter, self._enqueue)
        self.transport.connect()

    def _handle(self, topic: str, payload: bytes, tally, ctx) -> None:
        if topic.startswith(topics.partial_filter(self.config.fleet)[:-1]):
            self._on_partial(payload, ctx)
            return
        try:
            kind, _ = topics.parse_device_topic(topic, self.config.fleet)
        except EdgetrainError:
            kind = ""
        if kind != "update":  # updates are the workers' to validate, ack and count
            super()._handle(topic, payload, tally, ctx)

    def _on_partial(self, payload: bytes, ctx) -> None:
        try:
            partial = wire.decode(payload)
        except WireError as exc:
            _log.warning("malformed partial sum ignored: %s", exc)
            return
        if not isinstance(partial, wire.PartialSum) or partial.run_id != self.run_id or ctx is None \
                or partial.round_id != ctx.round_id:
            return  # another run's, or a round already reduced
        ctx.reported_devices.update(partial.accepted_devices)
        ctx.seen_update_ids.update(partial.accepted_update_ids)
        self._silent.difference_update(partial.accepted_devices)
        if partial.final:
            self._finals[partial.worker_id] = partial

    # -- the round --------------------------------------------------------------------------
    def _work_order(self, open_round: OpenRound, closing: bool) -> wire.WorkOrder:
        ctx = open_round.ctx
        return wire.WorkOrder(
            run_id=self.run_id, round_id=open_round.round_id, model_version=self.model_version,
            num_params=int(self.params.size), selected=tuple(sorted(open_round.selected)),
            committed_through=self._committed_through, closing=closing, max_norm=ctx.max_norm,
            max_examples=ctx.max_examples, clip_norm=ctx.clip_norm,
            example_caps={device: cap for device, (cap, _) in ctx.example_caps.items()})

    def _publish_order(self, open_round: OpenRound, closing: bool) -> None:
        frame = wire.encode(self._work_order(open_round, closing))
        self.publisher.announce(topics.work_order_topic(self.config.fleet), lambda: frame,
                                f"round {open_round.round_id} work order")

    def _collect_attempt(self, open_round: OpenRound, on_progress: Callable[[Progress], None] | None) -> None:
        self._publish_order(open_round, closing=False)  # before the announcement: workers know the round first
        super()._collect_attempt(open_round, on_progress)

    def _collect(self, open_round: OpenRound, on_progress: Callable[[Progress], None] | None) -> None:
        self._finals = {}
        super()._collect(open_round, on_progress)
        self._publish_order(open_round, closing=True)
        wanted = {worker_name(i) for i in range(self.num_workers)}
        self._pump(lambda: wanted <= set(self._finals), time.monotonic() + self.config.round_timeout_s,
                   open_round.tally, open_round.ctx)
        missing = sorted(wanted - set(self._finals))
        if missing:
            raise EdgetrainError(f"round {open_round.round_id}: no final partial from worker(s) {', '.join(missing)} "
                                 f"within {self.config.round_timeout_s:.0f} s; --resume continues from the last "
                                 "checkpoint")
        self._fold_in(open_round, reduce_partials(self._finals, int(self.params.size)))

    def _fold_in(self, open_round: OpenRound, reduced: ReducedRound) -> None:
        """The reduced sums into the strategy; the workers' counts into the round's tally and norm history."""
        self.strategy.merge_partial(reduced.mean, reduced.total_examples)  # type: ignore[attr-defined]
        ctx, tally = open_round.ctx, open_round.tally
        ctx.reported_devices.clear()
        ctx.reported_devices.update(reduced.devices)  # the finals are what counts, not the progress reports
        for partial in self._finals.values():
            for reason, count in partial.rejected.items():
                tally.rejected[reason] += count
            tally.bytes_up += partial.bytes_up
            tally.accepted_payload_bytes += partial.accepted_payload_bytes
            tally.device_cpu_s += partial.device_cpu_s
            tally.train_loss_sum += partial.train_loss_sum
            tally.train_loss_examples += partial.train_loss_examples
            if tally.settings is not None:
                tally.examples_processed += examples_processed(tally.settings, partial.claimed_examples,
                                                               partial.num_updates)
            tally.add_local_epsilon(partial.local_epsilon, partial.local_dp_delta)
            for norm in partial.norms:
                self._norms.add(norm)
        _log.info("round %d: %d update(s) from %d worker(s) reduced", open_round.round_id, reduced.mean.count,
                  len(self._finals))

    def _commit(self, round_id: int, record) -> None:
        super()._commit(round_id, record)
        if round_id % self.config.checkpoint_every == 0 or round_id == self.config.rounds:
            self._committed_through = round_id
        if round_id == self.config.rounds:  # the run is over: workers must not act on a stale order
            self.publisher.announce(topics.work_order_topic(self.config.fleet), lambda: b"", "clearing the work order")


class WorkerPool:
    """K ``python -m edgetrain.aggregator.worker`` processes; one that dies is started again (same index)."""

    def __init__(self, broker: BrokerConfig, fleet: str, num_workers: int, run_dir: Path) -> None:
        if num_workers < 1:
            raise ConfigError(f"--workers must be >= 1, got {num_workers}")
        self.broker, self.fleet, self.num_workers = broker, fleet, num_workers
        self.run_dir = Path(run_dir)
        self.procs: list[subprocess.Popen] = []
        self.restarts = 0
        self._stop = threading.Event()
        self._lock = threading.Lock()

    def command(self, index: int) -> list[str]:
        cmd = [sys.executable, "-m", "edgetrain.aggregator.worker", "--broker", self.broker.url, "--fleet", self.fleet,
               "--index", str(index), "--workers", str(self.num_workers), "--out", str(self.run_dir)]
        if self.broker.username:
            cmd += ["--username", self.broker.username]
        for flag, path in (("--ca-file", self.broker.ca_file), ("--cert-file", self.broker.cert_file),
                           ("--key-file", self.broker.key_file)):
            if path:
                cmd += [flag, str(path)]
        return cmd

    def _spawn(self, index: int) -> subprocess.Popen:
        # One BLAS thread per worker: the K processes are the parallelism. A multi-threaded BLAS in each made
        # the norm's np.dot of a 25k-vector take 1.6-16 ms instead of 3 us on a busy 2-core machine.
        env = {**os.environ, **SINGLE_THREAD_BLAS_ENV}
        if self.broker.password:  # by environment, never on a command line others can read
            env[PASSWORD_ENV] = self.broker.password
        log_dir = self.run_dir / WORKERS_DIR
        log_dir.mkdir(parents=True, exist_ok=True)
        with open(log_dir / f"worker-{index}.log", "ab") as log:
            return subprocess.Popen(self.command(index), stdout=log, stderr=subprocess.STDOUT, env=env)

    def start(self) -> "WorkerPool":
        self.procs = [self._spawn(i) for i in range(self.num_workers)]
        threading.Thread(target=self._watch, name="worker-pool", daemon=True).start()
        return self

    def _watch(self) -> None:
        while not self._stop.wait(0.2):
            with self._lock:
                for index, proc in enumerate(self.procs):
                    if proc.poll() is not None and not self._stop.is_set():
                        _log.warning("aggregation worker %d exited with %s; starting it again", index, proc.returncode)
                        self.restarts += 1
                        self.procs[index] = self._spawn(index)

    def stop(self) -> None:
        self._stop.set()
        with self._lock:
            for proc in self.procs:
                if proc.poll() is None:
                    proc.terminate()
            for proc in self.procs:
                try:
                    proc.wait(10)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()


__all__ = ["Coordinator", "ReducedRound", "RunStopped", "WorkerPool", "reduce_partials"]
