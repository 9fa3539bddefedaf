"""Local DP (sdk.local_dp): the device clips its update to S and adds N(0, (z·S)²) per coordinate before
it leaves, reports ε (replacement adjacency: a Gaussian mechanism of multiplier z/2 per update, composed
by dp-accounting), and the aggregator writes the largest ε per round and in the summary."""
from __future__ import annotations

import json
from pathlib import Path

import dp_accounting
import numpy as np
import pytest

import edgetrain.aggregator.local_broker as local_broker_module
import edgetrain.aggregator.simulate as simulate_module
from edgetrain.aggregator.privacy_metrics import privacy_summary
from edgetrain.aggregator.results import SUMMARY_FILE, RoundRecord
from edgetrain.aggregator.round_state import RoundTally
from edgetrain.cli import main
from edgetrain.sdk.codecs import get_codec
from edgetrain.sdk.data import PartitionSpec
from edgetrain.sdk.device import Device, DeviceConfig, LocalData
from edgetrain.sdk.errors import ConfigError
from edgetrain.sdk.local_dp import LocalDPConfig, LocalPrivacyLedger, local_epsilon, privatize
from edgetrain.sdk.runtime import load_runtime
from edgetrain.sdk.transport import MemoryTransport
from tests.fleet import FleetAssets, fleet_assets, metrics, spawn_cli  # noqa: F401
from tests.mosquitto import find_mosquitto
from tests.test_device_protocol import _announcement
from tests.test_device_state import Wire


def _direct_epsilon(noise_multiplier: float, releases: int, delta: float) -> float:
    """What dp-accounting says for ``releases`` Gaussian mechanisms of sensitivity 2S and noise z·S."""
    accountant = dp_accounting.rdp.RdpAccountant()
    accountant.compose(dp_accounting.GaussianDpEvent(noise_multiplier / 2), releases)
    return accountant.get_epsilon(delta)


def _device(assets: FleetAssets, state_dir: Path, config: LocalDPConfig) -> Device:
    device_config = DeviceConfig(fleet="proto", device_id="dev-0", state_dir=state_dir,
                                 partition=PartitionSpec.parse("iid"), local_dp=config)
    runtime = load_runtime(assets.bundle)
    return Device(device_config, MemoryTransport(Wire().broker, "dev-0"), runtime,
                  LocalData.load(device_config, runtime, assets.data_dir, limit=32))


def _sent(device: Device, assets: FleetAssets, vector: np.ndarray, round_id: int) -> tuple[np.ndarray, dict]:
    """The vector the device's update frame carries for ``vector`` (the one place updates are finalized)."""
    a = _announcement(assets, round_id=round_id)
    update = device._update(a, vector.astype(np.float32), 32, {"train_loss": 1.0}, {})
    decoded = get_codec("dense").decode(update.payload, assets.num_params, {})
    return np.asarray(decoded, dtype=np.float64), dict(update.metrics)


def test_the_device_sends_its_update_clipped_and_noised_at_the_configured_scale(
        fleet_assets: FleetAssets, tmp_path: Path) -> None:  # noqa: F811
    config = LocalDPConfig(clip_norm=0.5, noise_multiplier=2.0, delta=1e-6)
    device = _device(fleet_assets, tmp_path / "dev", config)
    n = fleet_assets.num_params
    sent, _ = _sent(device, fleet_assets, np.zeros(n), round_id=1)
    # The sample variance of n i.i.d. N(0, σ²) has sd σ²·sqrt(2/n): 5 sd either side, σ = z·S = 1.
    assert abs(sent.var() - 1.0) < 5 * np.sqrt(2 / n), sent.var()
    assert abs(sent.mean()) < 5 / np.sqrt(n)
    # A large update is clipped to S first: what is sent is u·S/‖u‖ + noise, so its mean is the clipped update.
    big = np.zeros(n)
    big[0] = 1000.0
    sent, _ = _sent(device, fleet_assets, big, round_id=2)
    assert abs(sent[0] - 0.5) < 5.0 and abs(sent[1:].std() - 1.0) < 5 * np.sqrt(1 / (2 * n))
    repeats = np.stack([privatize(big, config, np.random.default_rng(i)) for i in range(400)])
    assert abs(repeats[:, 0].mean() - 0.5) < 5 / np.sqrt(400)  # the clipped value, not 1000


def test_the_reported_epsilon_is_dp_accounting_s_and_survives_a_restart(
        fleet_assets: FleetAssets, tmp_path: Path) -> None:  # noqa: F811
    config = LocalDPConfig(clip_norm=1.0, noise_multiplier=3.0, delta=1e-5)
    device = _device(fleet_assets, tmp_path / "dev", config)
    zeros = np.zeros(fleet_assets.num_params)
    for round_id in (1, 2):
        _, reported = _sent(device, fleet_assets, zeros, round_id)
        assert reported["local_epsilon"] == pytest.approx(_direct_epsilon(3.0, round_id, 1e-5), rel=1e-12)
        assert reported["local_dp_delta"] == 1e-5 and reported["train_loss"] == 1.0
    restarted = _device(fleet_assets, tmp_path / "dev", config)  # the ledger is on disk: ε goes on composing
    _, reported = _sent(restarted, fleet_assets, zeros, 3)
    assert reported["local_epsilon"] == pytest.approx(_direct_epsilon(3.0, 3, 1e-5), rel=1e-12)
    assert 0 < _direct_epsilon(3.0, 1, 1e-5) < reported["local_epsilon"]


