"""Aggregation workers (aggregator.worker) and their coordinator's reduction, against a real Mosquitto.

The workers run as threads of the test (cheap) or as ``python -m edgetrain.aggregator.worker`` processes
when one must be SIGKILLed; the test plays the coordinator (its work orders) and the devices (updates).
"""
from __future__ import annotations

import dataclasses
import signal
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest

from edgetrain.aggregator.coordinator import reduce_partials
from edgetrain.aggregator.round_state import RoundTally
from edgetrain.aggregator.strategy import FedAvg
from edgetrain.aggregator.worker import build_worker, owner_of, worker_name
from edgetrain.sdk import topics, wire
from edgetrain.sdk.codecs import get_codec
from edgetrain.sdk.errors import WireError

from tests.fleet import Sniffer, _subprocess_env, broker_config, cleanup, wait_for  # noqa: F401 (fixture)

FLEET = "wk"
RUN = "run1"
NUM_PARAMS = 1000
K = 2


def _devices(count: int) -> list[str]:
    """``count`` device names, both workers owning some."""
    names = [f"dev{i}" for i in range(count)]
    assert {owner_of(d, K) for d in names} == set(range(K))
    return names


def _order(round_id: int, selected: list[str], closing: bool = False) -> wire.WorkOrder:
    return wire.WorkOrder(run_id=RUN, round_id=round_id, model_version=0, num_params=NUM_PARAMS,
                          selected=tuple(selected), committed_through=0, closing=closing)


def _update(device: str, rng: np.random.Generator) -> tuple[wire.Update, np.ndarray]:
    vector = rng.normal(0, 0.1, NUM_PARAMS).astype(np.float32)
    payload, _ = get_codec("dense").encode(vector, None, {})
    return wire.Update(device_id=device, round_id=1, model_version=0, update_id=f"{device}-u1",
                       num_examples=int(rng.integers(5, 100)), codec="dense", payload=payload, metrics={},
                       run_id=RUN), vector


class Coord:
    """The test's side: publishes orders and updates, records acks and partial sums."""

    def __init__(self, url: str) -> None:
        self.broker = broker_config(url)
        self.sniffer = Sniffer(self.broker, "coord").subscribe(topics.ack_filter(FLEET), topics.partial_filter(FLEET))
        self.sniffer.connect()
        self.transport = self.sniffer.transport

    def order(self, order: wire.WorkOrder) -> None:
        self.transport.publish(topics.work_order_topic(FLEET), wire.encode(order), retain=True)

    def send(self, update: wire.Update) -> None:
        self.transport.publish(topics.update_topic(FLEET, update.device_id), wire.encode(update))

    def acks(self, accepted: bool = True) -> list[tuple[str, wire.Ack]]:
        return [(t, a) for t, a in self.sniffer.decoded(wire.Ack) if a.accepted == accepted]

    def wait_acked(self, updates: list[wire.Update]) -> None:
        wanted = {u.update_id for u in updates}
        wait_for(lambda: wanted <= {a.update_id for _, a in self.acks()}, f"acks of {sorted(wanted)}")

    def finals(self, round_id: int) -> dict[str, wire.PartialSum]:
        out: dict[str, wire.PartialSum] = {}
        for _, partial in self.sniffer.decoded(wire.PartialSum):
            if partial.final and partial.round_id == round_id:
                out[partial.worker_id] = partial  # the newest from each worker
        return out

    def wait_finals(self, round_id: int) -> dict[str, wire.PartialSum]:
        wait_for(lambda: len(self.finals(round_id)) == K, f"final partials of round {round_id} from {K} workers")
        return self.finals(round_id)

    def wait_ready(self) -> None:
        """A closing order for round 0 each worker answers: then it is subscribed."""
        self.order(_order(0, ["nobody"], closing=True))
        self.wait_finals(0)


def _weighted_mean(updates: list[tuple[wire.Update, np.ndarray]]) -> np.ndarray:
    weights = np.array([u.num_examples for u, _ in updates], dtype=np.float64)
    return (weights[:, None] * np.stack([v.astype(np.float64) for _, v in updates])).sum(0) / weights.sum()


