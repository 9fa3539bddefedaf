"""The torch runtime against plain torch autograd and the SGD / FedProx update rules."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from edgetrain.export.bundle_writer import export_bundle  # noqa: E402
from edgetrain.sdk.models import build_model  # noqa: E402
from edgetrain.sdk.errors import BundleError, ConfigError  # noqa: E402
from edgetrain.sdk.runtime import Runtime, TrainConfig, load_runtime  # noqa: E402
from edgetrain.sdk.runtime.torch_backend import TorchRuntime  # noqa: E402

MLP_CONFIG = {"hidden": [16]}
SEED = 11


@pytest.fixture()
def mlp_runtime(tmp_path: Path) -> TorchRuntime:
    export_bundle("mlp", MLP_CONFIG, out_dir=tmp_path / "mlp", seed=SEED)
    runtime = load_runtime(tmp_path / "mlp")
    assert isinstance(runtime, TorchRuntime) and isinstance(runtime, Runtime)
    return runtime


def _batch(seed: int, n: int = 8) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return rng.standard_normal((n, 1, 28, 28)).astype(np.float32), rng.integers(0, 10, n).astype(np.int64)


def _autograd(model: torch.nn.Module, x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, float]:
    model.zero_grad()
    loss = torch.nn.functional.cross_entropy(model(torch.from_numpy(x)), torch.from_numpy(y))
    loss.backward()
    return torch.cat([p.grad.reshape(-1) for p in model.parameters()]).numpy().copy(), float(loss.detach())


def test_get_set_round_trip(mlp_runtime: TorchRuntime) -> None:
    n = mlp_runtime.manifest.num_params
    target = np.random.default_rng(0).standard_normal(n).astype(np.float32)
    mlp_runtime.set_parameters(target)
    got = mlp_runtime.get_parameters()
    np.testing.assert_array_equal(got, target)
    got[:] = 0  # a copy: scribbling on it must not reach the model
    np.testing.assert_array_equal(mlp_runtime.get_parameters(), target)


@pytest.mark.parametrize("make_bad", [
    lambda n: np.zeros(n - 1, np.float32),  # too short
    lambda n: np.zeros(n, np.float64),  # wrong dtype
    lambda n: np.zeros((1, n), np.float32),  # not flat
], ids=["short", "float64", "2-D"])
def test_set_refuses_a_vector_off_the_layout(mlp_runtime: TorchRuntime, make_bad) -> None:
    before = mlp_runtime.get_parameters()
    with pytest.raises(BundleError):
        mlp_runtime.set_parameters(make_bad(mlp_runtime.manifest.num_params))
    np.testing.assert_array_equal(mlp_runtime.get_parameters(), before)


def test_gradient_matches_autograd_and_leaves_parameters_alone(mlp_runtime: TorchRuntime) -> None:
    x, y = _batch(1)
    before = mlp_runtime.get_parameters()
    result = mlp_runtime.gradient(x, y)
    expected, loss = _autograd(build_model("mlp", MLP_CONFIG, seed=SEED), x, y)
    assert result.gradient.dtype == np.float32 and result.examples == len(y)
    np.testing.assert_allclose(result.gradient, expected, rtol=1e-5, atol=1e-7)
    assert result.loss == pytest.approx(loss, rel=1e-6)
    np.testing.assert_array_equal(mlp_runtime.get_parameters(), before)


def test_gradient_with_batchnorm_is_train_mode_and_keeps_running_stats(tmp_path: Path) -> None:
    export_bundle("cnn", {"norm": "batch", "channels": [8, 8], "hidden": 16}, out_dir=tmp_path / "b", seed=2)
    runtime = load_runtime(tmp_path / "b")
    stats_before = {k: v.clone() for k, v in runtime.model.named_buffers()}
    x, y = _batch(2)
    result = runtime.gradient(x, y)
    reference = build_model("cnn", {"norm": "batch", "channels": [8, 8], "hidden": 16}, seed=2).train()
    expected, _ = _autograd(reference, x, y)  # train mode: batch statistics, as a training step sees them
    np.testing.assert_allclose(result.gradient, expected, rtol=1e-4, atol=1e-6)
    for name, value in runtime.model.named_buffers():
        assert torch.equal(value, stats_before[name]), name


def test_one_plain_sgd_step_is_w_minus_lr_g(mlp_runtime: TorchRuntime) -> None:
    x, y = _batch(3)
    w0 = mlp_runtime.get_parameters()
    before = mlp_runtime.gradient(x, y)
    result = mlp_runtime.train([(x, y)], TrainConfig(lr=0.1))
    np.testing.assert_allclose(mlp_runtime.get_parameters(), w0 - 0.1 * before.gradient, rtol=1e-5, atol=1e-7)
    assert (result.steps, result.examples) == (1, len(y))
    assert result.mean_loss == pytest.approx(before.loss, rel=1e-6)  # the loss the step was taken on


def test_weight_decay_adds_lambda_w(mlp_runtime: TorchRuntime) -> None:
    x, y = _batch(4)
    w0 = mlp_runtime.get_parameters()
    g = mlp_runtime.gradient(x, y).gradient
    mlp_runtime.train([(x, y)], TrainConfig(lr=0.1, weight_decay=0.01))
    np.testing.assert_allclose(mlp_runtime.get_parameters(), w0 - 0.1 * (g + 0.01 * w0), rtol=1e-5, atol=1e-7)


def test_momentum_carries_within_a_call_and_resets_between_calls(mlp_runtime: TorchRuntime) -> None:
    (x0, y0), (x1, y1) = _batch(5), _batch(6)
    lr, m = 0.1, 0.9
    w0 = mlp_runtime.get_parameters()
    g0 = mlp_runtime.gradient(x0, y0).gradient
    # two separate calls: fresh optimiser, so the second step has no momentum from the first
    mlp_runtime.train([(x0, y0)], TrainConfig(lr=lr, momentum=m))
    w1 = mlp_runtime.get_parameters()
    g1 = mlp_runtime.gradient(x1, y1).gradient
    mlp_runtime.train([(x1, y1)], TrainConfig(lr=lr, momentum=m))
    np.testing.assert_allclose(mlp_runtime.get_parameters(), w1 - lr * g1, rtol=1e-5, atol=1e-6)
    # one call with both batches: heavy-ball momentum, v1 = m·g0 + g1
    mlp_runtime.set_parameters(w0)
    result = mlp_runtime.train([(x0, y0), (x1, y1)], TrainConfig(lr=lr, momentum=m))
    np.testing.assert_allclose(mlp_runtime.get_parameters(), w1 - lr * (m * g0 + g1), rtol=1e-5, atol=1e-6)
    assert (result.steps, result.examples) == (2, len(y0) + len(y1))


def test_prox_mu_pulls_towards_the_start_of_the_call(mlp_runtime: TorchRuntime) -> None:
    (x0, y0), (x1, y1) = _batch(7), _batch(8)
    lr, mu = 0.1, 0.5
    w0 = mlp_runtime.get_parameters()
    # FedProx by hand: the proximal gradient mu·(w − w0) is zero at step one, non-zero at step two
    g0 = mlp_runtime.gradient(x0, y0).gradient
    w1 = w0 - lr * g0
    mlp_runtime.set_parameters(w1)
    g1 = mlp_runtime.gradient(x1, y1).gradient
    expected = w1 - lr * (g1 + mu * (w1 - w0))
    mlp_runtime.set_parameters(w0)
    mlp_runtime.train([(x0, y0), (x1, y1)], TrainConfig(lr=lr, prox_mu=mu))
    with_prox = mlp_runtime.get_parameters()
    np.testing.assert_allclose(with_prox, expected, rtol=1e-5, atol=1e-6)
    mlp_runtime.set_parameters(w0)
    mlp_runtime.train([(x0, y0), (x1, y1)], TrainConfig(lr=lr))
    without = mlp_runtime.get_parameters()
    # the proximal term shortens the distance travelled from w0
    assert np.linalg.norm(with_prox - w0) < np.linalg.norm(without - w0)


@pytest.mark.parametrize("momentum, nesterov, weight_decay", [(0.0, False, 0.0), (0.9, False, 0.0),
                                                           (0.9, True, 0.0), (0.5, False, 0.01), (0.9, True, 0.01)])
def test_training_steps_exactly_as_torch_optim_sgd(mlp_runtime: TorchRuntime, momentum: float, nesterov: bool,
                                                   weight_decay: float) -> None:
    """The runtime's own SGD step against torch.optim.SGD on a twin model: equal to the bit over several steps."""
    batches = [_batch(20 + s) for s in range(4)]
    twin = build_model("mlp", MLP_CONFIG, seed=SEED)
    twin.load_state_dict(mlp_runtime.model.state_dict())
    optimizer = torch.optim.SGD(twin.parameters(), lr=0.1, momentum=momentum, nesterov=nesterov,
                                weight_decay=weight_decay)
    for x, y in batches:
        optimizer.zero_grad(set_to_none=True)
        torch.nn.functional.cross_entropy(twin(torch.from_numpy(x)), torch.from_numpy(y)).backward()
        optimizer.step()
    mlp_runtime.train(batches, TrainConfig(lr=0.1, momentum=momentum, nesterov=nesterov, weight_decay=weight_decay))
    expected = torch.cat([p.detach().reshape(-1) for p in twin.parameters()]).numpy()
    np.testing.assert_array_equal(mlp_runtime.get_parameters(), expected)


