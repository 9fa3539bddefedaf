"""Robust aggregation against adversarial devices, over a real Mosquitto: with 2 of 10 devices
attacking, FedAvg's mean collapses while median, trimmed mean and Multi-Krum stay within 2 points of
the clean run. The server's default adaptive norm clipping is turned off in every run, so what is
measured is the rule alone (with it on, a scaled update is clipped to 5x the median norm first)."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Callable

import pytest

from edgetrain.sdk import topics
from edgetrain.sdk.attack import Attack
from tests.fleet import (AggregatorThread, FleetAssets, Sniffer, broker_config, cleanup, fleet_assets,  # noqa: F401
                         start_device_threads)
from tests.mosquitto import MosquittoBroker

DEVICES = 10
ATTACKERS = 2
ROBUST_RULES = ("median", "trimmed-mean:beta=0.2", "multi-krum:f=2")
RUN_S = 60.0


def _start_fleet(broker: MosquittoBroker, assets: FleetAssets, fleet: str, root: Path, attack: Attack | None,
                 cleanup: list[Callable[[], None]]) -> None:
    config = broker_config(broker.url)
    sniffer = Sniffer(config, client_id=f"sniffer-{fleet}").subscribe(topics.status_filter(fleet)).connect()
    cleanup.append(sniffer.close)
    attacks = {i: attack for i in range(ATTACKERS)} if attack is not None else {}
    devices = start_device_threads(config, assets, fleet, root / fleet, [None] * DEVICES, prefix=fleet,
                                   attacks=attacks)
    cleanup.extend(d.stop for d in devices)
    sniffer.wait_online(fleet, [d.device.config.device_id for d in devices])


def _final_accuracy(broker: MosquittoBroker, assets: FleetAssets, fleet: str, out: Path, rule: str,
                    rounds: int) -> float:
    records = AggregatorThread(broker_config(broker.url), assets, fleet, out, "--rounds", str(rounds),
                               "--min-devices", str(DEVICES), "--round-timeout", "30", "--eval-examples", "200",
                               "--checkpoint-every", str(rounds), "--aggregation", rule,
                               settings={"norm_clip_factor": None}).start().join(RUN_S)
    assert [r.devices_reported for r in records] == [DEVICES] * rounds
    assert all(r.extra.get("aggregation", "mean") == rule for r in records)
    assert json.loads((out / "summary.json").read_text())["extra"]["aggregation"] == rule
    accuracy = records[-1].accuracy
    assert accuracy is not None
    return accuracy


def _check_rules_under_attack(broker: MosquittoBroker, assets: FleetAssets, tmp_path: Path,
                              cleanup: list[Callable[[], None]], kinds: tuple[str, ...], rounds: int) -> None:
    _start_fleet(broker, assets, "clean", tmp_path, None, cleanup)
    clean = _final_accuracy(broker, assets, "clean", tmp_path / "clean", "mean", rounds)
    assert clean > 0.8  # the tiny set is learnable: a collapse below is a real signal
    for kind in kinds:
        fleet = f"attack-{kind}"
        _start_fleet(broker, assets, fleet, tmp_path, Attack(kind), cleanup)
        accuracy = {rule: _final_accuracy(broker, assets, fleet, tmp_path / f"{kind}-{rule.split(':')[0]}", rule,
                                          rounds) for rule in ("mean", *ROBUST_RULES)}
        print(f"{kind}: clean {clean:.3f}, " + ", ".join(f"{r} {a:.3f}" for r, a in accuracy.items()))
        # every kind at its default strength (sdk.attack: RSA's sigma = -4, Bhagoji's boosting)
        assert accuracy["mean"] < clean - 0.3, (kind, clean, accuracy)
        for rule in ROBUST_RULES:
            assert accuracy[rule] >= clean - 0.02, (kind, rule, clean, accuracy)


def test_robust_rules_survive_scaled_updates_that_collapse_fedavg(
        broker: MosquittoBroker, fleet_assets: FleetAssets, tmp_path: Path,
        cleanup: list[Callable[[], None]]) -> None:
    # scale only: under sign-flip (-4·Δ) median and trimmed mean are biased towards the honest updates'
    # small side and need a round or two more to come within 2 pt (measured: 0.95 and 0.935 after 4 rounds)
    _check_rules_under_attack(broker, fleet_assets, tmp_path, cleanup, ("scale",), rounds=4)


@pytest.mark.slow
def test_robust_rules_survive_every_attack_kind(broker: MosquittoBroker, fleet_assets: FleetAssets, tmp_path: Path,
                                                 cleanup: list[Callable[[], None]]) -> None:
    _check_rules_under_attack(broker, fleet_assets, tmp_path, cleanup, ("scale", "random", "sign-flip", "label-flip"),
                              rounds=6)  # 5 left sign-flip's trimmed mean 0.5 pt inside the 2 pt margin
