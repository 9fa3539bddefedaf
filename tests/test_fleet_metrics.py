"""The fleet view (issue 7): devices publish per-round step time, bytes and energy on their metrics
topic; the aggregator puts them in ``metrics.jsonl`` per device per round, attributed by topic."""
from __future__ import annotations

import json
import math
import signal
import threading
import time
from pathlib import Path
from collections.abc import Callable

import pytest

from edgetrain.aggregator.device_metrics import DeviceMetricsCollector
from edgetrain.sdk.energy.round_energy import RoundEnergy, open_round_energy
from edgetrain.sdk.energy.power import SourceOptions
from edgetrain.sdk.energy.power.ina3221 import Ina3221Source
from edgetrain.sdk import topics, wire
from edgetrain.sdk.device_metrics import GradientGroup, StepTimer, bench_values, step_stats_ms
from edgetrain.sdk.errors import MeasurementUnavailable
from edgetrain.sdk.transport import BrokerConfig
from tests.fake_sysfs import FakeIna3221Hwmon, FakeRapl
from tests.fleet import (AggregatorThread, DeviceThread, FleetAssets, Gate, Sniffer, broker_config,  # noqa: F401
                         cleanup, fleet_assets, metrics, spawn_cli, spawn_device)
from tests.mosquitto import MosquittoBroker

FLEET = "metered"
LIMITS = (60, 100)
RAPL_RANGE_UJ = 262_143_328_850  # a real package domain's max_energy_range_uj
START_UJ = RAPL_RANGE_UJ - 1_000_000  # close to the wrap: round 1's window crosses it


def _bump_uj(index: int, round_id: int) -> int:
    """What device ``index``'s fake package counter gains inside round ``round_id``'s window."""
    return (index + 1) * 1_234_567 + round_id * 7_654


def _metered_device(broker: BrokerConfig, assets: FleetAssets, root: Path, index: int, gate: Gate | None,
                    energy: RoundEnergy | None, unavailable: str = "", bench: dict | None = None,
                    gradient_every: int = 10):
    """A device thread whose round bumps its own fake RAPL counter while the energy window is open."""
    from edgetrain.sdk.data import PartitionSpec
    from edgetrain.sdk.device import Device, DeviceConfig, LocalData
    from edgetrain.sdk.runtime import load_runtime
    from edgetrain.sdk.transport import MqttTransport

    device_id = f"dev-{index}"
    config = DeviceConfig(fleet=FLEET, device_id=device_id, state_dir=root / device_id,
                          partition=PartitionSpec.parse("iid"), partition_index=index, partition_count=len(LIMITS),
                          gradient_metrics_every=gradient_every)
    runtime = load_runtime(assets.bundle)
    data = LocalData.load(config, runtime, assets.data_dir, limit=LIMITS[index])
    transport = MqttTransport(broker, client_id=device_id, reconnect_min_s=0.2, reconnect_max_s=1.0)
    rapl = FakeRapl(root / f"sysfs-{index}", {}) if energy is not None else None

    class _Metered(Device):
        counter_uj = START_UJ

        def _burn(self, a: wire.Announcement) -> None:
            if rapl is not None:
                _Metered.counter_uj = (_Metered.counter_uj + _bump_uj(index, a.round_id)) % RAPL_RANGE_UJ
                rapl.set("0", _Metered.counter_uj)

        def train_round(self, a: wire.Announcement) -> wire.Update:
            if gate is not None:
                gate(device_id, a)
            self._burn(a)
            return super().train_round(a)

        def compute_gradient(self, a: wire.Announcement) -> wire.Update:
            self._burn(a)
            return super().compute_gradient(a)

    return DeviceThread(_Metered(config, transport, runtime, data, energy=energy, energy_unavailable=unavailable,
                                 bench=bench))


def _rapl_energy(root: Path) -> RoundEnergy:
    FakeRapl(root, {"0": ("package-0", START_UJ, RAPL_RANGE_UJ)})
    energy, why = open_round_energy("auto", root)  # detection, as `edgetrain device --sysfs-root` does
    assert energy is not None and energy.source.name == "rapl", why
    return energy


