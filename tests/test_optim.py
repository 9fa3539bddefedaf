"""The SGD kernel (sdk/optim.py) against torch.optim.SGD and You et al.'s LARS formula."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from edgetrain.sdk.errors import ConfigError
from edgetrain.sdk.optim import SGD, SGDHyper, check_sgd_hyper, layer_segments, sgd


def _torch_sgd(w0: np.ndarray, grads: list[np.ndarray], prox_mu: float = 0.0, **options: float) -> np.ndarray:
    """torch.optim.SGD over the given gradients; FedProx's mu·(w − w0) added to each, as its loss term would."""
    tw = torch.tensor(w0, requires_grad=True)
    opt = torch.optim.SGD([tw], **options)
    for g in grads:
        tw.grad = torch.tensor(g) + prox_mu * (tw.detach() - torch.tensor(w0))
        opt.step()
    return tw.detach().numpy()


@pytest.mark.parametrize("options", [
    dict(momentum=0.0),
    dict(momentum=0.9),
    dict(momentum=0.9, nesterov=True),
    dict(momentum=0.9, nesterov=True, weight_decay=1e-2),
    dict(momentum=0.5, dampening=0.3, weight_decay=5e-4),
    dict(weight_decay=1e-1),
])
def test_sgd_matches_torch_optim_sgd_over_several_steps(options: dict) -> None:
    rng = np.random.default_rng(0)
    w0 = rng.normal(size=200).astype(np.float32)
    grads = [rng.normal(size=200).astype(np.float32) for _ in range(6)]
    w, buffer = w0.copy(), None
    for g in grads:
        w, buffer = sgd(w, g, buffer, lr=0.05, **options)
    np.testing.assert_allclose(w, _torch_sgd(w0, grads, lr=0.05, **options), rtol=1e-6, atol=1e-6)
    assert (buffer is None) == (options.get("momentum", 0.0) == 0.0)


def test_sgd_prox_term_matches_torch_with_fedprox_gradient() -> None:
    rng = np.random.default_rng(1)
    w0 = rng.normal(size=100).astype(np.float32)
    grads = [rng.normal(size=100).astype(np.float32) for _ in range(5)]
    optimiser = SGD(SGDHyper(lr=0.1, momentum=0.9, weight_decay=1e-3, prox_mu=0.5), w0)
    w = w0.copy()
    for g in grads:
        w = optimiser.step(w, g)
    expected = _torch_sgd(w0, grads, prox_mu=0.5, lr=0.1, momentum=0.9, weight_decay=1e-3)
    np.testing.assert_allclose(w, expected, rtol=1e-6, atol=1e-6)
    # the proximal term pulls towards w0: without it the same steps end elsewhere
    plain = SGD(SGDHyper(lr=0.1, momentum=0.9, weight_decay=1e-3), w0)
    w_plain = w0.copy()
    for g in grads:
        w_plain = plain.step(w_plain, g)
    assert np.linalg.norm(w - w0) < np.linalg.norm(w_plain - w0)


def test_sgd_is_functional_it_modifies_nothing_passed_in() -> None:
    w, g, buffer = np.ones(4, np.float32), np.full(4, 2.0, np.float32), np.full(4, 3.0, np.float32)
    new, new_buffer = sgd(w, g, buffer, lr=0.1, momentum=0.9, weight_decay=0.1)
    assert np.array_equal(w, np.ones(4)) and np.array_equal(g, np.full(4, 2.0)) and np.array_equal(buffer, np.full(4, 3.0))
    np.testing.assert_allclose(new_buffer, 0.9 * 3.0 + (2.0 + 0.1), rtol=1e-6)
    np.testing.assert_allclose(new, 1.0 - 0.1 * new_buffer, rtol=1e-6)


def _paper_lars(w0: np.ndarray, grads: list[np.ndarray], lrs: list[float], shapes: list[tuple[int, ...]],
                eta: float, beta: float, m: float) -> np.ndarray:
    """You et al. 2017, Algorithm 1, in float64, layer by layer: λ = η‖w‖/(‖g‖ + β‖w‖);
    v ← m·v + γ·λ·(g + βw); w ← w − v (λ = 1 for 1-D layers and zero norms)."""
    layers, offset = [], 0
    for shape in shapes:
        size = int(np.prod(shape))
        layers.append((offset, offset + size, len(shape) > 1))
        offset += size
    w = w0.astype(np.float64)
    v = np.zeros_like(w)
    for g32, gamma in zip(grads, lrs):
        g = g32.astype(np.float64)
        for start, stop, adapt in layers:
            wl, gl = w[start:stop], g[start:stop]
            local = 1.0
            if adapt and np.linalg.norm(wl) > 0 and np.linalg.norm(gl) > 0:
                local = eta * np.linalg.norm(wl) / (np.linalg.norm(gl) + beta * np.linalg.norm(wl))
            v[start:stop] = m * v[start:stop] + gamma * local * (gl + beta * wl)
        w = w - v
    return w


