"""Secure aggregation in real FedAvg rounds over a real Mosquitto (``aggregator.secure_rounds``,
``sdk.secagg.device_round``): the aggregator applies the survivors' mean of the very vectors the devices
masked, to the quantisation error, with no update ever on the broker in the clear; dropouts before and after
the masked input; refusals at start."""
from __future__ import annotations

import json
import threading
from pathlib import Path
from typing import Callable

import numpy as np
import pytest

from edgetrain.aggregator.cli import aggregator_config
from edgetrain.sdk import topics, wire
from edgetrain.sdk.errors import ConfigError
from edgetrain.sdk.round_settings import RoundSettings
from edgetrain.sdk.secagg import device_round
from edgetrain.sdk.secagg.quantize import FixedPoint
from tests.fleet import (AggregatorThread, FleetAssets, Sniffer, broker_config, cleanup, fleet_assets,  # noqa: F401
                         metrics, round_args, start_device_threads)
from tests.mosquitto import MosquittoBroker

CLIP, BITS = 0.5, 20


@pytest.fixture
def masked_vectors(monkeypatch: pytest.MonkeyPatch) -> dict[str, np.ndarray]:
    """device -> the float vector it handed to its SecAgg+ session (what a plain update would have carried)."""
    seen: dict[str, np.ndarray] = {}
    lock = threading.Lock()
    original = device_round.SecureDeviceRound.__init__

    def recording(self, transport, fleet, device_id, run_id, round_id, update) -> None:  # noqa: ANN001
        with lock:
            seen[device_id] = np.array(update, dtype=np.float64)
        original(self, transport, fleet, device_id, run_id, round_id, update)

    monkeypatch.setattr(device_round.SecureDeviceRound, "__init__", recording)
    return seen


def _run_secure(broker: MosquittoBroker, assets: FleetAssets, tmp_path: Path, cleanup: list, fleet: str,
                num_devices: int, *flags: str) -> tuple[AggregatorThread, list, Sniffer]:
    config = broker_config(broker.url)
    sniffer = Sniffer(config).subscribe(topics.update_filter(fleet)).connect()
    cleanup.append(sniffer.close)
    devices = start_device_threads(config, assets, fleet, tmp_path / "devices", [30] * num_devices)
    cleanup.extend(d.stop for d in devices)
    aggregator = AggregatorThread(config, assets, fleet, tmp_path / "run", "--rounds", "1", "--min-devices", "3",
                                  "--secure-aggregation", "--secagg-clip", str(CLIP), "--secagg-bits", str(BITS),
                                  "--round-timeout", "60", "--join-timeout", "60", *flags).start()
    cleanup.append(aggregator.stop)
    records = aggregator.join(120)
    return aggregator, records, sniffer


def _check_mean(aggregator: AggregatorThread, assets: FleetAssets, vectors: list[np.ndarray]) -> None:
    """The applied FedAvg step is the uniform mean of ``vectors`` (clipped) to the quantisation bound."""
    n = len(vectors)
    plain_sum = np.sum([np.clip(v, -CLIP, CLIP) for v in vectors], axis=0)
    bound = FixedPoint(CLIP, BITS, n).sum_error_bound(n)  # n·step/2 on the sum, step/2 on the mean
    secure_mean = aggregator.aggregator.params.astype(np.float64) - assets.initial_params.astype(np.float64)
    gap = np.abs(secure_mean * n - plain_sum)
    float32_slack = n * 1e-6  # the parameters are float32 (|w| < 1: ulp <= 6e-8 on each of w and w + Δ)
    assert gap.max() <= bound + float32_slack, (gap.max(), bound)
    assert np.abs(plain_sum).max() > 100 * bound  # the check has teeth: the sum is far above the error


