"""``edgetrain simulate`` end to end at CI size (a private Mosquitto, 3 device processes, 2 rounds),
and its refusal of bad input before any broker or device process starts."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

import edgetrain.aggregator.local_broker as local_broker_module
import edgetrain.aggregator.simulate as simulate_module
from edgetrain.aggregator.results import PLOT_ACCURACY_VS_ROUND, PLOT_ACCURACY_VS_UPLINK, SUMMARY_FILE
from edgetrain.cli import main
from tests.fleet import FleetAssets, fleet_assets, metrics, spawn_cli  # noqa: F401
from tests.mosquitto import find_mosquitto

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.mark.broker
def test_simulate_ci_size_runs_end_to_end(fleet_assets: FleetAssets, tmp_path: Path) -> None:
    if find_mosquitto() is None:
        pytest.skip("mosquitto not installed")
    out = tmp_path / "run"
    done = spawn_cli(["simulate", "--devices", "3", "--rounds", "2", "--limit-examples", "100", "--eval-examples",
                      "100", "--data-dir", fleet_assets.data_dir, "--bundle", fleet_assets.bundle, "--out", out,
                      "--round-timeout", "30", "--join-timeout", "60", "--local-steps", "2", "--seed", "4"],
                     tmp_path / "simulate.log")
    assert done.wait(90) == 0, done.log()[-3000:]

    records = metrics(out)
    assert [r.round_id for r in records] == [1, 2]
    assert all((r.devices_chosen, r.devices_reported, r.total_examples) == (3, 3, 300) for r in records)
    assert all(r.examples_processed == 3 * 2 * 32 for r in records)  # 3 devices x K=2 steps x B=32
    assert sum(r.metrics_bytes_up for r in records) > 0  # the devices' status and metrics frames
    summary = json.loads((out / SUMMARY_FILE).read_text())
    assert summary["num_rounds"] == 2 and summary["updates_accepted"] == 6
    assert summary["total_examples_processed"] == 2 * 3 * 2 * 32
    settings = summary["extra"]  # what report groups by: every result-shaping flag, the seed apart
    assert (settings["seed"], settings["local_steps"], settings["batch_size"], settings["limit_examples"]) == (4, 2, 32, 100)
    assert "local_epochs" not in settings  # K steps replace E epochs
    assert settings["fleet_devices"] == 3  # the fleet's size beside the per-device entries
    assert sorted(settings["devices"]) == ["dev-000", "dev-001", "dev-002"]
    assert summary["final_accuracy"] == records[-1].accuracy
    for name in (PLOT_ACCURACY_VS_ROUND, PLOT_ACCURACY_VS_UPLINK):
        assert (out / name).read_bytes().startswith(PNG_MAGIC)
    assert "final test accuracy" in done.log() and "Traceback" not in done.log()
    assert (out / "signing_key.pem").is_file() and (out / "signing_key.pem.pub").is_file()  # signed by default
    for i in range(3):  # every device process was stopped with SIGTERM and left cleanly
        log = (out / "devices" / f"dev-{i:03d}.log").read_text()
        assert "stopped after training 2 round(s)" in log and "Traceback" not in log


@pytest.mark.parametrize("flags, message", [
    (["--strategy", "nope"], "unknown strategy 'nope'"),
    (["--codec", "nope"], "unknown codec 'nope'"),
    (["--codec", "dense:k"], "expected key=value"),
    (["--codec", "dgc:sparsity=1.5"], "sparsity=1.5 must be in (0, 1)"),
    (["--downlink-codec", "q8:bits=64"], "downlink codec 'q8:bits=64'"),
    (["--devices", "3", "--min-devices", "4"], "--min-devices 4 is more than --devices 3"),
    (["--fleet", "a/b"], "fleet name 'a/b' contains a slash"),
    (["--strategy", "fedavg", "--server-lr", "0.1"], "server_lr"),
    (["--strategy", "large-batch", "--local-steps", "5"], "--local-steps is for FL strategies"),
    # a device host has no attack flag: the attack would be silently ignored
    (["--devices", "4", "--device-processes", "2", "--attackers", "1:scale"], "each its own process"),
    # central DP that cannot hold
    (["--dp-noise-multiplier", "1"], "noise without clipping bounds nothing"),
    (["--dp-clip", "1", "--dp-noise-multiplier", "0"], "--dp-noise-multiplier must be a finite number > 0"),
    (["--dp-clip", "1", "--dp-noise-multiplier", "1", "--dp-delta", "1"], "--dp-delta must be in (0, 1)"),
    (["--dp-clip", "1", "--dp-noise-multiplier", "1", "--strategy", "large-batch"], "large-batch"),
])
def test_simulate_bad_input_exits_2_before_starting_anything(flags: list[str], message: str, tmp_path: Path,
                                                              monkeypatch: pytest.MonkeyPatch,
                                                              capsys: pytest.CaptureFixture[str]) -> None:
    def must_not_start(*args: object, **kwargs: object) -> None:
        raise AssertionError("a process was started before the input was checked")

    monkeypatch.setattr(simulate_module.subprocess, "Popen", must_not_start)
    monkeypatch.setattr(local_broker_module.LocalMosquitto, "__init__", must_not_start)
    out = tmp_path / "run"
    assert main(["simulate", *flags, "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("edgetrain simulate: error: ") and message in err
    assert not out.exists()


def test_simulate_bad_number_is_an_argparse_error(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["simulate", "--devices", "0"])
    assert exit_info.value.code == 2
    assert capsys.readouterr().err.splitlines()[-1] == ("edgetrain simulate: error: argument --devices: "
                                                        "expected a positive integer, got 0")


@pytest.mark.broker
def test_simulate_sigterm_stops_its_devices_and_broker(fleet_assets: FleetAssets, tmp_path: Path) -> None:
    import signal
    import subprocess

    from tests.fleet import wait_for

    if find_mosquitto() is None:
        pytest.skip("mosquitto not installed")
    out = tmp_path / "run"
    run = spawn_cli(["simulate", "--devices", "2", "--rounds", "50", "--limit-examples", "100", "--eval-examples",
                     "100", "--data-dir", fleet_assets.data_dir, "--bundle", fleet_assets.bundle, "--out", out,
                     "--round-timeout", "30", "--join-timeout", "60"], tmp_path / "simulate.log")
    wait_for(lambda: (out / "metrics.jsonl").exists(), "a first round", timeout_s=60)
    run.signal(signal.SIGTERM)
    assert run.wait(30) == 1, run.log()[-2000:]  # stopped mid-run: RunStopped, exit 1
    assert "stopped during round" in run.log()
    left = subprocess.run(["pgrep", "-f", str(out)], capture_output=True, text=True).stdout.split()
    assert left == [], f"processes of the run still alive: {left}"


@pytest.mark.broker
def test_simulate_resume_continues_a_run_from_its_checkpoint(fleet_assets: FleetAssets, tmp_path: Path) -> None:
    if find_mosquitto() is None:
        pytest.skip("mosquitto not installed")
    out = tmp_path / "run"
    common = ["simulate", "--devices", "2", "--limit-examples", "60", "--eval-examples", "50", "--data-dir",
              fleet_assets.data_dir, "--bundle", fleet_assets.bundle, "--out", out, "--round-timeout", "30",
              "--join-timeout", "60"]
    first = spawn_cli([*common, "--rounds", "1"], tmp_path / "first.log")
    assert first.wait(90) == 0, first.log()[-3000:]
    again = spawn_cli([*common, "--rounds", "2"], tmp_path / "again.log")
    assert again.wait(30) == 2 and "--resume" in again.log()  # a non-empty --out needs --resume or --overwrite
    resumed = spawn_cli([*common, "--rounds", "2", "--resume"], tmp_path / "resumed.log")
    assert resumed.wait(90) == 0, resumed.log()[-3000:]
    records = metrics(out)
    assert [r.round_id for r in records] == [1, 2] and records[1].devices_reported == 2
    assert records[1].model_version == 2  # round 2 started from round 1's model