def _thread_workers(url: str, run_dir: Path, cleanup: list) -> list:
    workers, stop = [], threading.Event()
    for index in range(K):
        worker = build_worker(broker_config(url), FLEET, index, K, run_dir)
        thread = threading.Thread(target=worker.run, args=(stop,), daemon=True)
        thread.start()
        workers.append((worker, thread))
    cleanup.append(lambda: (stop.set(), [t.join(10) for _, t in workers]))
    return [w for w, _ in workers]


def _fedavg(finals: dict[str, wire.PartialSum]) -> tuple[np.ndarray, int]:
    reduced = reduce_partials(finals, NUM_PARAMS)
    strategy = FedAvg()
    start = np.zeros(NUM_PARAMS, np.float32)
    strategy.begin_round(start)
    strategy.merge_partial(reduced.mean, reduced.total_examples)
    params, info = strategy.aggregate(start)
    return params, info.num_updates


def test_fedavg_over_two_workers_equals_numpy_weighted_mean(broker, tmp_path, cleanup) -> None:
    _thread_workers(broker.url, tmp_path, cleanup)
    coord = Coord(broker.url)
    cleanup.append(coord.sniffer.close)
    coord.wait_ready()
    rng = np.random.default_rng(1)
    devices = _devices(8)
    coord.order(_order(1, devices))
    updates = [_update(d, rng) for d in devices]
    # devices with local DP report their epsilon (sdk.local_dp): each worker's final carries its largest
    epsilons = {d: 0.5 + i for i, d in enumerate(devices)}
    updates = [(dataclasses.replace(u, metrics={"local_epsilon": epsilons[u.device_id], "local_dp_delta": 1e-5}), v)
               for u, v in updates]
    for update, _ in updates:
        coord.send(update)
    coord.wait_acked([u for u, _ in updates])
    coord.order(_order(1, devices, closing=True))
    finals = coord.wait_finals(1)
    assert all(f.num_updates > 0 for f in finals.values())  # both workers took part
    params, count = _fedavg(finals)
    assert count == len(devices)
    np.testing.assert_allclose(params, _weighted_mean(updates), rtol=0, atol=1e-6)
    # what the accepted updates claimed: the coordinator's examples processed (coordinator._fold_in)
    assert sum(f.claimed_examples for f in finals.values()) == sum(u.num_examples for u, _ in updates)
    for final in finals.values():
        assert final.claimed_examples == sum(u.num_examples for u, _ in updates if u.device_id in final.accepted_devices)
        assert final.local_epsilon == max(epsilons[d] for d in final.accepted_devices)
        assert final.local_dp_delta == 1e-5
    tally = RoundTally()  # the coordinator folds the finals in (coordinator._fold_in)
    for final in finals.values():
        tally.add_local_epsilon(final.local_epsilon, final.local_dp_delta)
    assert tally.local_dp_extra() == {"local_epsilon": max(epsilons.values()), "local_dp_delta": 1e-5}


def test_a_redelivery_routed_to_the_other_worker_is_counted_once(broker, tmp_path, cleanup) -> None:
    workers = _thread_workers(broker.url, tmp_path, cleanup)
    coord = Coord(broker.url)
    cleanup.append(coord.sniffer.close)
    coord.wait_ready()
    rng = np.random.default_rng(2)
    devices = _devices(6)
    coord.order(_order(1, devices))
    updates = [_update(d, rng) for d in devices]
    for update, _ in updates:
        coord.send(update)
    coord.wait_acked([u for u, _ in updates])
    again, _ = updates[0]
    owner = owner_of(again.device_id, K)
    other = workers[1 - owner]
    acks_before = len(coord.acks())
    coord.send(again)  # a QoS 1 redelivery / outbox re-send: every worker receives it
    # ...and handed straight to the worker that does not own the device, as a shared subscription would
    other.handle(topics.update_topic(FLEET, again.device_id), wire.encode(again))
    wait_for(lambda: len(coord.acks()) > acks_before, "the owner's ack of the redelivery")
    coord.order(_order(1, devices, closing=True))
    finals = coord.wait_finals(1)
    assert finals[worker_name(owner)].rejected == {"duplicate": 1}  # held: acked accepted, not counted
    assert again.update_id not in finals[worker_name(1 - owner)].accepted_update_ids
    assert sum(f.num_updates for f in finals.values()) == len(devices)
    params, count = _fedavg(finals)
    assert count == len(devices)
    np.testing.assert_allclose(params, _weighted_mean(updates), rtol=0, atol=1e-6)


