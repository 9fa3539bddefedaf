"""What each device runs on (issue 13, Build 1): a device's status carries its ``platform.machine()``,
Python version, runtime and edgetrain version as typed fields; the aggregator keeps them per device and
``summary.json`` lists them (``extra.devices``). Over the in-memory transport (no broker needed)."""
from __future__ import annotations

import json
import logging
import platform
from pathlib import Path

import numpy as np
import pytest

from edgetrain.aggregator.device_metrics import DeviceMetricsCollector
from edgetrain.sdk import __version__, topics, wire
from edgetrain.sdk.errors import WireError
from edgetrain.sdk.wire.frame import MessageType, build_frame
from edgetrain.sdk.transport.memory import MemoryBroker, MemoryTransport
from tests.fleet import FleetAssets, fleet_assets, wait_for  # noqa: F401 (fixture)
from tests.test_default_caps import FLEET, PARTITION, WAIT_S, _aggregator, _announcement, _run, _send
from tests.test_device_protocol import Harness

BOARDS = {"pi-0": ("aarch64", "3.11.2", "onnxgraph", "0.1.0"), "jetson-1": ("aarch64", "3.10.12", "torch", "0.1.0")}


def test_a_device_says_what_it_runs_on_in_typed_status_fields(fleet_assets: FleetAssets, tmp_path: Path) -> None:  # noqa: F811
    harness = Harness(fleet_assets, tmp_path / "device")
    try:
        wait_for(lambda: harness.transport.messages(wire.Status), "the device's first status")
        status = harness.transport.messages(wire.Status)[0]
    finally:
        harness.thread.stop()
    assert (status.machine, status.python_version, status.runtime, status.edgetrain_version) == (
        platform.machine(), platform.python_version(), harness.device.runtime.name, __version__)
    assert status.machine and status.edgetrain_version
    assert "runtime" not in status.info  # a typed field now, not a free-dict key


def test_an_older_v2_status_without_the_fields_still_decodes() -> None:
    # the frame a device from before these fields sends: same wire version, header without them
    old_frame = build_frame(MessageType.STATUS, {"device_id": "old", "online": True, "info": {}, "run_id": "",
                                                 "skip_reason": ""})
    status = wire.decode(old_frame)
    assert isinstance(status, wire.Status) and (status.machine, status.runtime) == ("", "")


@pytest.mark.parametrize("field, value", [("machine", "x" * 65), ("python_version", "3.11\n"),
                                          ("edgetrain_version", "ü"), ("runtime", 7)])
def test_a_status_with_an_implausible_platform_field_is_refused(field: str, value: object) -> None:
    with pytest.raises(WireError, match=f"Status.{field}"):
        wire.Status(device_id="d", online=True, info={}, **{field: value})


def _join(broker: MemoryBroker, device: str, said: tuple[str, str, str, str] | None) -> MemoryTransport:
    transport = MemoryTransport(broker, device)
    transport.connect()
    machine, python, runtime, version = said or ("", "", "", "")
    status = wire.Status(device_id=device, online=True, info={"num_examples": PARTITION}, machine=machine,
                         python_version=python, runtime=runtime, edgetrain_version=version)
    transport.publish(topics.status_topic(FLEET, device), wire.encode(status), retain=True)
    return transport


def test_summary_lists_each_devices_platform(fleet_assets: FleetAssets, tmp_path: Path) -> None:  # noqa: F811
    broker = MemoryBroker()
    out = tmp_path / "run"
    aggregator = _aggregator(fleet_assets, broker, out, rounds=1)
    devices = [_join(broker, d, said) for d, said in BOARDS.items()] + [_join(broker, "old-2", None)]
    thread, records = _run(aggregator)
    announcement = _announcement(broker, 1)
    # a last will (no platform fields) after the online status must not erase what the device said
    will = wire.Status(device_id="pi-0", online=False, info={"reason": "connection lost"})
    devices[0].publish(topics.status_topic(FLEET, "pi-0"), wire.encode(will), retain=True)
    devices[0].publish(topics.status_topic(FLEET, "pi-0"), wire.encode(wire.Status(
        device_id="pi-0", online=True, info={"num_examples": PARTITION}, machine="aarch64", python_version="3.11.2",
        runtime="onnxgraph", edgetrain_version="0.1.0")), retain=True)
    for transport in devices:
        _send(transport, announcement, np.zeros(fleet_assets.num_params, np.float32), PARTITION)
    thread.join(WAIT_S)
    assert not thread.is_alive() and len(records) == 1
    listed = json.loads((out / "summary.json").read_text())["extra"]["devices"]
    assert listed == {device: {"machine": m, "python": p, "runtime": r, "edgetrain": v}
                      for device, (m, p, r, v) in sorted(BOARDS.items())}  # old-2 said nothing: not listed


def test_energy_unavailable_is_said_once_per_device_and_once_in_the_summary(caplog: pytest.LogCaptureFixture) -> None:
    collector = DeviceMetricsCollector()
    why = "no power source detected (--log-level DEBUG lists the sources tried)"
    with caplog.at_level(logging.INFO, logger="edgetrain.aggregator.device_metrics"):
        for _ in range(3):  # join, a skipped round, a reconnect: every status repeats the device's state
            collector.note_status("pi-0", {"energy_unavailable": why})
        collector.note_status("jetson-1", {"power_source": "ina3221", "energy_method": "power"})
    assert [r.getMessage() for r in caplog.records] == [f"pi-0: energy not measured: {why}"]
    devices = collector.summary()["devices"]
    assert devices == {"jetson-1": {"energy": "ina3221 (power)"}, "pi-0": {"energy": f"not measured: {why}"}}
    assert "device_energy_sources" not in collector.summary()