def test_fedavg_rounds_carry_per_device_step_times_and_exact_energy(
        broker: MosquittoBroker, fleet_assets: FleetAssets, tmp_path: Path,
        cleanup: list[Callable[[], None]]) -> None:
    config = broker_config(broker.url)
    root = tmp_path / "devices"
    sniffer = Sniffer(config).subscribe(topics.update_filter(FLEET), topics.status_filter(FLEET)).connect()
    cleanup.append(sniffer.close)
    gate = Gate(frozenset({1}))
    devices = [_metered_device(config, fleet_assets, root, i, gate, _rapl_energy(root / f"sysfs-{i}")).start()
               for i in range(len(LIMITS))]
    cleanup.extend(d.stop for d in devices)
    sniffer.wait_online(FLEET, ["dev-0", "dev-1"])
    assert sniffer.latest_status(FLEET, "dev-0").info["energy_method"] == "counter"  # type: ignore[union-attr]

    out = tmp_path / "run"
    aggregator = AggregatorThread(config, fleet_assets, FLEET, out, "--rounds", "2", "--min-devices", "2",
                                  "--round-timeout", "20", "--eval-examples", "50").start()
    gate.wait_arrived(2)  # round 1 is open and both devices are inside their energy windows
    sniffer.transport.publish(topics.metrics_topic(FLEET, "dev-0"), wire.encode(wire.DeviceMetrics(
        device_id="dev-1", round_id=1, values={"examples": 424242.0, "energy_j": 999.0})))  # dev-0 speaking as dev-1
    sniffer.transport.publish(topics.metrics_topic(FLEET, "dev-1"), b"not a frame")
    gate.open()
    records = aggregator.join()

    updates = {}  # (device, round) -> (the update, its frame's bytes on the wire)
    for topic, payload in sniffer.snapshot():
        if topic.startswith(topics.update_filter(FLEET)[:-1]):
            update = wire.decode(payload)
            assert isinstance(update, wire.Update)
            updates[(update.device_id, update.round_id)] = (update, len(payload))
    assert metrics(out) == records and [r.round_id for r in records] == [1, 2]
    for record in records:
        per_device = record.extra["devices"]
        assert sorted(per_device) == ["dev-0", "dev-1"]
        for index, device in enumerate(("dev-0", "dev-1")):
            values = per_device[device]
            update, frame_bytes = updates[(device, record.round_id)]
            steps = math.ceil(LIMITS[index] / 32)  # one local epoch of batch 32
            assert values["steps"] == steps and values["examples"] == LIMITS[index]
            assert values["compute_s"] == update.metrics["compute_s"]  # the same round, not another one
            assert 0 < values["step_mean_ms"] * steps <= values["compute_s"] * 1e3 * 1.05
            assert values["step_p95_ms"] > 0 and values["encode_ms"] > 0 and values["peak_rss_mb"] > 10
            assert values["update_frame_bytes"] == frame_bytes  # exactly the frame that crossed the broker
            assert values["cpu_s"] == update.metrics["cpu_s"]
            # exactly what the fake counter gained in this window (1 µJ resolution), wrap included
            assert values["energy_j"] == pytest.approx(_bump_uj(index, record.round_id) / 1e6, abs=1e-9)
            assert values["energy_method"] == "counter" and values["energy_window_s"] > 0
        assert record.extra["device_energy_j"] == pytest.approx(
            sum(_bump_uj(i, record.round_id) for i in range(2)) / 1e6, abs=1e-9)
    # The spoof is counted, attributed to nobody; the garbage is counted; neither failed a round.
    assert records[0].extra["metrics_rejected"] == {"spoofed": 1, "malformed": 1}
    assert records[1].extra["metrics_rejected"] == {}
    assert all(v["examples"] != 424242.0 for r in records for v in r.extra["devices"].values())
    summary = json.loads((out / "summary.json").read_text())
    assert summary["extra"]["devices"]["dev-1"]["energy"] == "rapl (counter)"