def test_lars_matches_the_papers_algorithm_with_a_changing_learning_rate() -> None:
    shapes = [(8, 5), (8,), (3, 4), (3, 4)]
    rng = np.random.default_rng(2)
    w0 = rng.normal(size=72).astype(np.float32)
    w0[60:] = 0.0  # a zero-norm layer: trust 1
    grads = [rng.normal(size=72).astype(np.float32) for _ in range(5)]
    lrs = [0.5, 1.0, 1.5, 2.0, 2.0]  # a warm-up: the velocity keeps the rates it was built at
    segments = layer_segments(shapes)
    w, buffer = w0.copy(), None
    for g, lr in zip(grads, lrs):
        w, buffer = sgd(w, g, buffer, lr=lr, momentum=0.9, weight_decay=1e-3, trust_coefficient=0.01,
                        segments=segments)
    expected = _paper_lars(w0, grads, lrs, shapes, eta=0.01, beta=1e-3, m=0.9)
    np.testing.assert_allclose(w, expected, rtol=1e-5, atol=1e-6)


def test_lars_needs_segments_that_cover_the_vector() -> None:
    w = np.ones(10, np.float32)
    with pytest.raises(ConfigError, match="cover 9 entries"):
        sgd(w, w, None, lr=0.1, trust_coefficient=0.01, segments=layer_segments([(3, 3)]))
    with pytest.raises(ConfigError, match="segments"):
        sgd(w, w, None, lr=0.1, trust_coefficient=0.01)
    with pytest.raises(ConfigError, match="segments"):
        SGD(SGDHyper(lr=0.1, trust_coefficient=0.01), w)


@pytest.mark.parametrize("kwargs,named", [
    (dict(lr=0.0), "lr"), (dict(lr=float("nan")), "lr"), (dict(lr=True), "lr"),
    (dict(lr=0.1, momentum=1.0), "momentum"), (dict(lr=0.1, momentum=-0.1), "momentum"),
    (dict(lr=0.1, momentum=float("nan")), "momentum"),
    (dict(lr=0.1, dampening=1.0), "dampening"),
    (dict(lr=0.1, weight_decay=-1e-4), "weight_decay"), (dict(lr=0.1, weight_decay=float("inf")), "weight_decay"),
    (dict(lr=0.1, prox_mu=-1.0), "prox_mu"),
    (dict(lr=0.1, nesterov=True), "nesterov"), (dict(lr=0.1, momentum=0.9, dampening=0.1, nesterov=True), "nesterov"),
    (dict(lr=0.1, trust_coefficient=0.0), "trust_coefficient"),
])
def test_bad_hyper_parameters_fail_fast_naming_the_parameter(kwargs: dict, named: str) -> None:
    with pytest.raises(ValueError, match=named):
        check_sgd_hyper(**kwargs)
    with pytest.raises(ConfigError, match=named):
        SGDHyper(**kwargs)
    with pytest.raises(ConfigError, match=named):
        sgd(np.zeros(3, np.float32), np.zeros(3, np.float32), None, **kwargs)


def test_checks_name_the_callers_setting() -> None:
    with pytest.raises(ConfigError, match="server momentum must be in"):
        check_sgd_hyper(lr=1.0, momentum=1.0, names={"momentum": "server momentum"})


def test_prox_needs_its_centre_and_shapes_must_agree() -> None:
    w = np.ones(3, np.float32)
    with pytest.raises(ConfigError, match="prox_center"):
        sgd(w, w, None, lr=0.1, prox_mu=0.1)
    with pytest.raises(ConfigError, match="shape"):
        sgd(w, np.ones(4, np.float32), None, lr=0.1)
    with pytest.raises(ConfigError, match="momentum buffer"):
        sgd(w, w, np.ones(2, np.float32), lr=0.1, momentum=0.5)


def test_lars_step_honours_nesterov() -> None:
    """It was silently ignored before the kernel: LARS with nesterov=True stepped as without."""
    from edgetrain.aggregator.server_optim import LargeBatchHyper, lars_step

    rng = np.random.default_rng(3)
    w, g = rng.normal(size=16).astype(np.float32), rng.normal(size=16).astype(np.float32)
    shapes = [(3, 4), (4,)]
    ends = {}
    for nesterov in (False, True):
        hyper = LargeBatchHyper(optimizer="lars", momentum=0.9, nesterov=nesterov, trust_coefficient=0.01)
        new, state = lars_step(w, g, {}, hyper, lr=1.0, shapes=shapes)
        ends[nesterov], _ = lars_step(new, g, state, hyper, lr=1.0, shapes=shapes)
    assert not np.allclose(ends[True], ends[False])
