"""Strategy lifecycle: selection, streaming aggregation, server optimisers, save/restore."""
from __future__ import annotations

import json

import numpy as np
import pytest

from edgetrain.aggregator.aggregation import ServerHyper, WeightedMean, fedadam_step, init_server_state
from edgetrain.aggregator.strategy import (
    STRATEGIES,
    FedAdam,
    FedAvg,
    FedAvgM,
    FedProx,
    FedYogi,
    Strategy,
    make_strategy,
    strategy_names,
)
from edgetrain.sdk.errors import ConfigError
from edgetrain.sdk.round_settings import RoundSettings

DEVICES = [f"dev-{i:02d}" for i in range(30)]


def _round(strategy: Strategy, params: np.ndarray, deltas: list[np.ndarray], examples: list[int]) -> np.ndarray:
    strategy.begin_round(params)
    for i, (delta, count) in enumerate(zip(deltas, examples)):
        strategy.accumulate(delta, count, f"dev-{i}")
    new_params, _ = strategy.aggregate(params)
    return new_params


def _deltas(rng: np.random.Generator, count: int, size: int) -> tuple[list[np.ndarray], list[int]]:
    return ([rng.standard_normal(size).astype(np.float32) * 0.1 for _ in range(count)],
            [int(x) for x in rng.integers(10, 600, size=count)])


@pytest.mark.parametrize("fraction, min_devices, live, expected", [
    (0.1, 2, 30, 3),  # 0.1 * 30 must be 3, not 4 (floating point)
    (0.3, 2, 10, 3),
    (0.25, 2, 10, 3),  # ceil(2.5)
    (0.1, 5, 30, 5),  # min devices wins
    (1.0, 1, 7, 7),
    (0.5, 4, 4, 4),
])
def test_configure_round_selects_fraction_with_minimum(fraction: float, min_devices: int, live: int,
                                                       expected: int) -> None:
    strategy = FedAvg(fraction=fraction, min_devices=min_devices)
    plan = strategy.configure_round(3, DEVICES[:live], np.random.default_rng(0))
    assert plan.round_id == 3
    assert len(plan.selected) == expected
    assert len(set(plan.selected)) == expected
    assert set(plan.selected) <= set(DEVICES[:live])
    assert list(plan.selected) == sorted(plan.selected)


def test_configure_round_is_deterministic_given_rng_and_ignores_order() -> None:
    strategy = FedAvg(fraction=0.2, min_devices=2)
    first = strategy.configure_round(1, DEVICES, np.random.default_rng(42))
    shuffled = list(reversed(DEVICES)) + DEVICES[:5]  # another order, with repeats
    again = strategy.configure_round(1, shuffled, np.random.default_rng(42))
    assert first.selected == again.selected
    others = {strategy.configure_round(1, DEVICES, np.random.default_rng(seed)).selected for seed in range(10)}
    assert len(others) > 1  # the rng, not a fixed rule, picks the devices


def test_configure_round_needs_min_devices_and_a_generator() -> None:
    strategy = FedAvg(fraction=0.5, min_devices=3)
    assert not strategy.ready(2) and strategy.ready(3)
    with pytest.raises(ConfigError, match="at least 3"):
        strategy.configure_round(0, DEVICES[:2], np.random.default_rng(0))
    with pytest.raises(ConfigError, match="Generator"):
        strategy.configure_round(0, DEVICES, np.random.RandomState(0))  # type: ignore[arg-type]


def test_round_settings_carry_client_settings_and_prox_mu() -> None:
    plan = FedAvg(local_epochs=2, batch_size=16, lr=0.1, momentum=0.9).configure_round(
        0, DEVICES, np.random.default_rng(0))
    assert plan.task == "train"
    assert plan.settings == RoundSettings(local_epochs=2, batch_size=16, lr=0.1, momentum=0.9)
    prox = FedProx(mu=0.05, lr=0.02).configure_round(0, DEVICES, np.random.default_rng(0))
    assert prox.settings.prox_mu == 0.05 and prox.settings.lr == 0.02
    assert plan.settings.prox_mu == 0.0
    short = FedAvg(local_steps=19).configure_round(0, DEVICES, np.random.default_rng(0))
    assert short.settings.local_steps == 19


