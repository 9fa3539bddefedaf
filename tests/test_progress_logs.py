"""Feedback on long work, over a real broker: the aggregator says every few seconds who is live and who is
missing while it waits; a device logs one line per round it trains (round, steps, loss, seconds, bytes)."""
from __future__ import annotations

import logging
import re
from pathlib import Path

import pytest

import edgetrain.aggregator.service as service_module
from edgetrain.sdk.errors import EdgetrainError
from tests.fleet import (AggregatorThread, FleetAssets, broker_config, fleet_assets,  # noqa: F401
                         start_device_threads)

FLEET = "progress"


@pytest.mark.broker
def test_a_waiting_aggregator_names_the_live_devices(broker, fleet_assets: FleetAssets, tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch,
                                                     caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.setattr(service_module, "WAIT_REPORT_EVERY_S", 0.5)
    caplog.set_level(logging.INFO, logger=service_module.__name__)
    config = broker_config(broker.url)
    devices = start_device_threads(config, fleet_assets, FLEET, tmp_path / "devices", [100])
    try:
        run = AggregatorThread(config, fleet_assets, FLEET, tmp_path / "run", "--rounds", "1", "--min-devices", "2",
                               "--join-timeout", "3").start()
        with pytest.raises(EdgetrainError, match="only 1 device"):
            run.join(20)
    finally:
        for d in devices:
            d.stop()
    waiting = [r.getMessage() for r in caplog.records if r.getMessage().startswith("waiting for devices")]
    assert waiting and waiting[-1] == "waiting for devices: 1 live (dev-0), 2 needed"


@pytest.mark.broker
def test_a_device_logs_one_line_per_round(broker, fleet_assets: FleetAssets, tmp_path: Path,
                                          caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="edgetrain.sdk.device")
    config = broker_config(broker.url)
    devices = start_device_threads(config, fleet_assets, FLEET, tmp_path / "devices", [64, 64])
    try:
        AggregatorThread(config, fleet_assets, FLEET, tmp_path / "run", "--rounds", "2", "--min-devices", "2",
                         "--batch-size", "32", "--eval-examples", "50").start().join(60)
    finally:
        for d in devices:
            d.stop()
    lines = [r.getMessage() for r in caplog.records if re.match(r"round \d+: \d+ step", r.getMessage())]
    assert len(lines) == 4  # two devices, two rounds
    for line in lines:
        match = re.fullmatch(r"round (\d): (\d+) step\(s\), loss (\d+\.\d{4}), (\d+\.\d) s, (\d+) bytes sent", line)
        assert match is not None, line
        assert int(match[2]) == 2 and float(match[3]) > 0 and int(match[5]) > 4 * 25_000  # 2 steps of 32; dense


@pytest.mark.broker
def test_closing_a_connection_ourselves_logs_no_disconnection_line(broker, caplog: pytest.LogCaptureFixture) -> None:
    from edgetrain.sdk.transport import MqttTransport

    caplog.set_level(logging.INFO, logger="edgetrain.sdk.transport")
    transport = MqttTransport(broker_config(broker.url), client_id="quiet-close")
    transport.connect()
    transport.close()
    assert not [r for r in caplog.records if "disconnected" in r.getMessage() and r.levelno >= logging.INFO]
