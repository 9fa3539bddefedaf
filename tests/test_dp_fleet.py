"""DP-FedAvg over a real broker at CI size: ``simulate`` with --dp-* writes ε per round and in the summary
(bad DP flags: tests/test_simulate_cli.py's table of refused input)."""
from __future__ import annotations

import json
from pathlib import Path

import dp_accounting
import pytest

from edgetrain.aggregator.dp import RDP_ORDERS
from edgetrain.aggregator.results import SUMMARY_FILE
from tests.fleet import FleetAssets, fleet_assets, metrics, spawn_cli  # noqa: F401
from tests.mosquitto import find_mosquitto


@pytest.mark.broker
def test_simulate_with_dp_writes_epsilon_per_round_and_in_the_summary(fleet_assets: FleetAssets,
                                                                      tmp_path: Path) -> None:
    if find_mosquitto() is None:
        pytest.skip("mosquitto not installed")
    out = tmp_path / "run"
    z, delta = 0.8, 1e-3
    done = spawn_cli(["simulate", "--devices", "3", "--rounds", "2", "--limit-examples", "100", "--eval-examples",
                      "100", "--data-dir", fleet_assets.data_dir, "--bundle", fleet_assets.bundle, "--out", out,
                      "--round-timeout", "30", "--join-timeout", "60", "--dp-clip", "0.5",
                      "--dp-noise-multiplier", str(z), "--dp-delta", str(delta)], tmp_path / "simulate.log")
    assert done.wait(120) == 0, done.log()[-3000:]

    records = metrics(out)
    assert [r.round_id for r in records] == [1, 2]
    accountant = dp_accounting.rdp.RdpAccountant(list(RDP_ORDERS))
    for record in records:
        q = record.devices_chosen / 3  # every device is live; fraction 1 asks all of them
        assert record.extra["dp_sampling_rate"] == pytest.approx(q)
        accountant.compose(dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(z)))
        assert record.extra["epsilon"] == pytest.approx(accountant.get_epsilon(delta), rel=1e-12)
        assert record.extra["dp_noise_stddev"] == pytest.approx(z * 0.5)
        assert record.accuracy is not None
    summary = json.loads((out / SUMMARY_FILE).read_text())
    assert summary["extra"]["strategy"] == "dp-fedavg"
    assert summary["extra"]["epsilon"] == records[-1].extra["epsilon"] > records[0].extra["epsilon"] > 0
    assert summary["extra"]["dp_delta"] == delta
    assert "Traceback" not in done.log()