def test_large_batch_groups_steps_and_a_device_without_sensor_still_reports(
        broker: MosquittoBroker, fleet_assets: FleetAssets, tmp_path: Path,
        cleanup: list[Callable[[], None]]) -> None:
    config = broker_config(broker.url)
    root = tmp_path / "devices"
    energy, why = open_round_energy("auto", tmp_path / "empty-root")
    assert energy is None and "rapl" in why  # nothing detected: the device runs without energy
    bench = {"bench_step_p50_ms": 12.5, "bench_samples_per_s": 2560.0}
    devices = [_metered_device(config, fleet_assets, root, 0, None, _rapl_energy(root / "sysfs-0"), gradient_every=2),
               _metered_device(config, fleet_assets, root, 1, None, None, why, bench=bench, gradient_every=2)]
    for d in devices:
        d.start()
    cleanup.extend(d.stop for d in devices)
    sniffer = Sniffer(config).subscribe(topics.status_filter(FLEET)).connect()
    cleanup.append(sniffer.close)
    sniffer.wait_online(FLEET, ["dev-0", "dev-1"])
    out = tmp_path / "run"
    records = AggregatorThread(config, fleet_assets, FLEET, out, "--strategy", "large-batch", "--steps", "4",
                               "--min-devices", "2", "--batch-size", "16", "--eval-every", "4",
                               "--eval-examples", "50").start().join()
    assert [sorted(r.extra["devices"]) for r in records] == [[], ["dev-0", "dev-1"], [], ["dev-0", "dev-1"]]
    for record in records[1::2]:
        for index, (device, values) in enumerate(sorted(record.extra["devices"].items())):
            # an epoch ends in a partial batch: 60 examples are batches of 16, 16, 16, 12
            sizes = [min(16, LIMITS[index] - i) for i in range(0, LIMITS[index], 16)] * 2
            assert values["steps"] == 2 and values["first_round_id"] == record.round_id - 1
            assert values["examples"] == sum(sizes[record.round_id - 2: record.round_id]) and values["update_frame_bytes"] > 4 * fleet_assets.num_params
        assert "energy_j" not in record.extra["devices"]["dev-1"]
        group = (record.round_id - 1, record.round_id)  # one window spans both steps of the group
        assert record.extra["devices"]["dev-0"]["energy_j"] == pytest.approx(
            sum(_bump_uj(0, step) for step in group) / 1e6, abs=1e-9)
        assert record.extra["device_energy_j"] == record.extra["devices"]["dev-0"]["energy_j"]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["extra"]["device_bench"] == {"dev-1": bench}  # retained: sent before the aggregator started
    assert summary["extra"]["devices"]["dev-1"]["energy"].startswith("not measured: no power source detected")


# -- the pieces, without a broker -------------------------------------------------------------
def test_collector_attributes_by_topic_and_counts_what_it_refuses() -> None:
    collector = DeviceMetricsCollector()
    send = lambda device, round_id, values, topic=None: collector.receive(  # noqa: E731
        topic or device, wire.encode(wire.DeviceMetrics(device_id=device, round_id=round_id, values=values)), 3)
    send("a", 3, {"step_mean_ms": 4.0, "loss": float("nan")})
    send("b", 3, {"energy_j": 2.5})
    send("c", 3, {"energy_j": 100.0})  # not selected
    send("a", 2, {"energy_j": 1.0})  # late
    send("b", 3, {"energy_j": 7.0}, topic="a")  # spoofed: would overwrite b's figures
    send("a", 3, {f"k{i}": 1.0 for i in range(100)})  # oversized
    extra = collector.take(3, {"a", "b"})
    assert extra["devices"] == {"a": {"step_mean_ms": 4.0, "loss": None}, "b": {"energy_j": 2.5}}
    assert extra["device_energy_j"] == 2.5
    assert extra["metrics_rejected"] == {"late": 1, "spoofed": 1, "oversized": 1, "not_selected": 1}
    assert collector.take(4, {"a"})["metrics_rejected"] == {}


def test_collector_flags_devices_that_hold_the_same_examples(caplog: pytest.LogCaptureFixture) -> None:
    collector = DeviceMetricsCollector()
    collector.note_status("a", {"partition_digest": "d1", "num_examples": 60})
    collector.note_status("a", {"partition_digest": "d1", "num_examples": 60})  # its own status again
    collector.note_status("b", {"partition_digest": "d2", "num_examples": 60})
    assert collector.shared_partitions() == {} and "same examples" not in caplog.text
    collector.note_status("c", {"partition_digest": "d1", "num_examples": 60})  # a repeated --index
    assert collector.shared_partitions() == {"d1": ["a", "c"]}
    assert "devices c and a train on the same examples (partition digest d1)" in caplog.text
    collector.note_status("c", {"partition_digest": "d3", "num_examples": 60})  # restarted with its own share
    assert collector.shared_partitions() == {}
    assert collector.summary()["shared_partitions"] == {}


