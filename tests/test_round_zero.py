"""Round 0 (issue 19, Build 6): the aggregator evaluates the initial model once, before round 1, and keeps
it in ``metrics.jsonl`` as round 0, so plots start where training started; ``--resume`` does not redo it,
and it is no round in the summary. Over the in-memory transport."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from edgetrain.aggregator.results import MetricsLog
from edgetrain.sdk.runtime import load_runtime
from edgetrain.sdk.transport.memory import MemoryBroker, MemoryTransport
from tests.fleet import FleetAssets, fleet_assets  # noqa: F401 (fixture)
from tests.test_default_caps import HONEST, LIAR, PARTITION, WAIT_S, _aggregator, _announcement, _join, _run, _send


def _serve(assets: FleetAssets, out: Path, rounds: int, resume: bool = False) -> list:
    """Run ``rounds`` rounds (continuing from ``out`` with ``resume``); three devices send small deltas."""
    broker = MemoryBroker()
    aggregator = _aggregator_resumed(assets, broker, out, rounds) if resume else _aggregator(assets, broker, out, rounds)
    devices: list[MemoryTransport] = [_join(broker, d, PARTITION) for d in (*HONEST, LIAR)]
    thread, records = _run(aggregator)
    for round_id in range(aggregator.next_round, rounds + 1):
        announcement = _announcement(broker, round_id)
        for transport in devices:
            _send(transport, announcement, np.full(assets.num_params, 1e-3, np.float32), PARTITION)
    thread.join(WAIT_S)
    assert not thread.is_alive()
    return records


def _aggregator_resumed(assets: FleetAssets, broker: MemoryBroker, out: Path, rounds: int):
    from dataclasses import replace

    from edgetrain.aggregator.service import Aggregator
    from edgetrain.aggregator.strategy import make_strategy

    fresh = _aggregator(assets, broker, out.parent / "unused", rounds)  # for its config and test data
    return Aggregator(replace(fresh.config, out_dir=out, resume=True), make_strategy("fedavg", min_devices=3),
                      MemoryTransport(broker, "aggregator-2"), fresh.runtime, assets.initial_params,
                      (fresh.test_x, fresh.test_y))


def test_the_initial_model_is_evaluated_once_as_round_0(fleet_assets: FleetAssets, tmp_path: Path) -> None:  # noqa: F811
    out = tmp_path / "run"
    records = _serve(fleet_assets, out, rounds=1)
    assert [r.round_id for r in records] == [1]  # run() returns the rounds that trained
    logged = MetricsLog(out).read()
    assert [r.round_id for r in logged] == [0, 1]
    zero = logged[0]
    runtime = load_runtime(fleet_assets.bundle)
    runtime.set_parameters(fleet_assets.initial_params)
    fresh = _aggregator(fleet_assets, MemoryBroker(), tmp_path / "ref", rounds=1)
    expected = runtime.evaluate(fresh.test_x, fresh.test_y)
    assert (zero.accuracy, zero.loss) == pytest.approx((expected.accuracy, expected.loss))
    assert (zero.model_version, zero.devices_chosen, zero.bytes_up, zero.bytes_down) == (0, 0, 0, 0)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["num_rounds"] == 1 and summary["initial_accuracy"] == pytest.approx(expected.accuracy)

    resumed = _serve(fleet_assets, out, rounds=2, resume=True)
    assert [r.round_id for r in resumed] == [1, 2]
    assert [r.round_id for r in MetricsLog(out).read()] == [0, 1, 2]  # round 0 not redone
    assert json.loads((out / "summary.json").read_text())["num_rounds"] == 2
