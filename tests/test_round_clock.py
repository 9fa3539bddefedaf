"""Round 1's clock (issue 14, "round 1 <= 1.5x a steady round"): the wait for the fleet to come online is the
fleet's start-up, recorded apart as ``join_wait_s``, not part of round 1's ``round_wall_s``."""
from __future__ import annotations

import time
from pathlib import Path

import numpy as np

from edgetrain.sdk.transport.memory import MemoryBroker
from tests.fleet import FleetAssets, fleet_assets  # noqa: F401 (fixture)
from tests.test_default_caps import _aggregator, _announcement, _join, _run, _send, HONEST, LIAR, PARTITION

LATE_JOIN_S = 2.0


def test_round_1_starts_its_clock_once_the_devices_are_online(fleet_assets: FleetAssets,  # noqa: F811
                                                              tmp_path: Path) -> None:
    broker = MemoryBroker()
    thread, records = _run(_aggregator(fleet_assets, broker, tmp_path / "run", rounds=1))
    time.sleep(LATE_JOIN_S)  # the devices are still starting (imports, bundle, data)
    devices = [_join(broker, device, PARTITION) for device in (*HONEST, LIAR)]
    a = _announcement(broker, 1)
    for transport in devices:
        _send(transport, a, np.zeros_like(fleet_assets.initial_params), PARTITION)
    thread.join(30)
    assert not thread.is_alive() and len(records) == 1
    assert records[0].extra["join_wait_s"] >= LATE_JOIN_S
    assert records[0].round_wall_s < LATE_JOIN_S