def test_reduce_refuses_partials_that_count_one_update_twice() -> None:
    sums = np.ones(NUM_PARAMS, "<f8").tobytes()

    def partial(worker: str) -> wire.PartialSum:
        return wire.PartialSum(run_id=RUN, round_id=1, worker_id=worker, final=True, total_weight=1.0, num_updates=1,
                               accepted_update_ids=("u1",), accepted_devices=("dev0",), rejected={}, norms=(1.0,),
                               bytes_up=0, accepted_payload_bytes=0, device_cpu_s=0.0, train_loss_sum=0.0,
                               train_loss_examples=0, payload=sums)

    assert reduce_partials({"w0": partial("w0")}, NUM_PARAMS).mean.count == 1
    assert wire.decode(wire.encode(partial("w0"))).local_epsilon is None  # no local DP: null
    with_dp = dataclasses.replace(partial("w0"), local_epsilon=2.5, local_dp_delta=1e-6)
    assert wire.decode(wire.encode(with_dp)) == with_dp
    for epsilon, delta in ((2.5, None), (-1.0, 1e-6), (float("nan"), 1e-6), (1.0, 1.0)):
        with pytest.raises(WireError, match="local_epsilon"):
            dataclasses.replace(partial("w0"), local_epsilon=epsilon, local_dp_delta=delta)
    for bad in (-1, 1.5, True):  # a worker's count of claimed examples is a count
        with pytest.raises(WireError, match="claimed_examples"):
            dataclasses.replace(partial("w0"), claimed_examples=bad)
    with pytest.raises(WireError, match="repeats update"):
        reduce_partials({"w0": partial("w0"), "w1": partial("w1")}, NUM_PARAMS)
    with pytest.raises(WireError, match="payload bytes"):
        reduce_partials({"w0": partial("w0")}, NUM_PARAMS + 1)


def _spawn_worker(url: str, index: int, run_dir: Path) -> subprocess.Popen:
    log = open(run_dir / f"worker-{index}.log", "ab")  # noqa: SIM115 (the process owns it)
    return subprocess.Popen([sys.executable, "-m", "edgetrain.aggregator.worker", "--broker", url, "--fleet", FLEET,
                             "--index", str(index), "--workers", str(K), "--out", str(run_dir)],
                            stdout=log, stderr=subprocess.STDOUT, env=_subprocess_env())


def test_a_worker_sigkilled_mid_round_loses_no_acked_update(broker, tmp_path, cleanup) -> None:
    procs = [_spawn_worker(broker.url, i, tmp_path) for i in range(K)]

    def stop_all() -> None:
        for proc in procs:
            proc.kill()
            proc.wait(10)
    cleanup.append(stop_all)
    coord = Coord(broker.url)
    cleanup.append(coord.sniffer.close)
    coord.wait_ready()
    rng = np.random.default_rng(3)
    devices = _devices(10)
    coord.order(_order(1, devices))
    updates = [_update(d, rng) for d in devices]
    first, second = updates[:5], updates[5:]
    for update, _ in first:
        coord.send(update)
    coord.wait_acked([u for u, _ in first])
    victim = owner_of(first[0][0].device_id, K)
    procs[victim].send_signal(signal.SIGKILL)  # its acked updates exist only in its journal now
    procs[victim].wait(10)
    for update, _ in second:  # while it is down: queued in its persistent session
        coord.send(update)
    procs[victim] = _spawn_worker(broker.url, victim, tmp_path)
    coord.wait_acked([u for u, _ in second])
    coord.order(_order(1, devices, closing=True))
    finals = coord.wait_finals(1)
    assert sorted(sum((list(f.accepted_update_ids) for f in finals.values()), [])) == \
        sorted(u.update_id for u, _ in updates)
    params, count = _fedavg(finals)
    assert count == len(devices)
    np.testing.assert_allclose(params, _weighted_mean(updates), rtol=0, atol=1e-6)
