"""FedBuff (Nguyen et al. 2022) at the math and protocol level: K=1 with no staleness is sequential SGD on
the server, the staleness weights and the buffered step equal their definitions, validation takes updates
within S versions (more than one per device) and rejects staler ones as ``too_stale``."""
from __future__ import annotations

import argparse
from typing import Any

import numpy as np
import pytest

from edgetrain.aggregator import validation as v
from edgetrain.aggregator.cli import add_round_args, make_strategy_from_args
from edgetrain.aggregator.fedbuff import FedBuff, StalenessWeight, buffered_delta
from edgetrain.aggregator.simulate import _stragglers
from edgetrain.aggregator.strategy import FedAvg
from edgetrain.aggregator.validation import ValidationContext, validate_update
from edgetrain.sdk.codecs import CodecSpec, get_codec
from edgetrain.sdk.device import DeviceConfig, check_slowdown
from edgetrain.sdk.data import PartitionSpec
from edgetrain.sdk.errors import ConfigError, UpdateRejected, WireError
from edgetrain.sdk.round_settings import TASK_TRAIN_CONTINUOUS, RoundSettings
from edgetrain.sdk.wire import Announcement, Update, decode, encode

NUM_PARAMS = 40


def _quadratic(seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return rng.standard_normal((60, NUM_PARAMS)).astype(np.float32), rng.standard_normal(60).astype(np.float32)


def _local_delta(w: np.ndarray, a: np.ndarray, b: np.ndarray, lr: float, steps: int) -> np.ndarray:
    """A device's update: ``steps`` of gradient descent on ½‖Aw − b‖²/n from ``w``, as a delta."""
    local = w.copy()
    for _ in range(steps):
        local = (local - np.float32(lr) * (a.T @ (a @ local - b)) / np.float32(len(b))).astype(np.float32)
    return (local - w).astype(np.float32)


@pytest.mark.parametrize("server_lr, local_steps", [(1.0, 1), (1.0, 3), (0.5, 2)])
def test_k1_without_staleness_is_sequential_sgd_on_the_server(server_lr: float, local_steps: int) -> None:
    a, b = _quadratic()
    start = np.zeros(NUM_PARAMS, dtype=np.float32)
    strategy = FedBuff(buffer_size=1, max_staleness=0, server_lr=server_lr, min_devices=1)
    buffered = start.copy()
    for step in range(25):
        strategy.begin_round(buffered)
        strategy.accumulate_stale(_local_delta(buffered, a, b, 0.05, local_steps), 10, f"dev-{step % 3}", 0)
        assert not strategy.accepts_more() and strategy.enough(1)
        buffered, info = strategy.aggregate(buffered)
        assert info.num_updates == 1 and info.rule_metrics["staleness_max"] == 0
    plain = start.copy()  # the plain loop: w ← w + η·Δ(w), one update after the other
    for _ in range(25):
        plain = (plain + np.float32(server_lr) * _local_delta(plain, a, b, 0.05, local_steps)).astype(np.float32)
    np.testing.assert_array_equal(buffered, plain)
    assert np.linalg.norm(a @ plain - b) < np.linalg.norm(a @ start - b)  # it did descend


@pytest.mark.parametrize("spec, expected", [
    ("poly", lambda s: 1 / np.sqrt(1 + s)), ("poly:a=0.5", lambda s: (1 + s) ** -0.5),
    ("poly:a=2", lambda s: 1 / (1 + s) ** 2), ("poly:a=0", lambda s: 1.0), ("const", lambda s: 1.0)])
def test_staleness_weight_equals_its_definition(spec: str, expected: Any) -> None:
    weight = StalenessWeight.parse(spec)
    for s in range(12):
        assert weight(s) == pytest.approx(expected(s), rel=1e-12)
    assert StalenessWeight.parse(str(weight)) == weight


@pytest.mark.parametrize("bad", ["", "poly:b=1", "poly:a=x", "poly:a=-1", "poly:a=nan", "poly:a=inf", "const:a=1",
                                 "linear", "poly:a"])
def test_bad_staleness_weight_is_refused(bad: str) -> None:
    with pytest.raises(ConfigError):
        StalenessWeight.parse(bad)


def test_negative_staleness_is_refused() -> None:
    with pytest.raises(ConfigError):
        StalenessWeight()(-1)


def test_buffered_step_is_the_staleness_weighted_mean_over_k() -> None:
    rng = np.random.default_rng(3)
    params = rng.standard_normal(NUM_PARAMS).astype(np.float32)
    deltas = [rng.standard_normal(NUM_PARAMS).astype(np.float32) for _ in range(4)]
    stalenesses = [0, 2, 5, 2]
    strategy = FedBuff(buffer_size=4, max_staleness=5, staleness_weight="poly:a=0.5", server_lr=0.7)
    strategy.begin_round(params)
    for i, (delta, s) in enumerate(zip(deltas, stalenesses)):
        assert strategy.accepts_more()
        strategy.accumulate_stale(delta, 100 + i, "dev-0", s)  # one device may fill the buffer
    new_params, info = strategy.aggregate(params)
    # Nguyen et al. 2022, Alg. 1: Δ̄ = (1/K) Σ (1+s)^-a Δ_k, w ← w + η Δ̄ (divided by K, not by Σ weights)
    by_hand = sum(d.astype(np.float64) / np.sqrt(1.0 + s) for d, s in zip(deltas, stalenesses)) / 4
    np.testing.assert_allclose(new_params, params + 0.7 * by_hand, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(buffered_delta(deltas, stalenesses, StalenessWeight()), by_hand, rtol=1e-6, atol=1e-7)
    assert info.num_updates == 4 and info.total_examples == 406
    assert info.rule_metrics == {"buffer": 4, "staleness_mean": 2.25, "staleness_max": 5}


def test_buffer_refuses_too_stale_or_overfull_and_fedavg_refuses_stale() -> None:
    strategy = FedBuff(buffer_size=1, max_staleness=2)
    strategy.begin_round(np.zeros(NUM_PARAMS, dtype=np.float32))
    with pytest.raises(ConfigError, match="staleness"):
        strategy.accumulate_stale(np.ones(NUM_PARAMS, dtype=np.float32), 1, "d", 3)
    strategy.accumulate_stale(np.ones(NUM_PARAMS, dtype=np.float32), 1, "d", 2)
    with pytest.raises(ConfigError, match="already holds"):
        strategy.accumulate_stale(np.ones(NUM_PARAMS, dtype=np.float32), 1, "d", 0)
    fedavg = FedAvg(min_devices=1)
    fedavg.begin_round(np.zeros(NUM_PARAMS, dtype=np.float32))
    with pytest.raises(ConfigError, match="synchronous"):
        fedavg.accumulate_stale(np.ones(NUM_PARAMS, dtype=np.float32), 1, "d", 1)


@pytest.mark.parametrize("kwargs", [dict(buffer_size=0), dict(max_staleness=-1), dict(buffer_size=True),
                                    dict(staleness_weight="poly:a=-2")])
def test_fedbuff_settings_are_checked(kwargs: dict) -> None:
    with pytest.raises(ConfigError):
        FedBuff(**kwargs)


def test_plan_asks_for_continuous_training() -> None:
    plan = FedBuff(buffer_size=2, fraction=1.0, min_devices=1).configure_round(1, ["b", "a", "c"], np.random.default_rng(0))
    assert plan.task == TASK_TRAIN_CONTINUOUS and plan.selected == ("a", "b", "c")


# -- validation ------------------------------------------------------------------------------
def _update(round_id: int, model_version: int, update_id: str = "u-1", device_id: str = "dev-1") -> Update:
    payload, _ = get_codec("dense").encode(np.full(NUM_PARAMS, 0.01, dtype=np.float32), None, {})
    return Update(device_id=device_id, round_id=round_id, model_version=model_version, update_id=update_id,
                  num_examples=10, codec="dense", payload=payload, metrics={}, run_id="run-1")


def _ctx(max_staleness: int | None) -> ValidationContext:
    # step 8 announces model version 7 (rounds and versions advance together: round = version + 1)
    return ValidationContext(round_id=8, model_version=7, selected=frozenset({"dev-1"}), num_params=NUM_PARAMS,
                             run_id="run-1", max_staleness=max_staleness)


@pytest.mark.parametrize("base_version", [7, 6, 5, 4])
def test_update_within_max_staleness_is_valid_with_its_staleness(base_version: int) -> None:
    valid = validate_update(_update(base_version + 1, base_version), topic_device="dev-1", ctx=_ctx(3))
    assert valid.staleness == 7 - base_version


@pytest.mark.parametrize("round_id, base_version, reason", [
    (4, 3, v.REJECT_TOO_STALE), (1, 0, v.REJECT_TOO_STALE),  # 4 and 7 versions behind, S = 3
    (9, 8, v.REJECT_WRONG_MODEL_VERSION),  # a version the server never announced
    (5, 5, v.REJECT_LATE), (8, 6, v.REJECT_WRONG_ROUND)])  # round and base version disagree
def test_update_outside_the_window_is_rejected_with_its_reason(round_id: int, base_version: int, reason: str) -> None:
    with pytest.raises(UpdateRejected) as caught:
        validate_update(_update(round_id, base_version), topic_device="dev-1", ctx=_ctx(3))
    assert caught.value.reason == reason


def test_a_synchronous_round_still_refuses_past_versions_and_second_reports() -> None:
    with pytest.raises(UpdateRejected) as caught:
        validate_update(_update(7, 6), topic_device="dev-1", ctx=_ctx(None))
    assert caught.value.reason == v.REJECT_LATE
    sync, buffered = _ctx(None), _ctx(3)
    for ctx in (sync, buffered):
        ctx.mark_accepted(_update(8, 7))
    with pytest.raises(UpdateRejected) as caught:
        validate_update(_update(8, 7, update_id="u-2"), topic_device="dev-1", ctx=sync)
    assert caught.value.reason == v.REJECT_DUPLICATE
    # FedBuff: a fast device's second update of the same step counts; a redelivery of the first does not
    assert validate_update(_update(8, 7, update_id="u-2"), topic_device="dev-1", ctx=buffered).staleness == 0
    with pytest.raises(UpdateRejected) as caught:
        validate_update(_update(8, 7), topic_device="dev-1", ctx=buffered)
    assert caught.value.reason == v.REJECT_DUPLICATE


@pytest.mark.parametrize("bad", [-1, True, 1.5])
def test_context_refuses_a_bad_max_staleness(bad: object) -> None:
    with pytest.raises(ConfigError):
        _ctx(bad)  # type: ignore[arg-type]


# -- wire, CLI, device options -----------------------------------------------------------------
def _announcement(task: str) -> Announcement:
    return Announcement(run_id="r", round_id=2, model_version=1, strategy="fedbuff", task=task, selected=("a",),
                        deadline_unix_s=1.0, settings=RoundSettings(), uplink_codec=CodecSpec("dense"),
                        payload_kind="none", downlink_codec=CodecSpec("dense"), base_version=None, payload=b"")


def test_continuous_task_travels_typed_and_unknown_tasks_are_refused() -> None:
    decoded = decode(encode(_announcement(TASK_TRAIN_CONTINUOUS)))
    assert isinstance(decoded, Announcement) and decoded.task == TASK_TRAIN_CONTINUOUS
    with pytest.raises(WireError, match="task"):
        _announcement("train_forever")


def _args(*flags: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_round_args(parser)
    args = parser.parse_args(["--lr", "0.1", "--momentum", "0", *flags])
    args.weight_decay = 0.0
    return args


def test_cli_builds_fedbuff_from_its_flags() -> None:
    strategy = make_strategy_from_args(_args("--strategy", "fedbuff", "--buffer", "3", "--max-staleness", "4",
                                             "--staleness-weight", "const", "--server-lr", "0.5"))
    assert isinstance(strategy, FedBuff)
    assert (strategy.buffer_size, strategy.max_staleness, str(strategy.staleness_weight)) == (3, 4, "const")
    assert strategy.server_hyper.server_lr == 0.5


@pytest.mark.parametrize("flags, problem", [
    (("--strategy", "fedbuff", "--aggregation", "median"), "median"),
    (("--strategy", "fedbuff", "--workers", "2"), "workers"),
    (("--strategy", "fedbuff", "--dp-clip", "1", "--dp-noise-multiplier", "1"), "fedbuff"),
    (("--strategy", "fedbuff", "--max-staleness", "-1"), "staleness"),
    (("--strategy", "fedbuff", "--staleness-weight", "poly:a=x"), "a='x' is not a number"),
    (("--buffer", "3",), "--strategy fedbuff")])
def test_cli_refuses_what_fedbuff_cannot_do(flags: tuple[str, ...], problem: str) -> None:
    with pytest.raises(ConfigError, match=problem):
        make_strategy_from_args(_args(*flags))


@pytest.mark.parametrize("bad", [0.5, 0, -2, float("nan"), float("inf"), 1e9, True])
def test_slowdown_is_checked(bad: float, tmp_path) -> None:  # noqa: ANN001
    with pytest.raises(ConfigError, match="slowdown"):
        DeviceConfig(fleet="f", device_id="d", state_dir=tmp_path, partition=PartitionSpec.parse("iid"), slowdown=bad)
    assert check_slowdown(5) == 5.0


def test_stragglers_flag_parses_k_and_f() -> None:
    assert _stragglers("3:5") == (3, 5.0)
    for bad in ("3", "0:5", "x:5", "3:0.5", "3:x", "-1:2"):
        with pytest.raises(argparse.ArgumentTypeError):
            _stragglers(bad)
