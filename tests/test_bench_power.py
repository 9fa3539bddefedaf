"""Power sources against fake sysfs trees and fake commands: each synthetic trace must give exactly
the joules it implies. Time is driven by a FakeClock and explicit polls, never by sleeping."""
from __future__ import annotations

from pathlib import Path

import pytest

from edgetrain.sdk.energy.power import SourceOptions, detect_power_source
from edgetrain.sdk.energy.power.csv_meter import CsvMeterSource
from edgetrain.sdk.energy.power.estimate import CpuTimeEstimate
from edgetrain.sdk.energy.power.ina3221 import Ina3221Source
from edgetrain.sdk.energy.power.pi5_pmic import Pi5PmicSource, parse_pmic_adc
from edgetrain.sdk.energy.power.rapl import RaplSource, unwrap_delta_uj
from edgetrain.sdk.energy.meter import EnergyMeter, Window
from edgetrain.sdk.errors import ConfigError, MeasurementUnavailable
from tests.fake_sysfs import (
    FakeClock,
    FakeIna3221Hwmon,
    FakeIna3221Iio,
    FakeRapl,
    FakeVcgencmd,
)

NO_VCGENCMD = SourceOptions(vcgencmd="/nonexistent/vcgencmd")


def _poll_at(meter: EnergyMeter, clock: FakeClock, t: float) -> None:
    clock.now_s = t
    meter.poll()


def test_ina3221_hwmon_total_is_the_input_rail_alone(tmp_path: Path) -> None:
    fake = FakeIna3221Hwmon(tmp_path, {"VDD_IN": (5000, 1000), "VDD_CPU_GPU_CV": (5000, 400),
                                       "VDD_SOC": (5000, 200)}, update_interval_ms=2)
    source = Ina3221Source.detect(tmp_path, NO_VCGENCMD)
    assert source.rail_names == ("VDD_IN", "VDD_CPU_GPU_CV", "VDD_SOC")  # summation channel skipped
    assert "VDD_IN" in source.total_method and source.update_period_s == pytest.approx(0.002)
    clock = FakeClock()
    meter = EnergyMeter(source, clock=clock)
    _poll_at(meter, clock, 0.0)                  # 5 W in
    meter.begin_window("run")
    fake.set("VDD_IN", 5000, 1400)               # 7 W
    fake.set("VDD_CPU_GPU_CV", 5000, 800)        # 4 W
    _poll_at(meter, clock, 1.0)
    fake.set("VDD_IN", 5000, 1800)               # 9 W
    _poll_at(meter, clock, 2.0)
    clock.now_s = 2.0
    window = meter.end_window("run")
    energy = meter.energy(window)
    assert energy.method == "trapezoid" and energy.samples_inside == 1
    assert energy.gross_j == pytest.approx((5 + 7) / 2 + (7 + 9) / 2, rel=1e-12)  # 14 J, sub-rails not added
    assert energy.rails_j["VDD_CPU_GPU_CV"] == pytest.approx((2 + 4) / 2 + 4, rel=1e-12)
    # a window between samples interpolates its edges: P(0.5) = 6 W, P(1.5) = 8 W
    half = meter.energy(Window("half", 0.5, 1.5))
    assert half.gross_j == pytest.approx((6 + 7) / 2 * 0.5 + (7 + 8) / 2 * 0.5, rel=1e-12)


def test_ina3221_iio_layout_uses_power_files_and_the_pom_input_rail(tmp_path: Path) -> None:
    fake = FakeIna3221Iio(tmp_path, {"POM_5V_IN": 3000, "POM_5V_GPU": 500, "POM_5V_CPU": 1000})
    source = Ina3221Source.detect(tmp_path, NO_VCGENCMD)
    assert "POM_5V_IN" in source.total_method and "iio" in source.total_method
    clock = FakeClock(10.0)
    meter = EnergyMeter(source, clock=clock)
    _poll_at(meter, clock, 10.0)
    meter.begin_window("run")
    _poll_at(meter, clock, 12.0)                 # 3 W held for 2 s
    fake.set("POM_5V_IN", 5000)
    _poll_at(meter, clock, 13.0)                 # then ramps to 5 W over 1 s
    energy = meter.energy(meter.end_window("run"))
    assert energy.gross_j == pytest.approx(3 * 2 + (3 + 5) / 2, rel=1e-12)
    assert energy.rails_j["POM_5V_CPU"] == pytest.approx(3.0, rel=1e-12)