def test_secure_round_sum_equals_plain_fedavg_sum(broker: MosquittoBroker, fleet_assets: FleetAssets,
                                                  tmp_path: Path, cleanup: list[Callable[[], None]],
                                                  masked_vectors: dict[str, np.ndarray]) -> None:
    aggregator, records, sniffer = _run_secure(broker, fleet_assets, tmp_path, cleanup, "secagg-sum", 4)
    assert sorted(masked_vectors) == [f"dev-{i}" for i in range(4)]
    _check_mean(aggregator, fleet_assets, list(masked_vectors.values()))
    assert not [m for _, m in sniffer.decoded(wire.Update)]  # no update ever crossed the broker readable
    extra = records[-1].extra
    assert (extra["secure_aggregation"], extra["secagg_survivors"], extra["secagg_dropped"]) == (True, 4, 0)
    assert extra["secagg_bytes_up"] > 4 * 8 * fleet_assets.num_params  # four masked uint64 vectors at least
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())["extra"]
    assert summary["secure_aggregation"] is True and summary["secagg"]["value_bits"] == BITS


def test_secure_round_survives_dropouts_before_and_after_masked_input(
        broker: MosquittoBroker, fleet_assets: FleetAssets, tmp_path: Path, cleanup: list[Callable[[], None]],
        masked_vectors: dict[str, np.ndarray], monkeypatch: pytest.MonkeyPatch) -> None:
    # dev-7 and dev-8 go silent right after their masked inputs (before unmasking), dev-9 right after its
    # shares (before its masked input): the sum is of dev-0..dev-8, dev-9's pairwise masks removed.
    monkeypatch.setenv(device_round.STOP_AFTER_ENV, "dev-7=masked_input,dev-8=masked_input,dev-9=shares")
    aggregator, records, _ = _run_secure(broker, fleet_assets, tmp_path, cleanup, "secagg-drop", 10,
                                         "--secagg-stage-timeout", "4")
    extra = records[-1].extra
    assert (extra["secagg_survivors"], extra["secagg_dropped"]) == (9, 1)
    assert records[-1].devices_reported == 9
    _check_mean(aggregator, fleet_assets, [masked_vectors[f"dev-{i}"] for i in range(9)])


@pytest.mark.parametrize("flags, why", [
    (("--codec", "dgc"), "dense uplink codec"),
    (("--codec", "random_mask"), "dense uplink codec"),
    (("--aggregation", "median"), "robust rule"),
    (("--dp-clip", "1", "--dp-noise-multiplier", "1"), "DP-FedAvg"),
    (("--max-norm", "3"), "never sees one update's norm"),
    (("--strategy", "large-batch"), "FL strategies"),
    (("--min-devices", "2"), "--min-devices >= 3"),
    (("--secagg-neighbours", "4", "--secagg-threshold", "2"), "exceed half"),
    (("--secagg-bits", "60", "--secagg-clip", "1"), "ring bits"),
])
def test_refused_at_start_with_the_reason(flags: tuple[str, ...], why: str) -> None:
    args = round_args("--secure-aggregation", "--min-devices", "3", *flags)
    with pytest.raises(ConfigError, match=why):
        aggregator_config(args, Path("."), "f", resume=False)


def test_dense_and_q8_accepted_and_flag_off_is_plain() -> None:
    for codec in ("dense", "q8", "fp16"):
        config = aggregator_config(round_args("--secure-aggregation", "--min-devices", "3", "--codec", codec),
                                   Path("."), "f", resume=False)
        assert config.secure_aggregation is not None
    assert aggregator_config(round_args("--codec", "dgc"), Path("."), "f", resume=False).secure_aggregation is None


def test_secure_flag_is_a_typed_round_setting_on_the_wire() -> None:
    settings = RoundSettings(secure_aggregation=True)
    assert RoundSettings.from_mapping(settings.to_dict()).secure_aggregation is True
    assert RoundSettings.from_mapping({}).secure_aggregation is False  # an older aggregator's frame: plain
    with pytest.raises(ConfigError, match="secure_aggregation must be true or false"):
        RoundSettings.from_mapping({"secure_aggregation": "yes"})
