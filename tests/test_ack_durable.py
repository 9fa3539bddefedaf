"""An ack means durable (issue 12, defect 1): an aggregator SIGKILLed after it acked round k's updates
and before round k's checkpoint resumes with those updates and completes the round, each counted once."""
from __future__ import annotations

import signal
from pathlib import Path
from typing import Callable

import pytest

from edgetrain.aggregator.service import CRASH_BEFORE_CHECKPOINT_ENV
from edgetrain.sdk import topics, wire
from tests.fleet import (FleetAssets, Sniffer, broker_config, cleanup, fleet_assets, metrics,  # noqa: F401
                         spawn_cli, start_device_threads, wait_for)
from tests.mosquitto import MosquittoBroker

FLEET = "durable"


def test_updates_acked_before_a_sigkill_are_counted_after_resume(broker: MosquittoBroker, fleet_assets: FleetAssets,
                                                                 tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                                 cleanup: list[Callable[[], None]]) -> None:
    config = broker_config(broker.url)
    sniffer = Sniffer(config).subscribe(topics.ack_filter(FLEET)).connect()
    cleanup.append(sniffer.close)
    devices = start_device_threads(config, fleet_assets, FLEET, tmp_path / "devices", [60, 60, 60])
    cleanup.extend(d.stop for d in devices)
    out = tmp_path / "run"
    argv = ["aggregate", "--broker", broker.url, "--fleet", FLEET, "--bundle", fleet_assets.bundle, "--out", out,
            "--data-dir", fleet_assets.data_dir, "--rounds", "3", "--min-devices", "3", "--round-timeout", "10",
            "--eval-examples", "100", "--threads", "1"]
    monkeypatch.setenv(CRASH_BEFORE_CHECKPOINT_ENV, "2")  # the process kills itself after round 2's acks
    first = spawn_cli(argv, tmp_path / "aggregate-1.log")
    cleanup.append(first.kill)
    assert first.wait(120) == -signal.SIGKILL, first.log()[-3000:]
    round2_acks = {m.device_id for _, m in sniffer.decoded(wire.Ack) if m.round_id == 2 and m.accepted}  # type: ignore[attr-defined]
    assert round2_acks == {"dev-0", "dev-1", "dev-2"}  # every update acked: the devices consider round 2 done
    assert [r.round_id for r in metrics(out)] == [1]

    monkeypatch.delenv(CRASH_BEFORE_CHECKPOINT_ENV)
    second = spawn_cli([*argv, "--resume"], tmp_path / "aggregate-2.log")
    cleanup.append(second.kill)
    assert second.wait(120) == 0, second.log()[-3000:]
    records = metrics(out)
    assert [r.round_id for r in records] == [1, 2, 3]
    assert [r.model_version for r in records] == [1, 2, 3]
    assert records[1].devices_reported == 3 and records[1].total_examples == 180  # each acked update once
    assert records[1].extra["replayed"] == 3