def test_train_reports_the_mean_cross_entropy(mlp_runtime: TorchRuntime) -> None:
    (x0, y0), (x1, y1) = _batch(9, n=4), _batch(10, n=12)
    loss0 = mlp_runtime.gradient(x0, y0).loss
    w0 = mlp_runtime.get_parameters()
    mlp_runtime.train([(x0, y0)], TrainConfig(lr=0.05))
    loss1 = mlp_runtime.gradient(x1, y1).loss
    mlp_runtime.set_parameters(w0)
    result = mlp_runtime.train([(x0, y0), (x1, y1)], TrainConfig(lr=0.05, prox_mu=1.0))
    # losses are measured before each step; weighted by examples; the proximal term is excluded
    assert result.mean_loss == pytest.approx((4 * loss0 + 12 * loss1) / 16, rel=1e-5)
    assert result.compute_s >= 0
    empty = mlp_runtime.train([], TrainConfig(lr=0.05))
    assert (empty.steps, empty.examples) == (0, 0) and np.isnan(empty.mean_loss)


def test_evaluate_on_a_tiny_synthetic_set(mlp_runtime: TorchRuntime) -> None:
    x, y = _batch(12, n=10)
    reference = build_model("mlp", MLP_CONFIG, seed=SEED).eval()
    with torch.no_grad():
        logits = reference(torch.from_numpy(x))
    expected_acc = float((logits.argmax(1).numpy() == y).mean())
    expected_loss = float(torch.nn.functional.cross_entropy(logits, torch.from_numpy(y)))
    before = mlp_runtime.get_parameters()
    for batch_size in (3, 1000):
        result = mlp_runtime.evaluate(x, y, batch_size=batch_size)
        assert result.examples == 10
        assert result.accuracy == pytest.approx(expected_acc)
        assert result.loss == pytest.approx(expected_loss, rel=1e-5)
    # make it learnable: labels from the model's own predictions give accuracy 1
    assert mlp_runtime.evaluate(x, logits.argmax(1).numpy()).accuracy == 1.0
    np.testing.assert_array_equal(mlp_runtime.get_parameters(), before)


