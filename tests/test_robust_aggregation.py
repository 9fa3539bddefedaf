"""Robust aggregation rules against their definitions, written plainly; the strategy wrapper; the
refusals at start; the adversarial device's transforms."""
from __future__ import annotations

import argparse

import numpy as np
import pytest

from edgetrain.aggregator.cli import add_round_args, make_strategy_from_args
from edgetrain.aggregator.robust import clip_to_norm, coordinate_median, krum_scores, multi_krum, trimmed_mean
from edgetrain.aggregator.robust_strategy import AggregationRule, RobustAggregation
from edgetrain.aggregator.strategy import FedAvg, FedAvgM
from edgetrain.sdk.attack import Attack
from edgetrain.sdk.errors import ConfigError

RNG = np.random.default_rng(7)
UPDATES = RNG.normal(size=(7, 5)).astype(np.float32)
UPDATES[2] *= 50.0  # an outlier, so that every rule differs from the mean


def test_median_is_the_middle_value_per_coordinate() -> None:
    expected = [sorted(UPDATES[:, j])[3] for j in range(5)]  # 7 values: the 4th smallest
    np.testing.assert_allclose(coordinate_median(UPDATES), expected, rtol=1e-6)
    even = UPDATES[:6]
    expected_even = [(sorted(even[:, j])[2] + sorted(even[:, j])[3]) / 2 for j in range(5)]
    np.testing.assert_allclose(coordinate_median(even), expected_even, rtol=1e-6)


@pytest.mark.parametrize("beta, dropped", [(0.0, 0), (0.15, 1), (0.3, 2), (0.49, 3)])
def test_trimmed_mean_drops_floor_beta_n_from_each_end(beta: float, dropped: int) -> None:
    expected = []
    for j in range(5):
        column = sorted(float(v) for v in UPDATES[:, j])
        kept = column[dropped:len(column) - dropped]
        expected.append(sum(kept) / len(kept))
    np.testing.assert_allclose(trimmed_mean(UPDATES, beta), expected, rtol=1e-5)


def test_krum_scores_sum_the_n_minus_f_minus_2_nearest_squared_distances() -> None:
    f = 1
    n = len(UPDATES)
    for i in range(n):
        distances = sorted(float(np.sum((UPDATES[i].astype(np.float64) - UPDATES[j]) ** 2)) for j in range(n) if j != i)
        assert krum_scores(UPDATES, f)[i] == pytest.approx(sum(distances[:n - f - 2]), rel=1e-9)


@pytest.mark.parametrize("m", [1, 3, None])
def test_multi_krum_averages_the_m_best_scored_updates(m: int | None) -> None:
    f = 2
    n = len(UPDATES)
    scores = []
    for i in range(n):
        distances = sorted(float(np.sum((UPDATES[i].astype(np.float64) - UPDATES[j]) ** 2)) for j in range(n) if j != i)
        scores.append(sum(distances[:n - f - 2]))
    best = sorted(range(n), key=lambda i: scores[i])[:(n - f if m is None else m)]
    assert 2 not in best  # the outlier is never chosen
    np.testing.assert_allclose(multi_krum(UPDATES, f, m), UPDATES[best].mean(axis=0), rtol=1e-5)


def test_clip_to_norm_scales_only_long_updates() -> None:
    long = np.array([3.0, 4.0], dtype=np.float32)
    clipped, scaled = clip_to_norm(long, 1.0)
    assert scaled and np.allclose(clipped, [0.6, 0.8])
    short, scaled = clip_to_norm(long, 10.0)
    assert not scaled and np.array_equal(short, long)


def test_krum_refuses_too_few_updates() -> None:
    with pytest.raises(ConfigError, match="at least 7"):
        multi_krum(UPDATES[:6], 2)


@pytest.mark.parametrize("spec, text", [
    ("mean", "mean"), ("median", "median"), ("trimmed-mean:beta=0.2", "trimmed-mean:beta=0.2"),
    ("multi-krum:f=2", "multi-krum:f=2"), ("multi-krum:f=1,m=3", "multi-krum:f=1,m=3"),
    ("norm-bound:max=2.5", "norm-bound:max=2.5")])
def test_rule_specs_round_trip(spec: str, text: str) -> None:
    assert str(AggregationRule.parse(spec)) == text


