"""The context recorded with every result, from a fake board tree and fake commands."""
from __future__ import annotations

from pathlib import Path

from edgetrain.device_bench.context import collect_context, parse_l4t_release, parse_throttled
from tests.fake_sysfs import FakeVcgencmd, fake_command, jetson_board_files


def test_jetson_context_from_a_fake_tree(tmp_path: Path) -> None:
    root = tmp_path / "root"
    jetson_board_files(root)
    nvpmodel = fake_command(tmp_path / "bin", "nvpmodel", "NV Power Mode: 15W\n0")
    context = collect_context(root, vcgencmd="/nonexistent/vcgencmd", nvpmodel=str(nvpmodel))
    assert context["board_model"] == "NVIDIA Jetson Orin Nano Developer Kit"  # NUL stripped
    assert context["l4t_release"] == "35.4.1"
    assert context["os"] == "Ubuntu 20.04.6 LTS"
    assert context["kernel"] == "5.10.120-tegra"
    assert context["cpu_governor"] == {"all": "schedutil"}
    assert context["nvpmodel_mode"] == "15W"
    assert context["temperatures_c"] == {"cpu-thermal": 48.5, "gpu-thermal": 47.0}
    assert context["pi_throttled"] is None
    assert context["libraries"]["numpy"] is not None


def test_pi_throttling_and_an_empty_root_give_nulls(tmp_path: Path) -> None:
    vcgencmd = FakeVcgencmd(tmp_path / "bin")
    vcgencmd.set_throttled(0x50005)
    context = collect_context(tmp_path / "empty", vcgencmd=str(vcgencmd.script), nvpmodel="/nonexistent/nvpmodel")
    assert context["pi_throttled"] == {"raw": "0x50005", "flags": [
        "under_voltage", "throttled", "under_voltage_occurred", "throttling_occurred"]}
    for key in ("board_model", "l4t_release", "os", "kernel", "cpu_governor", "nvpmodel_mode", "temperatures_c"):
        assert context[key] is None, key
    assert parse_l4t_release(None) is None and parse_throttled("garbage") is None