def test_bad_batches_are_config_errors(mlp_runtime: TorchRuntime) -> None:
    x, y = _batch(13)
    with pytest.raises(ConfigError, match="shape"):
        mlp_runtime.gradient(x[:, 0], y)
    with pytest.raises(ConfigError, match="labels"):
        mlp_runtime.gradient(x, y[:-1])
    with pytest.raises(ConfigError, match="labels must lie"):
        mlp_runtime.evaluate(x, np.full(len(y), 10))
    with pytest.raises(ConfigError):
        mlp_runtime.evaluate(x, y, batch_size=0)


def test_runtime_leaves_the_thread_count_alone(mlp_runtime: TorchRuntime) -> None:
    threads = torch.get_num_threads()
    x, y = _batch(14)
    mlp_runtime.train([(x, y)], TrainConfig(lr=0.01))
    mlp_runtime.evaluate(x, y)
    assert torch.get_num_threads() == threads


def test_warm_up_leaves_parameters_and_batchnorm_statistics_alone(tmp_path: Path) -> None:
    export_bundle("cnn", {"norm": "batch", "channels": [8, 8], "hidden": 16}, out_dir=tmp_path / "b", seed=2)
    runtime = load_runtime(tmp_path / "b")
    params_before = runtime.get_parameters()
    stats_before = {k: v.clone() for k, v in runtime.model.named_buffers()}
    runtime.warm_up()
    np.testing.assert_array_equal(runtime.get_parameters(), params_before)
    for name, value in runtime.model.named_buffers():
        assert torch.equal(value, stats_before[name]), name


