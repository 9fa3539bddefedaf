"""Streaming weighted mean and the server optimisers, against hand-written references."""
from __future__ import annotations

import math
import tracemalloc

import numpy as np
import pytest

from edgetrain.aggregator.aggregation import (
    SERVER_STEPS,
    ServerHyper,
    WeightedMean,
    fedadagrad_step,
    fedadam_step,
    fedavg_step,
    fedavgm_step,
    fedyogi_step,
    init_server_state,
)
from edgetrain.sdk.errors import ConfigError


def _vectors(rng: np.random.Generator, count: int, size: int) -> tuple[list[np.ndarray], np.ndarray]:
    vectors = [rng.standard_normal(size).astype(np.float32) for _ in range(count)]
    weights = rng.integers(1, 1000, size=count).astype(np.float64)
    return vectors, weights


def test_weighted_mean_matches_numpy_average() -> None:
    rng = np.random.default_rng(0)
    vectors, weights = _vectors(rng, 17, 501)
    mean = WeightedMean(501)
    for vector, weight in zip(vectors, weights):
        mean.add(vector, weight)
    expected = np.average(np.stack(vectors).astype(np.float64), axis=0, weights=weights)
    result = mean.result()
    assert result.dtype == np.float32 and result.shape == (501,)
    np.testing.assert_allclose(result, expected, rtol=1e-6, atol=1e-6)
    assert mean.count == 17
    assert mean.total_weight == pytest.approx(weights.sum())


def test_merge_is_associative_and_matches_one_accumulator() -> None:
    rng = np.random.default_rng(1)
    vectors, weights = _vectors(rng, 9, 64)

    def partial(indices: range) -> WeightedMean:
        mean = WeightedMean(64)
        for i in indices:
            mean.add(vectors[i], weights[i])
        return mean

    single = partial(range(9))
    left = partial(range(0, 3))
    left.merge(partial(range(3, 6)))
    left.merge(partial(range(6, 9)))  # (a + b) + c
    right_tail = partial(range(3, 6))
    right_tail.merge(partial(range(6, 9)))
    right = partial(range(0, 3))
    right.merge(right_tail)  # a + (b + c)
    for combined in (left, right):
        assert combined.count == single.count
        assert combined.total_weight == pytest.approx(single.total_weight)
        np.testing.assert_allclose(combined.weighted_sum, single.weighted_sum, rtol=1e-12)
        np.testing.assert_allclose(combined.result(), single.result(), rtol=1e-6)


def test_partial_sums_travel_between_workers() -> None:
    rng = np.random.default_rng(2)
    vectors, weights = _vectors(rng, 4, 10)
    worker = WeightedMean(10)
    for vector, weight in zip(vectors, weights):
        worker.add(vector, weight)
    rebuilt = WeightedMean.from_partial_sums(worker.weighted_sum, worker.total_weight, worker.count)
    np.testing.assert_array_equal(rebuilt.result(), worker.result())
    assert rebuilt.count == 4


def test_memory_is_o_model_not_o_devices() -> None:
    size, devices = 20_000, 100
    rng = np.random.default_rng(3)
    tracemalloc.start()
    try:
        mean = WeightedMean(size)
        for _ in range(devices):
            mean.add(rng.standard_normal(size).astype(np.float32), 2.0)
        current, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    float64_vector = size * 8
    # Keeping the vectors would cost devices * size * 4 bytes = 50x the float64 sum.
    assert current < 2 * float64_vector
    assert peak < 6 * float64_vector
    assert mean.count == devices


def test_weighted_mean_refuses_bad_input() -> None:
    mean = WeightedMean(4)
    with pytest.raises(ConfigError, match="no update"):
        mean.result()
    with pytest.raises(ConfigError, match="4 entries"):
        mean.add(np.zeros(5, np.float32), 1.0)
    for weight in (0.0, -1.0, float("nan"), float("inf")):
        with pytest.raises(ConfigError, match="weight"):
            mean.add(np.zeros(4, np.float32), weight)
    with pytest.raises(ConfigError, match="size"):
        mean.merge(WeightedMean(3))
    with pytest.raises(ConfigError):
        WeightedMean(0)


# ---- server optimisers: element-by-element references written straight from the papers ----------

def _reference_run(kind: str, params: list[float], deltas: list[list[float]], hyper: ServerHyper) -> list[float]:
    w = list(params)
    n = len(w)
    velocity, m, v = [0.0] * n, [0.0] * n, [hyper.tau ** 2] * n
    for delta in deltas:
        for i in range(n):
            d = delta[i]
            if kind == "fedavg":
                w[i] += hyper.server_lr * d
                continue
            if kind == "fedavgm":
                velocity[i] = hyper.momentum * velocity[i] + d
                w[i] += hyper.server_lr * velocity[i]
                continue
            m[i] = hyper.beta1 * m[i] + (1 - hyper.beta1) * d
            if kind == "fedadagrad":
                v[i] = v[i] + d * d
            elif kind == "fedadam":
                v[i] = hyper.beta2 * v[i] + (1 - hyper.beta2) * d * d
            elif kind == "fedyogi":
                sign = (v[i] - d * d > 0) - (v[i] - d * d < 0)
                v[i] = v[i] - (1 - hyper.beta2) * d * d * sign
            w[i] += hyper.server_lr * m[i] / (math.sqrt(v[i]) + hyper.tau)
    return w