def test_rapl_counter_wraps_and_total_is_package_plus_dram(tmp_path: Path) -> None:
    max_uj = 1_000_000
    fake = FakeRapl(tmp_path, {"0": ("package-0", 900_000, max_uj), "0:0": ("core", 500_000, max_uj),
                               "0:1": ("dram", 0, max_uj)})
    source = RaplSource.detect(tmp_path, NO_VCGENCMD)
    assert source.kind == "energy_counter" and "dram" in source.total_method
    clock = FakeClock()
    meter = EnergyMeter(source, clock=clock)
    meter.begin_window("run")                    # package reads 900 000 uJ here
    fake.set("0", 950_000)
    fake.set("0:0", 520_000)
    _poll_at(meter, clock, 1.0)                  # the poller keeps up with the wrap
    fake.set("0", 100_000)                       # wrapped: 50 000 + 100 000 uJ more
    fake.set("0:1", 30_000)
    clock.now_s = 2.0
    energy = meter.energy(meter.end_window("run"))
    assert energy.method == "counter"
    assert energy.gross_j == pytest.approx(0.15 + 0.05 + 0.03, rel=1e-12)  # core is inside the package
    assert energy.rails_j["0:0/core"] == pytest.approx(0.02, rel=1e-12)
    assert unwrap_delta_uj(990, 10, 1000) == 20 and unwrap_delta_uj(10, 990, 1000) == 980


def test_pi5_pmic_sums_rail_power_from_a_fake_vcgencmd(tmp_path: Path) -> None:
    vcgencmd = FakeVcgencmd(tmp_path)
    vcgencmd.set_pmic({"3V3_SYS": (0.5, 3.3), "VDD_CORE": (2.0, 0.8)})  # 1.65 + 1.6 W
    options = SourceOptions(vcgencmd=str(vcgencmd.script))
    source = Pi5PmicSource.detect(tmp_path, options)
    assert source.rail_names == ("3V3_SYS", "VDD_CORE")  # EXT5V_V has no current: not a rail
    clock = FakeClock()
    meter = EnergyMeter(source, clock=clock)
    _poll_at(meter, clock, 0.0)
    meter.begin_window("run")
    vcgencmd.set_pmic({"3V3_SYS": (0.5, 3.3), "VDD_CORE": (3.0, 0.8)})  # 1.65 + 2.4 W
    _poll_at(meter, clock, 1.0)
    energy = meter.energy(meter.end_window("run"))
    assert energy.gross_j == pytest.approx((3.25 + 4.05) / 2, rel=1e-9)
    assert parse_pmic_adc('error=2 error_msg="Command not registered"') == {}


def test_pi4_firmware_without_pmic_is_not_detected(tmp_path: Path) -> None:
    vcgencmd = FakeVcgencmd(tmp_path)
    (tmp_path / "pmic.txt").write_text('error=2 error_msg="Command not registered"\n')
    with pytest.raises(MeasurementUnavailable, match="no rail readings"):
        Pi5PmicSource.detect(tmp_path, SourceOptions(vcgencmd=str(vcgencmd.script)))