def test_training_after_a_warm_up_is_exactly_training_without_one(tmp_path: Path) -> None:
    export_bundle("cnn", {"norm": "batch", "channels": [8, 8], "hidden": 16}, out_dir=tmp_path / "b", seed=2)
    config = TrainConfig(lr=0.05, momentum=0.9)
    batches = [_batch(s) for s in range(3)]
    cold, warm = load_runtime(tmp_path / "b"), load_runtime(tmp_path / "b")
    warm.warm_up()
    cold_result, warm_result = cold.train(batches, config), warm.train(batches, config)
    assert warm_result.mean_loss == cold_result.mean_loss
    np.testing.assert_array_equal(warm.get_parameters(), cold.get_parameters())
    for (name, a), (_, b) in zip(cold.model.named_buffers(), warm.model.named_buffers()):
        assert torch.equal(a, b), name


# Run in a fresh interpreter: in this one an earlier test has already imported whatever torch loads lazily.
_FIRST_ROUND_PROBE = """
import sys
import numpy as np
from edgetrain.sdk.runtime import TrainConfig, load_runtime
runtime = load_runtime(sys.argv[1])
runtime.warm_up()
rng = np.random.default_rng(0)
x, y = rng.standard_normal((4, 1, 28, 28)).astype(np.float32), rng.integers(0, 10, 4).astype(np.int64)
loaded = set(sys.modules)
runtime.train([(x, y)], TrainConfig(lr=0.05, momentum=0.9))
print(" ".join(sorted(set(sys.modules) - loaded)))
print("torch._dynamo" in sys.modules)
"""


def test_after_a_warm_up_the_first_training_imports_nothing(tmp_path: Path) -> None:
    """The warm-up pays the first step's lazy imports while the device loads, not in round 1; and neither
    imports torch._dynamo, which a torch.optim optimiser's constructor does (~800 modules, ~1 CPU-second of
    every device's start-up: seconds of wall time with ten device processes on two cores)."""
    export_bundle("mlp", MLP_CONFIG, out_dir=tmp_path / "mlp", seed=SEED)
    probe = subprocess.run([sys.executable, "-c", _FIRST_ROUND_PROBE, str(tmp_path / "mlp")],
                           capture_output=True, text=True, timeout=300, check=True)
    newly_imported, dynamo_loaded = probe.stdout.splitlines()
    assert newly_imported.split() == []
    assert dynamo_loaded == "False"