@pytest.mark.parametrize("bad", [dict(lr=float("nan")), dict(momentum=1.0), dict(batch_size=0), dict(local_steps=0),
                                 dict(local_epochs=True)])
def test_a_setting_the_devices_would_refuse_is_refused_by_the_strategy(bad: dict) -> None:
    with pytest.raises(ConfigError, match=next(iter(bad))):
        FedAvg(**bad)


def test_fedavg_is_example_weighted_mean_of_deltas() -> None:
    rng = np.random.default_rng(5)
    params = rng.standard_normal(40).astype(np.float32)
    deltas, examples = _deltas(rng, 6, 40)
    strategy = FedAvg()
    strategy.begin_round(params)
    for i, (delta, count) in enumerate(zip(deltas, examples)):
        strategy.accumulate(delta, count, f"dev-{i}")
    new_params, info = strategy.aggregate(params)
    expected = params + np.average(np.stack(deltas), axis=0, weights=examples)
    np.testing.assert_allclose(new_params, expected, rtol=1e-6, atol=1e-6)
    assert info.num_updates == 6 and info.total_examples == sum(examples)
    assert info.rounds_aggregated == 1 and info.server_optimizer == "fedavg"
    assert info.step_norm == pytest.approx(float(np.linalg.norm(expected - params)), rel=1e-5)


def test_fedavgm_and_fedadam_apply_their_server_optimizer() -> None:
    rng = np.random.default_rng(6)
    params = rng.standard_normal(12).astype(np.float32)
    rounds = [_deltas(rng, 3, 12) for _ in range(3)]

    momentum = FedAvgM(server_lr=0.5, server_momentum=0.8)
    adam = FedAdam(server_lr=0.02, beta1=0.9, beta2=0.99, tau=1e-3)
    hyper = ServerHyper(server_lr=0.02, beta1=0.9, beta2=0.99, tau=1e-3)
    w_m, w_a, velocity = params.copy(), params.copy(), np.zeros(12)
    ref_m, ref_a, adam_state = params.astype(np.float64), params.copy(), init_server_state("fedadam", 12, hyper)
    for deltas, examples in rounds:
        w_m = _round(momentum, w_m, deltas, examples)
        w_a = _round(adam, w_a, deltas, examples)
        mean = np.average(np.stack(deltas).astype(np.float64), axis=0, weights=examples)
        velocity = 0.8 * velocity + mean  # Hsu et al. 2019
        ref_m = ref_m + 0.5 * velocity
        ref_a, adam_state = fedadam_step(ref_a, mean.astype(np.float32), adam_state, hyper)
    np.testing.assert_allclose(w_m, ref_m, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(w_a, ref_a, rtol=1e-5, atol=1e-6)


def test_lifecycle_misuse_fails_fast() -> None:
    strategy = FedAvg()
    params = np.zeros(4, np.float32)
    with pytest.raises(ConfigError, match="begin_round"):
        strategy.accumulate(np.zeros(4, np.float32), 1, "a")
    strategy.begin_round(params)
    with pytest.raises(ConfigError, match="no update"):
        strategy.aggregate(params)
    strategy.accumulate(np.ones(4, np.float32), 3, "a")
    with pytest.raises(ConfigError, match="already reported"):
        strategy.accumulate(np.ones(4, np.float32), 3, "a")
    for bad in (0, -2, True, 1.5):
        with pytest.raises(ConfigError, match="num_examples"):
            strategy.accumulate(np.ones(4, np.float32), bad, "b")  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="float32"):
        strategy.begin_round(np.zeros(4, np.float64))
    with pytest.raises(ConfigError, match="4"):
        strategy.begin_round(np.zeros(5, np.float32))


def test_begin_round_again_restarts_the_round() -> None:
    strategy = FedAvg()
    params = np.zeros(3, np.float32)
    strategy.begin_round(params)
    strategy.accumulate(np.full(3, 100.0, np.float32), 5, "late")
    strategy.begin_round(params)  # a retried round forgets the first attempt
    strategy.accumulate(np.ones(3, np.float32), 5, "late")
    new_params, info = strategy.aggregate(params)
    np.testing.assert_array_equal(new_params, np.ones(3, np.float32))
    assert info.num_updates == 1