@pytest.mark.parametrize("kind", sorted(SERVER_STEPS))
def test_server_optimizer_matches_reference(kind: str) -> None:
    rng = np.random.default_rng(4)
    hyper = ServerHyper(server_lr=0.5 if kind in ("fedavg", "fedavgm") else 0.05, momentum=0.7,
                        beta1=0.8, beta2=0.95, tau=1e-2)
    params = rng.standard_normal(6).astype(np.float32)
    deltas = [rng.standard_normal(6).astype(np.float32) * 0.1 for _ in range(4)]
    state = init_server_state(kind, 6, hyper)
    current = params
    for delta in deltas:
        keys_before = set(state)
        current, state = SERVER_STEPS[kind](current, delta, state, hyper)
        assert set(state) == keys_before
        assert current.dtype == np.float32
    expected = _reference_run(kind, params.astype(np.float64).tolist(),
                              [d.astype(np.float64).tolist() for d in deltas], hyper)
    np.testing.assert_allclose(current, expected, rtol=1e-5, atol=1e-6)


def test_step_functions_do_not_mutate_their_inputs() -> None:
    hyper = ServerHyper(server_lr=0.1, momentum=0.9)
    params = np.arange(5, dtype=np.float32)
    delta = np.ones(5, dtype=np.float32)
    for kind, step in SERVER_STEPS.items():
        state = init_server_state(kind, 5, hyper)
        state = {k: v + 0.5 for k, v in state.items()}  # non-trivial state
        saved_state = {k: v.copy() for k, v in state.items()}
        saved_params, saved_delta = params.copy(), delta.copy()
        step(params, delta, state, hyper)
        np.testing.assert_array_equal(params, saved_params)
        np.testing.assert_array_equal(delta, saved_delta)
        for key, value in saved_state.items():
            np.testing.assert_array_equal(state[key], value, err_msg=f"{kind} mutated {key}")


def test_fedadam_first_step_by_hand() -> None:
    # m = (1-β1)Δ; v = β2·τ² + (1-β2)Δ²; w += η·m/(√v + τ)  (Reddi et al. 2021, Alg. 2)
    hyper = ServerHyper(server_lr=0.01, beta1=0.9, beta2=0.99, tau=1e-3)
    delta = 0.1
    m = 0.1 * delta
    v = 0.99 * 1e-6 + 0.01 * delta ** 2
    expected_step = 0.01 * m / (math.sqrt(v) + 1e-3)
    params = np.array([1.0, -2.0], dtype=np.float32)
    new, state = fedadam_step(params, np.array([delta, -delta], np.float32), init_server_state("fedadam", 2, hyper),
                              hyper)
    np.testing.assert_allclose(new - params, [expected_step, -expected_step], rtol=1e-4)
    np.testing.assert_allclose(state["m"], [m, -m], rtol=1e-6)
    np.testing.assert_allclose(state["v"], [v, v], rtol=1e-6)


def test_adaptive_first_step_is_about_server_lr_for_large_deltas() -> None:
    # With |Δ| >> τ, Adam's first step is η(1-β1)/√(1-β2)·sign(Δ) whatever Δ's scale: the point of
    # adaptive server optimisers.
    hyper = ServerHyper(server_lr=0.01, beta1=0.9, beta2=0.99, tau=1e-6)
    params = np.zeros(3, np.float32)
    for scale in (1.0, 100.0):
        delta = np.array([scale, -scale, 3 * scale], np.float32)
        new, _ = fedadam_step(params, delta, init_server_state("fedadam", 3, hyper), hyper)
        per_unit = 0.01 * 0.1 / math.sqrt(0.01)
        np.testing.assert_allclose(new, np.sign(delta) * per_unit, rtol=1e-3)


def test_fedavg_is_plain_addition_and_stateless() -> None:
    params = np.array([1.0, 2.0], np.float32)
    new, state = fedavg_step(params, np.array([0.5, -1.0], np.float32), {}, ServerHyper())
    np.testing.assert_array_equal(new, [1.5, 1.0])
    assert state == {}


def test_steps_refuse_missing_state_and_wrong_sizes() -> None:
    params = np.zeros(3, np.float32)
    for step in (fedavgm_step, fedadam_step, fedyogi_step, fedadagrad_step):
        with pytest.raises(ConfigError, match="state lacks"):
            step(params, np.zeros(3, np.float32), {}, ServerHyper())
    with pytest.raises(ConfigError, match="delta"):
        fedavg_step(params, np.zeros(4, np.float32), {}, ServerHyper())
    with pytest.raises(ConfigError, match="unknown server optimizer"):
        init_server_state("sgd", 3, ServerHyper())


@pytest.mark.parametrize("bad", [dict(server_lr=0.0), dict(momentum=1.0), dict(beta1=-0.1), dict(beta2=1.0),
                                 dict(tau=0.0), dict(server_lr=float("nan"))])
def test_server_hyper_validates(bad: dict) -> None:
    with pytest.raises(ConfigError):
        ServerHyper(**bad)