@pytest.mark.parametrize("spec, message", [
    ("trimmed-mean:beta=0.5", "beta < 0.5"), ("trimmed-mean", "needs beta"), ("multi-krum", "needs f"),
    ("multi-krum:f=-1", "f must be"), ("multi-krum:f=1.5", "not an integer"), ("norm-bound:max=0", "> 0"),
    ("norm-bound:max=nan", "finite"), ("median:beta=0.1", "takes no beta"), ("krum:f=1", "unknown rule"),
    ("multi-krum:f=1,f=2", "repeated"), ("trimmed-mean:beta", "key=value")])
def test_bad_rule_specs_are_refused_naming_the_problem(spec: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        AggregationRule.parse(spec)


def _args(*flags: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_round_args(parser)
    args = parser.parse_args(list(flags))
    args.lr, args.momentum = 0.05, 0.0
    return args


@pytest.mark.parametrize("flags, message", [
    (("--aggregation", "multi-krum:f=2", "--min-devices", "6"), "at least 7 updates"),
    (("--aggregation", "multi-krum:f=1,m=5", "--min-devices", "5"), "at least 6 updates"),
    (("--aggregation", "trimmed-mean:beta=0.1", "--min-devices", "5"), "plain mean"),
    (("--aggregation", "median", "--strategy", "large-batch"), "FL strategies")])
def test_combinations_that_cannot_work_are_refused_at_start(flags: tuple[str, ...], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        make_strategy_from_args(_args(*flags))


def test_the_cli_wraps_the_named_strategy_and_mean_leaves_it_alone() -> None:
    plain = make_strategy_from_args(_args("--strategy", "fedavgm"))
    assert isinstance(plain, FedAvgM)
    wrapped = make_strategy_from_args(_args("--strategy", "fedavgm", "--aggregation", "multi-krum:f=1",
                                            "--min-devices", "5"))
    assert isinstance(wrapped, RobustAggregation) and isinstance(wrapped.inner, FedAvgM)
    assert wrapped.name == "fedavgm" and str(wrapped.rule) == "multi-krum:f=1"


def _run_round(strategy, params: np.ndarray, updates: np.ndarray, examples: list[int]):
    strategy.begin_round(params)
    for i, (update, count) in enumerate(zip(updates, examples)):
        strategy.accumulate(update, count, f"d{i}")
    return strategy.aggregate(params)


def test_wrapper_hands_the_rule_result_to_the_wrapped_server_step() -> None:
    params = np.zeros(5, dtype=np.float32)
    rule = AggregationRule.parse("median")
    robust = RobustAggregation(FedAvgM(server_lr=0.5, server_momentum=0.9, min_devices=3), rule)
    reference = FedAvgM(server_lr=0.5, server_momentum=0.9, min_devices=3)
    examples = [10, 20, 30, 40, 50, 60, 70]
    for _ in range(2):  # the second round exercises the wrapped optimiser's momentum state
        new, info = _run_round(robust, params, UPDATES, examples)
        expected, _ = _run_round(reference, params, coordinate_median(UPDATES)[None, :], [1])
        np.testing.assert_array_equal(new, expected)
        params = new
    assert info.num_updates == 7 and info.total_examples == sum(examples)
    assert info.rule_metrics == {"aggregation": "median"}
    assert robust.state_meta()["aggregation"] == "median"


def test_multi_krum_records_which_devices_it_left_out() -> None:
    robust = RobustAggregation(FedAvg(min_devices=6), AggregationRule.parse("multi-krum:f=1,m=5"))
    _, info = _run_round(robust, np.zeros(5, dtype=np.float32), UPDATES, [1] * 7)
    assert "d2" in info.rule_metrics["krum_left_out"] and len(info.rule_metrics["krum_left_out"]) == 2


def test_norm_bound_streams_clipped_updates_into_the_weighted_mean() -> None:
    params = np.zeros(5, dtype=np.float32)
    robust = RobustAggregation(FedAvg(min_devices=1), AggregationRule.parse("norm-bound:max=1"))
    examples = [1, 2, 3, 4, 5, 6, 7]
    new, info = _run_round(robust, params, UPDATES, examples)
    clipped = [u * min(1.0, 1.0 / float(np.linalg.norm(u.astype(np.float64)))) for u in UPDATES]
    expected = sum(w * c for w, c in zip(examples, clipped)) / sum(examples)
    np.testing.assert_allclose(new, expected, rtol=1e-5)
    assert robust._updates == []  # nothing buffered: it streams
    assert info.rule_metrics["norm_bounded"] == sum(np.linalg.norm(u) > 1 for u in UPDATES)


def test_a_checkpoint_resumes_only_with_the_same_rule() -> None:
    robust = RobustAggregation(FedAvg(min_devices=3), AggregationRule.parse("median"))
    _run_round(robust, np.zeros(5, dtype=np.float32), UPDATES, [1] * 7)
    other = RobustAggregation(FedAvg(min_devices=3), AggregationRule.parse("trimmed-mean:beta=0.34"))
    with pytest.raises(ConfigError, match="same --aggregation"):
        other.load_state_dict(robust.state_dict(), robust.state_meta())
    same = RobustAggregation(FedAvg(min_devices=3), AggregationRule.parse("median"))
    same.load_state_dict(robust.state_dict(), robust.state_meta())


def test_attacks_transform_the_update_or_the_labels() -> None:
    update = np.array([1.0, -2.0, 0.5], dtype=np.float32)
    rng = np.random.default_rng(0)
    np.testing.assert_array_equal(Attack("sign-flip").poison_update(update, rng), -4 * update)  # RSA's sigma
    np.testing.assert_array_equal(Attack("sign-flip", 1).poison_update(update, rng), -update)
    np.testing.assert_array_equal(Attack("scale").poison_update(update, rng), 100 * update)
    noise = Attack("random").poison_update(update, np.random.default_rng(0))
    np.testing.assert_array_equal(noise, np.random.default_rng(0).standard_normal(3, dtype=np.float32))
    np.testing.assert_array_equal(Attack("label-flip").poison_update(update, rng), 10 * update)  # Bhagoji's K
    np.testing.assert_array_equal(Attack("label-flip", 1).poison_update(update, rng), update)
    labels = np.array([0, 3, 9], dtype=np.int64)
    np.testing.assert_array_equal(Attack("label-flip").poison_labels(labels, 10), [9, 6, 0])
    np.testing.assert_array_equal(Attack("scale").poison_labels(labels, 10), labels)
    with pytest.raises(ConfigError, match="unknown attack"):
        Attack("nonsense")


def test_an_attack_spec_parses_its_boost_and_refuses_bad_input() -> None:
    assert Attack.parse("label-flip:boost=2.5") == Attack("label-flip", 2.5)
    assert Attack.parse(" scale ") == Attack("scale")
    for spec in ("label-flip", "sign-flip:boost=1", "scale:boost=0.5", "label-flip:boost=3.14159265"):
        assert Attack.parse(str(Attack.parse(spec))) == Attack.parse(spec)  # a device's flag reads back
    for bad, problem in (("random:boost=2", "takes no boost"), ("scale:boost=0", "boost must be"),
                         ("scale:boost=-3", "boost must be"), ("scale:boost=nan", "boost must be"),
                         ("scale:boost=inf", "boost must be"), ("scale:boost=1e7", "boost must be"),
                         ("scale:boost=x", "not a number"), ("scale:gain=2", "KIND:boost=B"),
                         ("scale:boost", "KIND:boost=B"), ("bogus:boost=2", "unknown attack")):
        with pytest.raises(ConfigError, match=problem):
            Attack.parse(bad)


def test_device_attack_flag_takes_a_boost() -> None:
    from edgetrain.sdk.device_cli import attack_spec

    assert attack_spec("label-flip:boost=10") == Attack("label-flip", 10.0)
    with pytest.raises(argparse.ArgumentTypeError, match="takes no boost"):
        attack_spec("random:boost=3")


def test_simulate_attackers_flag_parses_count_and_kind() -> None:
    from edgetrain.aggregator.simulate import _attackers

    count, attack = _attackers("2:scale")
    assert count == 2 and attack == Attack("scale")
    assert _attackers("3:label-flip:boost=7") == (3, Attack("label-flip", 7.0))
    for bad in ("scale", "0:scale", "x:scale", "2:bogus", "2:scale:boost=-1", "2:random:boost=2"):
        with pytest.raises(argparse.ArgumentTypeError):
            _attackers(bad)