def test_csv_meter_integrates_the_meters_own_timestamps_as_the_log_grows(tmp_path: Path) -> None:
    log = tmp_path / "meter.csv"
    log.write_text("time_unix_s,power_w\n1000.0,2.0\n1001.0,4.0\n100")  # last line still being written
    source = CsvMeterSource.detect(tmp_path, SourceOptions(meter_csv=log), wall=lambda: 1000.0, mono=lambda: 10.0)
    meter = EnergyMeter(source, clock=FakeClock(10.0))
    meter.poll()
    with open(log, "a") as fh:
        fh.write("2.0,4.0\n1003.0,0.0\n")
    meter.poll()
    energy = meter.energy(Window("run", 10.0, 13.0))
    assert [s.time_s for s in meter.trace] == [10.0, 11.0, 12.0, 13.0]
    assert energy.gross_j == pytest.approx(3 + 4 + 2, rel=1e-12)
    with open(log, "a") as fh:
        fh.write("garbage line\n")
    with pytest.raises(MeasurementUnavailable, match="time_unix_s,power_w"):
        meter.poll()


def test_detection_order_and_override(tmp_path: Path) -> None:
    FakeIna3221Hwmon(tmp_path, {"VDD_IN": (5000, 1000)})
    FakeRapl(tmp_path, {"0": ("package-0", 0, 10**9)})
    assert detect_power_source(tmp_path, NO_VCGENCMD).source.name == "ina3221"
    assert detect_power_source(tmp_path, NO_VCGENCMD, override="rapl").source.name == "rapl"
    log = tmp_path / "meter.csv"
    log.write_text("1.0,1.0\n")
    # a meter the user named sees the whole board: it wins over on-board sensors
    with_meter = SourceOptions(vcgencmd="/nonexistent/vcgencmd", meter_csv=log)
    assert detect_power_source(tmp_path, with_meter).source.name == "csv_meter"
    with pytest.raises(ConfigError, match="unknown"):
        detect_power_source(tmp_path, NO_VCGENCMD, override="watt-o-matic")
    with pytest.raises(MeasurementUnavailable, match="vcgencmd"):
        detect_power_source(tmp_path, NO_VCGENCMD, override="pi5_pmic")


def test_no_source_gives_null_energy_with_every_reason(tmp_path: Path) -> None:
    detection = detect_power_source(tmp_path, NO_VCGENCMD)
    assert detection.source is None
    assert {"ina3221", "rapl", "pi5_pmic", "estimate"} <= set(detection.reasons)
    assert "powercap" in detection.reasons["rapl"]
    meter = EnergyMeter(None, detection.unavailable_reason, clock=FakeClock())
    meter.begin_window("run")
    energy = meter.energy(meter.end_window("run"))
    assert energy.gross_j is None and energy.net_j is None and energy.method == "unavailable"
    assert "rapl" in meter.unavailable_reason
    with pytest.raises(MeasurementUnavailable, match="ina3221"):
        meter.require_source()


def test_estimate_only_when_asked_and_labelled(tmp_path: Path) -> None:
    asked = SourceOptions(vcgencmd="/nonexistent/vcgencmd", estimate_watts=4.0)
    assert detect_power_source(tmp_path, asked).source.is_estimate
    FakeRapl(tmp_path, {"0": ("package-0", 0, 10**9)})
    assert detect_power_source(tmp_path, asked).source.name == "rapl"  # a real sensor wins
    cpu = FakeClock()
    source = CpuTimeEstimate(4.0, cpu_time_s=cpu)
    meter = EnergyMeter(source, clock=FakeClock())
    meter.begin_window("run")
    cpu.now_s = 2.5
    energy = meter.energy(meter.end_window("run"))
    assert energy.method == "estimate" and energy.gross_j == pytest.approx(10.0)
    assert source.describe()["estimate"] is True
    with pytest.raises(ConfigError):
        CpuTimeEstimate(-1.0)


