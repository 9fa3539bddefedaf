"""``edgetrain bench`` end to end on a tiny torch bundle, in-process (one torch import for the file)."""
from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from edgetrain.device_bench.cli import main
from tests.fake_sysfs import FakeRapl

pytest.importorskip("torch")
REPO = Path(__file__).resolve().parents[1]
STEPS, WARMUP = 12, 2


@pytest.fixture(scope="module")
def bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from edgetrain.export.bundle_writer import export_bundle

    out = tmp_path_factory.mktemp("bundles") / "mlp"
    export_bundle("mlp", {"hidden": [16]}, out_dir=out, seed=0)
    return out


def _bench(bundle: Path, out: Path, root: Path, *extra: str) -> int:
    return main(["bench", "--bundle", str(bundle), "--out", str(out), "--steps", str(STEPS), "--warmup",
                 str(WARMUP), "--batch", "8", "--sysfs-root", str(root), "--vcgencmd", "/nonexistent/vcgencmd",
                 "--idle-s", "0", *extra])


def test_bench_without_a_sensor_reports_latency_memory_and_why_no_energy(
        bundle: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "out"
    assert _bench(bundle, out, tmp_path / "empty-root", "--synthetic") == 0
    printed = capsys.readouterr().out
    for needle in ("p50", "p90", "p95", "p99", "samples/s", "peak RSS", "energy: unavailable", "powercap"):
        assert needle in printed, (needle, printed)
    report = json.loads((out / "bench.json").read_text())
    assert report["schema_version"] == 1
    latency = report["step_latency"]
    assert latency["count"] == STEPS and 0 < latency["p50_s"] <= latency["p90_s"] <= latency["p99_s"] <= latency["max_s"]
    assert len(report["step_latencies_s"]) == STEPS
    assert report["memory"]["peak_rss_bytes"] > 10 * 2**20
    assert report["codec"]["payload_bytes"] == 4 * report["model"]["num_params"]
    energy = report["energy"]
    assert energy["available"] is False and "rapl" in energy["unavailable_reason"]
    assert energy["per_step_j"] == {"gross": None, "net": None}  # null, never a made-up number
    assert energy["windows"]["step"]["count"] == STEPS and energy["windows"]["step"]["gross_j"] is None
    assert (out / "power_trace.csv").read_text().startswith("time_s,power_w")
    assert (out / "power.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "unavailable" in (out / "summary.md").read_text()


def test_bench_with_a_fake_rapl_counter_and_real_data(bundle: Path, tmp_path: Path,
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    from edgetrain.sdk.data import write_idx

    data = tmp_path / "fmnist"
    data.mkdir()
    rng = np.random.default_rng(0)
    write_idx(data / "train-images-idx3-ubyte", rng.integers(0, 256, (64, 28, 28), dtype=np.uint8), gzip=False)
    write_idx(data / "train-labels-idx1-ubyte", rng.integers(0, 10, 64).astype(np.uint8), gzip=False)
    root = tmp_path / "root"
    FakeRapl(root, {"0": ("package-0", 5_000_000, 10**12)})  # a counter that does not move: 0 J
    out = tmp_path / "out"
    assert _bench(bundle, out, root, "--data-dir", str(data), "--power-source", "rapl", "--mode", "gradient") == 0
    printed = capsys.readouterr().out
    assert "Fashion-MNIST data" in printed and "energy via rapl" in printed
    report = json.loads((out / "bench.json").read_text())
    energy = report["energy"]
    assert energy["source"]["name"] == "rapl" and energy["windows"]["train"]["method"] == "counter"
    assert energy["per_step_j"]["gross"] == 0.0
    assert energy["windows"]["encode"]["count"] == 5
    assert report["config"]["mode"] == "gradient"


def test_compare_prints_a_side_by_side_table(bundle: Path, tmp_path: Path,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    outs = [tmp_path / "a", tmp_path / "b"]
    for out, batch in zip(outs, ("4", "8")):
        assert main(["bench", "--bundle", str(bundle), "--out", str(out), "--steps", "3", "--warmup", "0",
                     "--batch", batch, "--synthetic", "--sysfs-root", str(tmp_path / "none"),
                     "--vcgencmd", "/nonexistent/vcgencmd"]) == 0
    capsys.readouterr()
    assert main(["bench", "compare", *(str(o / "bench.json") for o in outs)]) == 0
    table = capsys.readouterr().out
    assert "| metric | a (torch) | b (torch) |" in table
    assert "| batch | 4 | 8 |" in table and "step p99 (ms)" in table
    (tmp_path / "other.json").write_text('{"schema_version": 99}')
    assert main(["bench", "compare", str(tmp_path / "other.json")]) == 2
    assert "schema_version" in capsys.readouterr().err


def test_bench_publishes_a_real_update_and_times_the_puback(bundle: Path, tmp_path: Path, broker,
                                                            capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "out"
    assert _bench(bundle, out, tmp_path / "none", "--synthetic", "--broker", broker.url,
                  "--publish-repeats", "3") == 0
    assert "publish->PUBACK p50" in capsys.readouterr().out
    report = json.loads((out / "bench.json").read_text())
    assert report["broker"]["publish_ack"]["count"] == 3
    assert report["broker"]["frame_bytes"] == report["codec"]["frame_bytes"]
    assert report["broker"]["topic"] == "edgetrain/bench/update/bench"


def test_device_bench_imports_and_compares_without_torch(tmp_path: Path) -> None:
    code = textwrap.dedent("""
        import sys
        class _NoTorch:
            def find_spec(self, name, path=None, target=None):
                if name == "torch" or name.startswith("torch."):
                    raise ModuleNotFoundError(name)
        sys.meta_path.insert(0, _NoTorch())
        import edgetrain.device_bench.cli, edgetrain.device_bench.bench, edgetrain.sdk.energy.meter, edgetrain.device_bench.report, edgetrain.sdk.energy.power
        import edgetrain.device_bench.context, edgetrain.device_bench.broker_probe
        assert "torch" not in sys.modules
        print("ok")
    """)
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "ok"


def test_bench_without_matplotlib_writes_its_results_and_skips_the_plot(bundle: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    code = textwrap.dedent(f"""
        import sys
        class _NoMatplotlib:
            def find_spec(self, name, path=None, target=None):
                if name == "matplotlib" or name.startswith("matplotlib."):
                    raise ModuleNotFoundError(name)
        sys.meta_path.insert(0, _NoMatplotlib())
        from edgetrain.device_bench.cli import main
        code = main(["bench", "--bundle", {str(bundle)!r}, "--out", {str(out)!r}, "--steps", "4", "--warmup", "1",
                     "--batch", "8", "--sysfs-root", {str(tmp_path / "empty-root")!r}, "--idle-s", "0",
                     "--vcgencmd", "/nonexistent/vcgencmd", "--synthetic"])
        assert "matplotlib" not in sys.modules
        sys.exit(code)
    """)
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120,
                          check=False)
    assert done.returncode == 0, done.stderr
    plot_lines = [line for line in done.stdout.splitlines() if line.startswith("plot")]
    assert plot_lines == ["plot skipped: matplotlib is not installed (pip install 'edgetrain[bench]' adds it)"]
    report = json.loads((out / "bench.json").read_text())
    assert report["step_latency"]["count"] == 4 and "plot_png" not in report["files"]
    assert "p50" in (out / "summary.md").read_text() and not (out / "power.png").exists()