def test_step_timer_group_and_bench_values() -> None:
    timer = StepTimer(iter(range(4)))
    assert list(timer) == [0, 1, 2, 3] and len(timer.durations_s) == 4
    stats = step_stats_ms([0.001] * 19 + [0.021])
    assert stats["step_mean_ms"] == pytest.approx(2.0) and stats["step_p95_ms"] == pytest.approx(2.0, abs=1e-9)
    group = GradientGroup(every=3)
    for step in (2, 3):
        group.add(step, 0.1, {"examples": 16.0})
    assert group.due(3) and not group.due(4)
    assert group.flush() == pytest.approx({"examples": 32.0, "compute_s": 0.2, "steps": 2.0,
                                           "first_round_id": 2.0, "step_mean_ms": 100.0, "step_p95_ms": 100.0})
    report = {"step_latency": {"p50_s": 0.004}, "memory": {"peak_rss_bytes": 2**21},
              "energy": {"available": True, "estimate": False, "per_step_j": {"gross": 0.25, "net": None}}}
    assert bench_values(report) == {"bench_step_p50_ms": 4.0, "bench_peak_rss_mb": 2.0,
                                    "bench_energy_per_step_gross_mj": 250.0, "bench_energy_is_estimate": 0.0}


def test_sampler_energy_only_samples_inside_windows_and_forgets_the_trace(tmp_path: Path) -> None:
    FakeIna3221Hwmon(tmp_path, {"VDD_IN": (5000, 1000)})  # a constant 5 W
    energy, _ = open_round_energy("ina3221", tmp_path)
    assert isinstance(energy, RoundEnergy) and isinstance(energy.source, Ina3221Source)
    sampling = lambda: any(t.name == "edgetrain-power-sampler" for t in threading.enumerate())  # noqa: E731
    for _ in range(2):  # the thread restarts for the next window
        energy.begin()
        assert sampling()
        time.sleep(0.15)
        joules, window_s = energy.end()
        assert not sampling()  # no polling between rounds
        # samples before the start and after the end: the trapezoid of a constant is exact
        assert window_s >= 0.15 and joules == pytest.approx(5.0 * window_s, rel=1e-9)
        assert len(energy.meter.trace) <= 2 and energy.meter.windows == []  # nothing piles up over days
    energy.close()
    with pytest.raises(MeasurementUnavailable):  # a named sensor that is absent fails loudly
        open_round_energy("rapl", tmp_path / "nothing", SourceOptions())


def test_device_cli_detects_the_sensor_and_publishes_its_bench_result(
        broker: MosquittoBroker, fleet_assets: FleetAssets, tmp_path: Path,
        cleanup: list[Callable[[], None]]) -> None:
    FakeRapl(tmp_path / "sysfs", {"0": ("package-0", 5, RAPL_RANGE_UJ)})
    bench_json = tmp_path / "bench.json"
    bench_json.write_text(json.dumps({"schema_version": 1, "step_latency": {"p50_s": 0.031, "p95_s": 0.05},
                                      "samples_per_s": 1000.0, "energy": {"available": False}}))
    device = spawn_device(broker.url, fleet_assets, FLEET, "board-1", tmp_path, index=0, count=1, limit=20,
                          extra=["--sysfs-root", tmp_path / "sysfs", "--bench-result", bench_json])
    cleanup.append(device.kill)
    sniffer = Sniffer(broker_config(broker.url)).subscribe(topics.status_filter(FLEET),
                                                          topics.metrics_filter(FLEET)).connect()
    cleanup.append(sniffer.close)
    sniffer.wait_online(FLEET, ["board-1"])
    assert sniffer.latest_status(FLEET, "board-1").info["power_source"] == "rapl"  # type: ignore[union-attr]
    _, bench = sniffer.wait_for_message(wire.DeviceMetrics, what="the retained bench result")
    assert bench.round_id == 0 and bench.values == {  # type: ignore[attr-defined]
        "bench_step_p50_ms": pytest.approx(31.0), "bench_step_p95_ms": pytest.approx(50.0),
        "bench_samples_per_s": 1000.0}
    device.signal(signal.SIGTERM)
    assert device.wait() == 0
    bad = spawn_cli(["device", "--broker", broker.url, "--fleet", FLEET, "--device-id", "board-2", "--bundle",
                     fleet_assets.bundle, "--power-source", "rapl", "--sysfs-root", tmp_path / "nothing"],
                    tmp_path / "bad.log")
    assert bad.wait() != 0 and "no RAPL domains" in bad.log()  # a named sensor that is absent: fail fast