def test_a_changed_noise_composes_both_mechanisms_and_a_torn_ledger_is_refused(tmp_path: Path) -> None:
    ledger = LocalPrivacyLedger(tmp_path)
    for multiplier in (1.5, 1.5, 0.5):
        ledger.record(multiplier)
    assert ledger.releases == [[1.5, 2], [0.5, 1]]
    accountant = dp_accounting.rdp.RdpAccountant()
    accountant.compose(dp_accounting.GaussianDpEvent(1.5), 2)
    accountant.compose(dp_accounting.GaussianDpEvent(0.5), 1)
    assert LocalPrivacyLedger(tmp_path).epsilon(1e-5) == pytest.approx(accountant.get_epsilon(1e-5), rel=1e-12)
    assert local_epsilon([], 1e-5) == 0.0
    (tmp_path / "local_dp.json").write_text('{"releases": [[1.5, 0]]}')
    with pytest.raises(ConfigError, match="releases must be"):
        LocalPrivacyLedger(tmp_path)
    (tmp_path / "local_dp.json").write_text("{")
    with pytest.raises(ConfigError, match="privacy this device spent is unknown"):
        LocalPrivacyLedger(tmp_path)


@pytest.mark.parametrize("clip, z, delta, message", [
    (None, 1.0, None, "needs --local-dp-clip"),
    (1.0, None, None, "clipping without noise gives no privacy"),
    (None, None, 1e-5, "--local-dp-delta needs"),
    (1.0, 1.0, 1.0, "--local-dp-delta must be in (0, 1)"),
    (float("inf"), 1.0, None, "--local-dp-clip must be a finite number > 0"),
    (1.0, 0.0, None, "--local-dp-noise-multiplier must be a finite number > 0"),
])
def test_a_local_dp_config_that_cannot_hold_is_refused(clip: float | None, z: float | None, delta: float | None,
                                                        message: str) -> None:
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        LocalDPConfig.from_flags(clip, z, delta)
    assert LocalDPConfig.from_flags(None, None, None) is None
    assert LocalDPConfig.from_flags(2.0, 1.0, None) == LocalDPConfig(2.0, 1.0, 1e-5)


def test_the_aggregator_keeps_the_largest_reported_epsilon_per_round_and_run() -> None:
    tally = RoundTally()
    assert tally.local_dp_extra() == {}
    for epsilon, delta in ((2.0, 1e-5), (float("nan"), 1e-5), (5.0, 1e-5), ("9", 1e-5), (99.0, 2.0), (3.0, 1e-5)):
        tally.add_local_epsilon(epsilon, delta)  # NaN, a string, a bad δ: off the wire, ignored
    assert tally.local_dp_extra() == {"local_epsilon": 5.0, "local_dp_delta": 1e-5}

    def record(round_id: int, extra: dict) -> RoundRecord:
        return RoundRecord(round_id=round_id, model_version=round_id, accuracy=0.5, loss=1.0, devices_chosen=1,
                           devices_reported=1, devices_rejected={}, rejected_detail=(), bytes_up=0, bytes_down=0,
                           round_wall_s=0.1, extra=extra)

    records = [record(1, {"local_epsilon": 4.0, "local_dp_delta": 1e-5}), record(2, {}),
               record(3, {"local_epsilon": 6.0, "local_dp_delta": 1e-5})]
    assert privacy_summary(records) == {"local_epsilon": 6.0, "local_dp_delta": 1e-5}
    assert privacy_summary(records[1:2]) == {}


def test_simulate_refuses_local_dp_it_cannot_pass_on(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    def must_not_start(*args: object, **kwargs: object) -> None:
        raise AssertionError("a process was started before the input was checked")

    monkeypatch.setattr(simulate_module.subprocess, "Popen", must_not_start)
    monkeypatch.setattr(local_broker_module.LocalMosquitto, "__init__", must_not_start)
    for flags, message in ((["--local-dp-noise-multiplier", "1"], "needs --local-dp-clip"),
                           (["--devices", "4", "--device-processes", "2", "--local-dp-clip", "1",
                             "--local-dp-noise-multiplier", "1"], "not --device-processes")):
        assert main(["simulate", *flags, "--out", str(tmp_path / "run")]) == 2
        assert message in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


@pytest.mark.broker
def test_simulate_with_local_dp_reports_local_epsilon(fleet_assets: FleetAssets, tmp_path: Path) -> None:  # noqa: F811
    if find_mosquitto() is None:
        pytest.skip("mosquitto not installed")
    out = tmp_path / "run"
    done = spawn_cli(["simulate", "--devices", "2", "--rounds", "2", "--limit-examples", "60", "--eval-examples",
                      "50", "--data-dir", fleet_assets.data_dir, "--bundle", fleet_assets.bundle, "--out", out,
                      "--round-timeout", "30", "--join-timeout", "60", "--local-dp-clip", "0.5",
                      "--local-dp-noise-multiplier", "4", "--local-dp-delta", "1e-6"], tmp_path / "simulate.log")
    assert done.wait(90) == 0, done.log()[-3000:]
    records = metrics(out)
    assert [r.devices_reported for r in records] == [2, 2]
    for r in records:  # every device has sent round_id updates by the end of round round_id
        assert r.extra["local_epsilon"] == pytest.approx(_direct_epsilon(4.0, r.round_id, 1e-6), rel=1e-12)
        assert r.extra["local_dp_delta"] == 1e-6
    summary = json.loads((out / SUMMARY_FILE).read_text())
    extra = summary["extra"]
    assert extra["local_epsilon"] == records[-1].extra["local_epsilon"] and extra["local_dp_delta"] == 1e-6
