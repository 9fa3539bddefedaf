"""FedBuff over a real Mosquitto with stragglers: the buffered asynchronous service completes its server
steps without waiting for the slow devices, and reaches the same number of applied updates in less wall
time than synchronous FedAvg, whose every round waits for its slowest device."""
from __future__ import annotations

from pathlib import Path
from typing import Callable

from edgetrain.sdk import topics
from tests.fleet import (AggregatorThread, FleetAssets, Sniffer, broker_config, cleanup, fleet_assets,  # noqa: F401
                         start_device_threads)
from tests.mosquitto import MosquittoBroker

DEVICES = 4
SLOW = {2: 20.0, 3: 20.0}  # device index -> slowdown: every step of theirs takes 20x longer
ROUNDS = 3  # FedAvg rounds of DEVICES updates each
BUFFER = 2  # FedBuff steps every 2 updates: 2·ROUNDS steps apply the same number of updates
RUN_S = 120.0
COMMON = ("--local-steps", "10", "--fraction", "1", "--min-devices", str(DEVICES), "--round-timeout", "60",
          "--eval-examples", "200", "--eval-every", "100", "--checkpoint-every", "100")


def _run(broker: MosquittoBroker, assets: FleetAssets, fleet: str, root: Path, cleanup: list[Callable[[], None]],
         *flags: str) -> list:
    config = broker_config(broker.url)
    sniffer = Sniffer(config, client_id=f"sniffer-{fleet}").subscribe(topics.status_filter(fleet)).connect()
    cleanup.append(sniffer.close)
    devices = start_device_threads(config, assets, fleet, root / fleet, [None] * DEVICES, prefix=fleet,
                                   slowdowns=SLOW)
    cleanup.extend(d.stop for d in devices)
    sniffer.wait_online(fleet, [d.device.config.device_id for d in devices])
    records = AggregatorThread(config, assets, fleet, root / f"{fleet}-run", *COMMON, *flags).start().join(RUN_S)
    for device in devices:  # the run is over: stop its devices before the next fleet shares the CPU
        device.stop()
    return records


def test_fedbuff_steps_past_stragglers_faster_than_fedavg(broker: MosquittoBroker, fleet_assets: FleetAssets,
                                                          tmp_path: Path, cleanup: list[Callable[[], None]]) -> None:
    sync = _run(broker, fleet_assets, "sync", tmp_path, cleanup, "--rounds", str(ROUNDS))
    buffered = _run(broker, fleet_assets, "buffered", tmp_path, cleanup, "--strategy", "fedbuff",
                    "--buffer", str(BUFFER), "--rounds", str(ROUNDS * DEVICES // BUFFER), "--max-staleness", "20")
    assert [r.devices_reported for r in sync] == [DEVICES] * ROUNDS  # every round waited for the stragglers
    assert len(buffered) == ROUNDS * DEVICES // BUFFER
    assert all(r.extra["buffer"] == BUFFER and r.devices_reported >= 1 for r in buffered)
    assert [r.model_version for r in buffered] == list(range(1, len(buffered) + 1))
    sync_s, buffered_s = sum(r.round_wall_s for r in sync), sum(r.round_wall_s for r in buffered)
    print(f"{ROUNDS * DEVICES} applied updates, 2 of {DEVICES} devices 20x slower: FedAvg {sync_s:.2f} s "
          f"({ROUNDS} rounds), FedBuff K={BUFFER} {buffered_s:.2f} s ({len(buffered)} steps); staleness max "
          f"{max(r.extra['staleness_max'] for r in buffered)}, accuracy FedAvg {sync[-1].accuracy:.3f} "
          f"FedBuff {buffered[-1].accuracy:.3f}")
    assert buffered_s < sync_s
    assert buffered[-1].accuracy is not None and buffered[-1].accuracy > 0.5  # it learned (the set is easy)
