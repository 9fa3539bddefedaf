"""Faults in a running fleet over a real Mosquitto: a device SIGKILLed mid-round, the broker
stopped or killed while updates are in flight, the broker down for longer than a publish may wait
(ridden out, or given up on after the configured bound), the aggregator SIGKILLed and resumed. In
each the run finishes (or fails naming why) and ``metrics.jsonl`` accounts for every update exactly once."""
from __future__ import annotations

import logging
import re
import signal
import time
from pathlib import Path
from typing import Callable

import pytest

from edgetrain.aggregator import publish_retry
from edgetrain.aggregator.checkpoint import list_checkpoints, load_latest
from edgetrain.sdk import topics, wire
from edgetrain.sdk.errors import BrokerUnavailable
from edgetrain.sdk.transport import MqttTransport
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


def _records(caplog: pytest.LogCaptureFixture, text: str) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.name.startswith("edgetrain.aggregator") and text in r.getMessage()]


@pytest.mark.parametrize("outage", ["stop", "kill"])
def test_aggregator_rides_out_a_broker_outage_longer_than_its_publish_timeouts(
        outage: str, broker: MosquittoBroker, fleet_assets: FleetAssets, tmp_path: Path,
        cleanup: list[Callable[[], None]], monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    # Short publish timeouts (30 s and 10 s in production) keep the test short; the outage outlasts both.
    monkeypatch.setattr(publish_retry, "ANNOUNCE_TIMEOUT_S", 1.0)
    monkeypatch.setattr(publish_retry, "ACK_TIMEOUT_S", 0.5)
    caplog.set_level(logging.INFO, logger="edgetrain.aggregator")
    config = broker_config(broker.url)
    gate = Gate(rounds=frozenset({1}))
    limits = [50, 80, 110]
    devices = start_device_threads(config, fleet_assets, FLEET, tmp_path / "devices", limits, gate=gate)
    cleanup.extend([*(d.stop for d in devices), gate.open])
    sniffer = Sniffer(config).subscribe(topics.status_filter(FLEET), topics.announce_topic(FLEET)).connect()
    cleanup.append(sniffer.close)
    sniffer.wait_online(FLEET, ["dev-0", "dev-1", "dev-2"])
    round_timeout_s = 5.0
    run = AggregatorThread(config, fleet_assets, FLEET, tmp_path / "run", "--rounds", "2", "--min-devices", "3",
                           "--round-timeout", str(round_timeout_s), "--broker-outage", "60",
                           "--eval-examples", "100").start()
    cleanup.append(run.stop)
    gate.wait_arrived(3)  # round 1 is announced and open

    (broker.stop if outage == "stop" else broker.kill)()
    aggregator = run.aggregator
    wait_for(lambda: not aggregator.transport.is_connected, "the aggregator to lose the broker")
    # An update handled while the broker is down (as if it arrived just before): its ack cannot be
    # confirmed, which must not end the run.
    stray = wire.Update(device_id="dev-0", round_id=1, model_version=99, update_id="stray", num_examples=1,
                        codec="dense", payload=b"", metrics={}, run_id=aggregator.run_id)
    aggregator._enqueue(topics.update_topic(FLEET, "dev-0"), wire.encode(stray))
    wait_for(lambda: _records(caplog, "ack of dev-0's stray not acknowledged"), "the unconfirmed ack's warning")
    gate.open()  # the devices' updates go out while the broker is down: paho queues them, the outbox keeps them
    wait_for(lambda: all(d.device.rounds_trained == 1 for d in devices), "all devices to finish round 1")
    # Round 1's deadline passes in the outage. A killed broker fired no will, so the re-announcement waits
    # for the broker; a stopped one fired every device's will on its way out (Mosquitto 2.0), so the
    # aggregator first waits for devices to come back.
    announce_waits = "round 1 announcement waits for it"
    waiting = [announce_waits] if outage == "kill" else [announce_waits, "device(s) live, 3 needed; waiting"]
    wait_for(lambda: any(_records(caplog, w) for w in waiting), f"the aggregator to log one of {waiting}")
    waiting_since = min(r.created for w in waiting for r in _records(caplog, w))
    wait_for(lambda: time.time() - waiting_since > 3 * publish_retry.ANNOUNCE_TIMEOUT_S,
             "the outage to outlast the announcement's publish timeout")
    assert run.thread.is_alive()  # still waiting, not dead of a PublishTimeout
    restarted_at = time.time()
    broker.start()  # the same port
    records = run.join(40)

    assert [r.round_id for r in records] == [1, 2] and metrics(tmp_path / "run") == records
    first, second = records
    assert (first.devices_chosen, first.devices_reported, first.total_examples) == (3, 3, sum(limits))
    # After a kill the round is announced again once the broker is back. After a stop the updates may
    # all come back with the devices, before anything is announced again.
    assert first.extra["attempts"] in ((2,) if outage == "kill" else (1, 2))
    assert first.devices_rejected.get("wrong_model_version") == 1  # the stray, counted once
    assert set(first.devices_rejected) <= {"wrong_model_version", "duplicate"}
    assert (second.devices_reported, second.total_examples) == (3, sum(limits)) and not second.retried
    if first.retried:  # the delayed announcement's deadline runs from when it went out, after the restart
        round_1 = [m for _, m in sniffer.decoded(wire.Announcement) if m.round_id == 1]
        assert max(m.deadline_unix_s for m in round_1) >= restarted_at + round_timeout_s
    if outage == "kill":
        wait = _records(caplog, announce_waits)[0]
        assert wait.levelno == logging.WARNING and broker.url in wait.getMessage()
        assert _records(caplog, "round 1 announcement published to broker")
    for d in devices:  # every real update was acknowledged in the end
        wait_for(lambda d=d: not d.device.outbox.pending(), f"{d.device.config.device_id}'s outbox to empty")


def test_aggregator_gives_up_on_a_broker_that_stays_down(broker: MosquittoBroker, fleet_assets: FleetAssets,
                                                          tmp_path: Path, cleanup: list[Callable[[], None]]) -> None:
    config = broker_config(broker.url)
    # A device that says it is online and never trains: enough for the aggregator to announce a round.
    ghost = MqttTransport(config, "ghost", clean_start=True)
    ghost.connect()
    cleanup.append(ghost.close)
    ghost.publish(topics.status_topic(FLEET, "ghost"), wire.encode(wire.Status("ghost", True, {})), retain=True)
    sniffer = Sniffer(config).subscribe(topics.announce_topic(FLEET)).connect()
    cleanup.append(sniffer.close)
    outage_s = 1.5
    run = AggregatorThread(config, fleet_assets, FLEET, tmp_path / "run", "--rounds", "2", "--min-devices", "1",
                           "--round-timeout", "1", "--broker-outage", str(outage_s), "--eval-examples", "50").start()
    cleanup.append(run.stop)
    _announced(sniffer, 1)
    broker.kill()  # for good: round 1's re-announcement finds no broker

    with pytest.raises(BrokerUnavailable) as info:
        run.join(20)
    message = str(info.value)
    waited = re.search(r"after waiting ([0-9.]+) s", message)
    assert broker.url in message and "round 1 announcement" in message and waited is not None
    assert outage_s <= float(waited.group(1)) < outage_s + 1.0
    assert metrics(tmp_path / "run") == []


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
