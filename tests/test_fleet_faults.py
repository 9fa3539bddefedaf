"""Faults in a running fleet over a real Mosquitto: a device SIGKILLed mid-round, the broker
stopped or killed while updates are in flight, the aggregator SIGKILLed and resumed. In each the
run finishes and ``metrics.jsonl`` accounts for every update exactly once."""
from __future__ import annotations

import signal
from pathlib import Path
from typing import Callable

import pytest

from aggregator.checkpoint import list_checkpoints, load_latest
from sdk import topics, wire
from tests.fleet import (AggregatorThread, FleetAssets, Gate, Sniffer, broker_config, cleanup,  # noqa: F401
                         fleet_assets, metrics, spawn_cli, spawn_device, start_device_threads, wait_for)
from tests.mosquitto import MosquittoBroker

FLEET = "faults"


def _announced(sniffer: Sniffer, round_id: int) -> None:
    sniffer.wait_for_message(wire.Announcement, lambda t, m: m.round_id == round_id, f"round {round_id} announced")


def test_device_sigkilled_mid_round(broker: MosquittoBroker, fleet_assets: FleetAssets, tmp_path: Path,
                                    cleanup: list[Callable[[], None]]) -> None:
    config = broker_config(broker.url)
    sniffer = Sniffer(config).subscribe(topics.status_filter(FLEET), topics.announce_topic(FLEET)).connect()
    cleanup.append(sniffer.close)
    survivors = start_device_threads(config, fleet_assets, FLEET, tmp_path / "devices", [100, 100])
    cleanup.extend(d.stop for d in survivors)
    victim = spawn_device(broker.url, fleet_assets, FLEET, "victim", tmp_path / "devices", index=2, count=3, limit=100)
    cleanup.append(victim.kill)
    sniffer.wait_online(FLEET, ["dev-0", "dev-1", "victim"])
    victim.signal(signal.SIGSTOP)  # frozen: it cannot answer, but its connection stays up

    timeout_s = 15.0
    run = AggregatorThread(config, fleet_assets, FLEET, tmp_path / "run", "--rounds", "2", "--min-devices", "2",
                           "--round-timeout", str(timeout_s), "--eval-examples", "100").start()
    cleanup.append(run.stop)
    _announced(sniffer, 1)
    victim.signal(signal.SIGKILL)  # mid-round: chosen, announced, never answers
    records = run.join(2 * timeout_s + 10)

    first, second = records
    assert (first.devices_chosen, first.devices_reported, first.devices_timed_out) == (3, 2, 1)
    assert first.total_examples == 200 and not first.retried
    # The broker's last will told the aggregator, so the round closed well before its deadline.
    assert first.round_wall_s < timeout_s
    assert (second.devices_chosen, second.devices_reported) == (2, 2)
    assert metrics(tmp_path / "run") == records
    will = sniffer.latest_status(FLEET, "victim")
    assert will is not None and not will.online and will.info == {"reason": "connection lost"}


@pytest.mark.parametrize("outage", ["stop", "kill"])
def test_broker_restart_while_updates_in_flight(outage: str, broker: MosquittoBroker, fleet_assets: FleetAssets,
                                                tmp_path: Path, cleanup: list[Callable[[], None]]) -> None:
    config = broker_config(broker.url)
    gate = Gate(rounds=frozenset({1}))
    limits = [50, 80, 110]
    devices = start_device_threads(config, fleet_assets, FLEET, tmp_path / "devices", limits, gate=gate)
    cleanup.extend([*(d.stop for d in devices), gate.open])
    sniffer = Sniffer(config).subscribe(topics.status_filter(FLEET)).connect()
    cleanup.append(sniffer.close)
    sniffer.wait_online(FLEET, ["dev-0", "dev-1", "dev-2"])
    sniffer.close()
    # Short deadline: after a SIGKILL the broker forgets every session, an update re-sent before the
    # aggregator re-subscribed is dropped, and only the round's re-announcement brings it back.
    run = AggregatorThread(config, fleet_assets, FLEET, tmp_path / "run", "--rounds", "2", "--min-devices", "3",
                           "--round-timeout", "6", "--eval-examples", "100").start()
    cleanup.append(run.stop)
    gate.wait_arrived(3)  # round 1 is open and every device is about to train

    (broker.stop if outage == "stop" else broker.kill)()
    gate.open()  # the updates go out while the broker is down: paho queues them, the outbox keeps them
    wait_for(lambda: all(d.device.rounds_trained == 1 for d in devices), "all devices to finish round 1")
    broker.start()
    records = run.join(40)

    first, second = records
    # Every device counted once: re-sends after the reconnect are acked but never counted twice.
    assert (first.devices_chosen, first.devices_reported) == (3, 3)
    assert first.total_examples == sum(limits)
    assert set(first.devices_rejected) <= {"duplicate"}
    if outage == "stop":  # the broker saved every session: nothing had to be asked for again
        assert not first.retried
    assert (second.devices_reported, second.total_examples) == (3, sum(limits))
    for d in devices:  # every update was acknowledged, so nothing is left to re-send
        wait_for(lambda d=d: not d.device.outbox.pending(), f"{d.device.config.device_id}'s outbox to empty")


