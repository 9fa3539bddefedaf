"""A device in a continuous (FedBuff) round: it trains again from the newest model it holds as soon as the
aggregator acknowledged its last update, one unacknowledged update at a time, and never before."""
from __future__ import annotations

import time
from pathlib import Path
from typing import Iterator

import numpy as np
import pytest

from edgetrain.sdk import topics, wire
from edgetrain.sdk.round_settings import TASK_TRAIN_CONTINUOUS
from tests.fleet import FleetAssets, fleet_assets, wait_for  # noqa: F401
from tests.test_device_protocol import DEVICE, FLEET, Harness, _announcement


@pytest.fixture
def harness(fleet_assets: FleetAssets, tmp_path: Path) -> Iterator[Harness]:  # noqa: F811
    h = Harness(fleet_assets, tmp_path / "device")
    yield h
    h.thread.stop()


def _ack(h: Harness, update: wire.Update) -> None:
    h.transport.deliver(topics.ack_topic(FLEET, DEVICE), wire.encode(wire.Ack(
        device_id=DEVICE, round_id=update.round_id, update_id=update.update_id, accepted=True)))


def test_continuous_round_trains_again_after_each_ack_from_the_newest_model(harness: Harness,
                                                                            fleet_assets: FleetAssets) -> None:
    harness.deliver(wire.encode(_announcement(fleet_assets, task=TASK_TRAIN_CONTINUOUS)))
    first = harness.wait_updates(1)[0]
    time.sleep(0.5)  # no ack yet: the device must hold back (a loop without flow control sends several here)
    assert len(harness.updates()) == 1
    _ack(harness, first)
    second = harness.wait_updates(2)[1]
    assert (second.round_id, second.model_version) == (1, 0) and second.update_id != first.update_id
    newer = fleet_assets.initial_params + np.float32(0.01)
    harness.deliver(wire.encode(_announcement(fleet_assets, round_id=2, version=1, params=newer,
                                              task=TASK_TRAIN_CONTINUOUS)))
    _ack(harness, second)
    third = harness.wait_updates(3)[2]
    assert (third.round_id, third.model_version) == (2, 1)  # from the newest model it holds
    assert not np.array_equal(np.frombuffer(second.payload, np.uint8), np.frombuffer(third.payload, np.uint8))


def test_a_synchronous_announcement_ends_continuous_training(harness: Harness, fleet_assets: FleetAssets) -> None:
    harness.deliver(wire.encode(_announcement(fleet_assets, task=TASK_TRAIN_CONTINUOUS)))
    first = harness.wait_updates(1)[0]
    harness.deliver(wire.encode(_announcement(fleet_assets, round_id=2, version=1, selected=("someone-else",))))
    _ack(harness, first)
    time.sleep(0.5)
    assert len(harness.updates()) == 1  # not selected for round 2, and round 1's model is no longer held