def test_idle_baseline_gives_net_joules(tmp_path: Path) -> None:
    fake = FakeRapl(tmp_path, {"0": ("package-0", 0, 10**12)})
    clock = FakeClock()
    meter = EnergyMeter(RaplSource.detect(tmp_path, NO_VCGENCMD), clock=clock)

    def idle_for(seconds: float) -> None:  # what time.sleep would do, on the fake clock
        clock.now_s += seconds
        fake.set("0", 2_000_000)             # 2 J over 1 s idle: 2 W baseline

    meter.measure_idle(1.0, sleep=idle_for)
    meter.begin_window("train")
    clock.now_s = 3.0
    fake.set("0", 12_000_000)                # 10 J over 2 s
    meter.end_window("train")
    assert meter.baseline_power_w() == pytest.approx(2.0)
    train = next(e for e in meter.energies() if e.name == "train")
    assert train.gross_j == pytest.approx(10.0) and train.net_j == pytest.approx(10.0 - 2.0 * 2)


def test_short_window_warns_relative_to_the_update_period(tmp_path: Path) -> None:
    FakeIna3221Hwmon(tmp_path, {"VDD_IN": (5000, 1000)}, update_interval_ms=100)
    clock = FakeClock()
    meter = EnergyMeter(Ina3221Source.detect(tmp_path, NO_VCGENCMD), clock=clock)
    _poll_at(meter, clock, 0.0)
    meter.begin_window("step")
    clock.now_s = 0.01
    meter.end_window("step")
    meter.begin_window("train")
    _poll_at(meter, clock, 2.0)
    meter.end_window("train")
    by_name = {e.name: e for e in meter.energies()}
    assert any("update period" in w for w in by_name["step"].warnings)
    assert by_name["train"].warnings == ()


def test_sampler_thread_polls_at_the_requested_rate(tmp_path: Path) -> None:
    import time

    FakeIna3221Hwmon(tmp_path, {"VDD_IN": (5000, 1000)})
    meter = EnergyMeter(Ina3221Source.detect(tmp_path, NO_VCGENCMD), sample_hz=50)
    meter.start()
    time.sleep(0.3)
    meter.stop()
    assert len(meter.trace) >= 5
    assert meter.achieved_sample_hz() >= 10
    with pytest.raises(ConfigError, match="10 Hz"):
        EnergyMeter(None, sample_hz=5)


class _FakeNvml:
    """pynvml's calls that NvmlSource uses; energy in mJ like the real counter."""

    class NVMLError(Exception):
        pass

    def __init__(self) -> None:
        self.energy_mj = [1_000_000, 5_000]

    def nvmlInit(self) -> None: ...
    def nvmlShutdown(self) -> None: ...
    def nvmlDeviceGetCount(self) -> int: return len(self.energy_mj)
    def nvmlDeviceGetHandleByIndex(self, i: int) -> int: return i
    def nvmlDeviceGetTotalEnergyConsumption(self, handle: int) -> int: return self.energy_mj[handle]


class _FakeJtop:
    """jetson-stats' ``jtop`` object: ``power`` in mW, rails plus jtop's own total."""

    def __init__(self) -> None:
        self.power = {"rail": {"VDD_IN": {"power": 6000}, "VDD_SOC": {"power": 1500}}, "tot": {"power": 6000}}

    def start(self) -> None: ...
    def close(self) -> None: ...


def test_nvml_and_jtop_through_fake_modules(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    import types

    nvml = _FakeNvml()
    monkeypatch.setitem(__import__("sys").modules, "pynvml", nvml)
    source = detect_power_source(tmp_path, NO_VCGENCMD, override="nvml").source
    meter = EnergyMeter(source, clock=FakeClock())
    meter.begin_window("run")
    nvml.energy_mj = [1_002_500, 5_500]
    energy = meter.energy(meter.end_window("run"))
    assert energy.gross_j == pytest.approx(3.0) and energy.rails_j == pytest.approx({"gpu0": 2.5, "gpu1": 0.5})

    monkeypatch.setitem(__import__("sys").modules, "jtop", types.SimpleNamespace(jtop=_FakeJtop))
    jtop = detect_power_source(tmp_path, NO_VCGENCMD, override="jtop").source
    reading = jtop.read_power_w()
    assert reading.total == pytest.approx(6.0) and reading.rails["VDD_SOC"] == pytest.approx(1.5)