def test_aggregator_sigkilled_and_resumed(broker: MosquittoBroker, fleet_assets: FleetAssets, tmp_path: Path,
                                          cleanup: list[Callable[[], None]]) -> None:
    config = broker_config(broker.url)
    gate = Gate(rounds=frozenset({2}))
    devices = start_device_threads(config, fleet_assets, FLEET, tmp_path / "devices", [60, 60, 60], gate=gate)
    cleanup.extend([*(d.stop for d in devices), gate.open])
    out = tmp_path / "run"
    argv = ["aggregate", "--broker", broker.url, "--fleet", FLEET, "--bundle", fleet_assets.bundle, "--out", out,
            "--data-dir", fleet_assets.data_dir, "--rounds", "4", "--min-devices", "3", "--round-timeout", "15",
            "--eval-examples", "100", "--threads", "1"]
    first = spawn_cli(argv, tmp_path / "aggregate-1.log")
    cleanup.append(first.kill)
    gate.wait_arrived(3)  # round 2 is announced; its updates are held back
    first.kill()  # SIGKILL mid-round 2
    assert [r.round_id for r in metrics(out)] == [1]
    gate.open()  # the round-2 updates reach the broker while no aggregator runs: queued in its session

    second = spawn_cli([*argv, "--resume"], tmp_path / "aggregate-2.log")
    cleanup.append(second.kill)
    assert second.wait(60) == 0, second.log()[-3000:]

    records = metrics(out)
    assert [r.round_id for r in records] == [1, 2, 3, 4]  # each round once, none aggregated twice
    assert [r.model_version for r in records] == [1, 2, 3, 4]
    assert records[1].devices_reported == 3 and records[1].total_examples == 180  # the queued updates counted
    assert [n for n, _ in list_checkpoints(out)] == [2, 3, 4]  # consecutive (the newest three are kept)
    latest = load_latest(out)
    assert latest is not None and latest.round_completed == 4
    assert "resumed after round 1" in second.log()


def test_resume_restores_a_round_checkpointed_but_not_logged(broker: MosquittoBroker, fleet_assets: FleetAssets,
                                                             tmp_path: Path,
                                                             cleanup: list[Callable[[], None]]) -> None:
    """A SIGKILL between the checkpoint and the metrics line must not lose that round's line."""
    config = broker_config(broker.url)
    devices = start_device_threads(config, fleet_assets, FLEET, tmp_path / "devices", [40, 40])
    cleanup.extend(d.stop for d in devices)
    out = tmp_path / "run"
    flags = ("--min-devices", "2", "--round-timeout", "15", "--eval-examples", "50")
    before = AggregatorThread(config, fleet_assets, FLEET, out, "--rounds", "2", *flags).start().join()
    lines = (out / "metrics.jsonl").read_text().splitlines(keepends=True)
    (out / "metrics.jsonl").write_text("".join(lines[:-1]))  # as if killed right after round 2's checkpoint

    after = AggregatorThread(config, fleet_assets, FLEET, out, "--rounds", "3", *flags, resume=True).start().join()
    assert [r.round_id for r in after] == [1, 2, 3]
    assert after[:2] == before


def test_device_sigterm_exits_0_promptly_and_says_offline(broker: MosquittoBroker, fleet_assets: FleetAssets,
                                                          tmp_path: Path,
                                                          cleanup: list[Callable[[], None]]) -> None:
    sniffer = Sniffer(broker_config(broker.url)).subscribe(topics.status_filter(FLEET)).connect()
    cleanup.append(sniffer.close)
    device = spawn_device(broker.url, fleet_assets, FLEET, "dev-t", tmp_path, index=0, count=1, limit=50)
    cleanup.append(device.kill)
    sniffer.wait_online(FLEET, ["dev-t"])
    device.signal(signal.SIGTERM)
    assert device.wait(5) == 0, device.log()
    sniffer.wait_online(FLEET, ["dev-t"], online=False)
    status = sniffer.latest_status(FLEET, "dev-t")
    assert status is not None and status.info["num_examples"] == 50  # its own goodbye, not the broker's will
    assert "stopped after training 0 round(s)" in device.log() and "Traceback" not in device.log()
