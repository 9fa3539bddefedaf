"""Large-batch server optimisers against torch.optim.SGD and the papers' formulas."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from edgetrain.aggregator.large_batch import LargeBatch
from edgetrain.aggregator.server_optim import LargeBatchHyper, lars_step, learning_rate, sgd_step
from edgetrain.sdk.errors import ConfigError


@pytest.mark.parametrize("momentum,nesterov,wd", [(0.0, False, 0.0), (0.9, False, 0.0), (0.9, True, 1e-3),
                                                   (0.5, False, 5e-4)])
def test_sgd_step_matches_torch_sgd_over_several_steps(momentum: float, nesterov: bool, wd: float) -> None:
    rng = np.random.default_rng(0)
    w0 = rng.normal(size=50).astype(np.float32)
    grads = [rng.normal(size=50).astype(np.float32) for _ in range(4)]
    hyper = LargeBatchHyper(base_lr=0.1, momentum=momentum, nesterov=nesterov, weight_decay=wd)
    w, state = w0.copy(), {}
    for g in grads:
        w, state = sgd_step(w, g, state, hyper, lr=0.1)
    tw = torch.tensor(w0, requires_grad=True)
    opt = torch.optim.SGD([tw], lr=0.1, momentum=momentum, nesterov=nesterov, weight_decay=wd)
    for g in grads:
        tw.grad = torch.tensor(g)
        opt.step()
    np.testing.assert_allclose(w, tw.detach().numpy(), rtol=1e-6, atol=1e-6)


def test_lars_scales_each_matrix_by_its_trust_ratio_and_leaves_biases() -> None:
    shapes = [(3, 4), (4,)]
    rng = np.random.default_rng(1)
    w = rng.normal(size=16).astype(np.float32)
    g = rng.normal(size=16).astype(np.float32)
    hyper = LargeBatchHyper(optimizer="lars", momentum=0.9, trust_coefficient=0.01, weight_decay=0.0)
    new, state = lars_step(w, g, {}, hyper, lr=2.0, shapes=shapes)
    trust = 0.01 * np.linalg.norm(w[:12]) / np.linalg.norm(g[:12])
    np.testing.assert_allclose(new[:12], w[:12] - 2.0 * trust * g[:12], rtol=1e-5)
    np.testing.assert_allclose(new[12:], w[12:] - 2.0 * g[12:], rtol=1e-6)
    # second step: momentum on the scaled step
    new2, _ = lars_step(new, g, state, hyper, lr=2.0, shapes=shapes)
    trust2 = 0.01 * np.linalg.norm(new[:12]) / np.linalg.norm(g[:12])
    expected = new[:12] - (0.9 * state["momentum"][:12] + 2.0 * trust2 * g[:12])
    np.testing.assert_allclose(new2[:12], expected, rtol=1e-5)


def test_lars_refuses_shapes_that_do_not_cover_the_vector() -> None:
    with pytest.raises(ConfigError, match="cover"):
        lars_step(np.zeros(10, np.float32), np.ones(10, np.float32), {}, LargeBatchHyper(optimizer="lars"),
                  lr=0.1, shapes=[(3, 3)])


def test_linear_scaling_and_gradual_warmup() -> None:
    hyper = LargeBatchHyper(base_lr=0.1, scale_lr=True, reference_batch=32, warmup_steps=4)
    # global batch 320 → target 1.0, reached linearly from 0.1 over 4 steps
    assert [round(learning_rate(hyper, s, 320), 6) for s in range(6)] == [0.325, 0.55, 0.775, 1.0, 1.0, 1.0]
    assert learning_rate(LargeBatchHyper(base_lr=0.1), 0, 320) == 0.1


def test_bad_hyper_parameters_fail_fast() -> None:
    for kwargs in ({"optimizer": "adam"}, {"base_lr": 0}, {"momentum": 1.0}, {"nesterov": True, "momentum": 0},
                   {"weight_decay": -1}, {"warmup_steps": -1}):
        with pytest.raises(ConfigError):
            LargeBatchHyper(**kwargs)


def test_large_batch_strategy_averages_by_examples_and_waits_only_for_workers() -> None:
    strategy = LargeBatch(shapes=[(2, 2)], min_devices=2, backup_devices=1,
                          hyper=LargeBatchHyper(base_lr=0.5, momentum=0.0))
    plan = strategy.configure_round(1, ["a", "b", "c", "d"], np.random.default_rng(0))
    assert len(plan.selected) == 4 and plan.task == "gradient"  # C=1: all 4 work, no room for a backup
    strategy = LargeBatch(shapes=[(2, 2)], fraction=0.5, min_devices=2, backup_devices=1,
                          hyper=LargeBatchHyper(base_lr=0.5, momentum=0.0))
    plan = strategy.configure_round(1, ["a", "b", "c", "d"], np.random.default_rng(0))
    assert len(plan.selected) == 3  # 2 workers + 1 backup
    w = np.ones(4, np.float32)
    strategy.begin_round(w)
    g1, g2 = np.array([1, 0, 0, 0], np.float32), np.array([0, 1, 0, 0], np.float32)
    strategy.accumulate(g1, 10, "a")
    assert strategy.accepts_more()
    strategy.accumulate(g2, 30, "b")
    assert not strategy.accepts_more()
    with pytest.raises(ConfigError, match="late"):
        strategy.accumulate(g2, 30, "c")
    new, info = strategy.aggregate(w)
    np.testing.assert_allclose(new, w - 0.5 * (10 * g1 + 30 * g2) / 40, rtol=1e-6)
    assert info.num_updates == 2 and info.total_examples == 40


def test_large_batch_state_round_trips_and_refuses_other_settings() -> None:
    hyper = LargeBatchHyper(momentum=0.9)
    a = LargeBatch(shapes=[(3,)], hyper=hyper)
    a.configure_round(1, ["x", "y"], np.random.default_rng(0))
    a.begin_round(np.zeros(3, np.float32))
    a.accumulate(np.ones(3, np.float32), 1, "x")
    a.aggregate(np.zeros(3, np.float32))
    b = LargeBatch(shapes=[(3,)], hyper=hyper)
    b.load_state_dict(a.state_dict(), a.state_meta())
    assert b.steps_taken == 1 and np.array_equal(b.state_dict()["momentum"], a.state_dict()["momentum"])
    with pytest.raises(ConfigError, match="same settings"):
        LargeBatch(shapes=[(3,)], batch_size=64, hyper=hyper).load_state_dict(a.state_dict(), a.state_meta())