def test_partial_sums_from_workers_equal_one_accumulator() -> None:
    rng = np.random.default_rng(7)
    params = np.zeros(20, np.float32)
    deltas, examples = _deltas(rng, 6, 20)
    direct = _round(FedAvg(), params, deltas, examples)
    reducer = FedAvg()
    reducer.begin_round(params)
    for half in (range(0, 3), range(3, 6)):
        worker = WeightedMean(20)
        for i in half:
            worker.add(deltas[i], examples[i])
        reducer.merge_partial(worker, sum(examples[i] for i in half))
    merged, info = reducer.aggregate(params)
    np.testing.assert_allclose(merged, direct, rtol=1e-6, atol=1e-7)
    assert info.num_updates == 6 and info.total_examples == sum(examples)


@pytest.mark.parametrize("name", ["fedavgm", "fedadam", "fedyogi"])
def test_state_restore_continues_exactly(name: str) -> None:
    rng = np.random.default_rng(8)
    params = rng.standard_normal(16).astype(np.float32)
    rounds = [_deltas(rng, 4, 16) for _ in range(4)]
    settings = dict(fraction=0.5, lr=0.03, server_lr=0.05)
    uninterrupted = make_strategy(name, **settings)
    w = params
    for deltas, examples in rounds:
        w = _round(uninterrupted, w, deltas, examples)

    first = make_strategy(name, **settings)
    w_resumed = params
    for deltas, examples in rounds[:2]:
        w_resumed = _round(first, w_resumed, deltas, examples)
    arrays = {k: v.copy() for k, v in first.state_dict().items()}
    meta = json.loads(json.dumps(first.state_meta()))  # must survive JSON
    second = make_strategy(name, **settings)
    second.load_state_dict(arrays, meta)
    for deltas, examples in rounds[2:]:
        w_resumed = _round(second, w_resumed, deltas, examples)
    np.testing.assert_array_equal(w_resumed, w)
    assert second.state_meta()["rounds_aggregated"] == 4


def test_load_state_dict_refuses_a_different_run() -> None:
    source = FedAdam(server_lr=0.01)
    source.begin_round(np.zeros(3, np.float32))
    source.accumulate(np.ones(3, np.float32), 1, "a")
    source.aggregate(np.zeros(3, np.float32))
    arrays, meta = source.state_dict(), source.state_meta()
    with pytest.raises(ConfigError, match="differ"):
        FedAdam(server_lr=0.02).load_state_dict(arrays, meta)
    with pytest.raises(ConfigError, match="strategy"):
        FedYogi(server_lr=0.01).load_state_dict(arrays, meta)
    with pytest.raises(ConfigError, match="expected"):
        FedAdam(server_lr=0.01).load_state_dict({"m": arrays["m"]}, meta)
    fresh = FedAvg()
    fresh.load_state_dict(fresh.state_dict(), fresh.state_meta())  # an empty state restores too
    assert fresh.state_meta()["rounds_aggregated"] == 0


def test_make_strategy_registry() -> None:
    assert set(strategy_names()) == {"fedavg", "fedavgm", "fedadam", "fedyogi", "fedadagrad", "fedprox"}
    for name, cls in STRATEGIES.items():
        built = make_strategy(name.upper(), fraction=0.5)
        assert type(built) is cls and built.client.fraction == 0.5
    with pytest.raises(ConfigError, match="fedadam, fedavg"):
        make_strategy("scaffold")
    with pytest.raises(ConfigError, match="server_momentum"):
        make_strategy("fedavg", server_momentum=0.9)
    prox = make_strategy("fedprox", mu=0.1)
    assert isinstance(prox, FedProx) and prox.mu == 0.1


@pytest.mark.parametrize("bad", [dict(fraction=0.0), dict(fraction=1.5), dict(min_devices=0),
                                 dict(local_epochs=0), dict(batch_size=2.5), dict(lr=0.0), dict(momentum=1.0),
                                 dict(local_steps=0), dict(local_steps=2.0), dict(local_steps=True)])
def test_client_settings_are_validated(bad: dict) -> None:
    with pytest.raises(ConfigError):
        FedAvg(**bad)


def test_fedprox_mu_is_validated() -> None:
    with pytest.raises(ConfigError, match="mu"):
        FedProx(mu=-1.0)
