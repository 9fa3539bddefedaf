"""A device asked to stop mid-round stops between two training steps, sends nothing for that round and
leaves it unanswered, so a restart trains it again while it is open (over a real Mosquitto)."""
from __future__ import annotations

import time
from pathlib import Path
from typing import Callable

from edgetrain.sdk import topics, wire
from tests.fleet import (AggregatorThread, DeviceThread, FleetAssets, Gate, Sniffer, broker_config, cleanup,  # noqa: F401
                         fleet_assets, make_device)
from tests.mosquitto import MosquittoBroker

FLEET = "stopfleet"
LONG_ROUND_STEPS = 200_000  # minutes of training at any speed: only an interruption ends it in time


def test_stop_mid_round_returns_promptly_and_leaves_the_round_unanswered(
        broker: MosquittoBroker, fleet_assets: FleetAssets, tmp_path: Path,
        cleanup: list[Callable[[], None]]) -> None:
    config = broker_config(broker.url)
    sniffer = Sniffer(config).subscribe(topics.update_filter(FLEET)).connect()
    cleanup.append(sniffer.close)
    gate = Gate()
    state = tmp_path / "dev-0"
    device = DeviceThread(make_device(config, fleet_assets, FLEET, "dev-0", state, index=0, count=1, limit=64,
                                      gate=gate)).start()
    cleanup.extend([device.stop, gate.open])
    run = AggregatorThread(config, fleet_assets, FLEET, tmp_path / "run", "--rounds", "1", "--min-devices", "1",
                           "--local-steps", str(LONG_ROUND_STEPS), "--round-timeout", "60",
                           "--eval-examples", "20").start()
    cleanup.append(run.stop)
    gate.wait_arrived(1)  # round 1 is announced and dev-0 is about to train it
    gate.open()
    time.sleep(0.5)  # let it get well into the round's steps
    started = time.monotonic()
    device.stop()
    assert time.monotonic() - started < 5.0
    assert sniffer.decoded(wire.Update) == []  # nothing was sent for the interrupted round
    assert device.device.rounds_trained == 0 and device.device.outbox.pending() == []

    # Not marked answered: a device restarted on this state directory trains the round again if it is open.
    assert device.device.state.last_done() == (-1, -1)
