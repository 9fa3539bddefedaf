"""torch, ONNX Runtime and ExecuTorch agree: from the same initial parameters and the same batches they
give the same loss, gradient and parameters after k SGD steps (tolerance: max|a − b| ≤ 1e-5 · max|b|
per vector; measured differences are ~1e-7). Bundles are CI-sized: tiny models, batch 8, 3 steps."""
from __future__ import annotations

from pathlib import Path
from typing import Callable

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("onnxruntime.training", reason="onnxruntime-training-cpu==1.19.2 not installed (extra 'ort')")
pytest.importorskip("onnx", reason="onnx<1.18 not installed (extra 'export')")
pytest.importorskip("onnxscript", reason="onnxscript not installed (extra 'export')")
pytest.importorskip("executorch", reason="executorch==1.5.1 not installed (extra 'executorch')")

from edgetrain.export.bundle_writer import export_bundle  # noqa: E402
from edgetrain.sdk.bundle import load_manifest, read_initial_parameters  # noqa: E402
from edgetrain.sdk.errors import RuntimeBackendError  # noqa: E402
from edgetrain.sdk.runtime import Runtime, TrainConfig, load_runtime  # noqa: E402

RUNTIMES = ("torch", "onnx", "executorch")
MODELS = {"mlp": {"hidden": [16]}, "cnn": {"channels": [4, 8], "kernel_size": 3, "hidden": 16, "norm": "none"}}
SEED = 5
FIXED_BATCH = 8
RTOL = 1e-5


def _close(got: np.ndarray, expected: np.ndarray, what: str, rtol: float = RTOL) -> None:
    scale = max(float(np.abs(expected).max()), 1e-12)
    error = float(np.abs(got - expected).max()) / scale
    assert error <= rtol, f"{what}: relative difference {error:.2e} > {rtol:.0e}"


@pytest.fixture(scope="module")
def bundles(tmp_path_factory: pytest.TempPathFactory) -> dict[tuple[str, str], Path]:
    root = tmp_path_factory.mktemp("parity")
    out: dict[tuple[str, str], Path] = {}
    for model, config in MODELS.items():
        for runtime in RUNTIMES:
            out[model, runtime] = root / f"{model}-{runtime}"
            export_bundle(model, config, out_dir=out[model, runtime], runtime=runtime, seed=SEED,
                          batch_size=FIXED_BATCH if runtime == "executorch" else None)
    return out


@pytest.fixture()
def load(bundles: dict[tuple[str, str], Path]) -> Callable[[str, str], Runtime]:
    return lambda model, runtime: load_runtime(bundles[model, runtime])


def _batches(seed: int, sizes: tuple[int, ...]) -> list[tuple[np.ndarray, np.ndarray]]:
    rng = np.random.default_rng(seed)
    return [(rng.standard_normal((n, 1, 28, 28)).astype(np.float32), rng.integers(0, 10, n).astype(np.int64))
            for n in sizes]


@pytest.mark.parametrize("model", sorted(MODELS))
def test_one_layout_for_every_runtime(bundles: dict[tuple[str, str], Path], model: str) -> None:
    manifests = {r: load_manifest(bundles[model, r]) for r in RUNTIMES}
    assert manifests["onnx"].params == manifests["torch"].params == manifests["executorch"].params
    assert sorted(manifests["onnx"].runtime_info["ort_parameter_order"]) == sorted(p.name for p in
                                                                                     manifests["torch"].params)
    assert manifests["executorch"].fixed_batch_size == FIXED_BATCH
    initial = read_initial_parameters(bundles[model, "torch"], manifests["torch"])
    for runtime in RUNTIMES:
        np.testing.assert_array_equal(load_runtime(bundles[model, runtime]).get_parameters(), initial)


@pytest.mark.parametrize("model", sorted(MODELS))
def test_loss_and_gradient_agree(load: Callable[[str, str], Runtime], model: str) -> None:
    # 5 rows: a partial batch the ExecuTorch program (fixed at 8) pads; 11: two chunks there
    for x, y in _batches(1, (8, 5, 11)):
        reference = load(model, "torch").gradient(x, y)
        for runtime in ("onnx", "executorch"):
            result = load(model, runtime).gradient(x, y)
            assert result.examples == len(y)
            assert result.loss == pytest.approx(reference.loss, rel=RTOL)
            _close(result.gradient, reference.gradient, f"{model} {runtime} gradient, batch {len(y)}")


@pytest.mark.parametrize("model", sorted(MODELS))
@pytest.mark.parametrize("config", [
    TrainConfig(lr=0.1),
    TrainConfig(lr=0.05, momentum=0.9, weight_decay=1e-3, nesterov=True),
    TrainConfig(lr=0.1, momentum=0.5, prox_mu=0.5),
], ids=["sgd", "nesterov-wd", "momentum-fedprox"])
def test_parameters_after_k_steps_agree(load: Callable[[str, str], Runtime], model: str, config: TrainConfig) -> None:
    batches = _batches(2, (8, 8, 5))  # k = 3 steps, the last one on a partial batch
    reference = load(model, "torch")
    start = reference.get_parameters()
    expected = reference.train(batches, config)
    for runtime in ("onnx", "executorch"):
        rt = load(model, runtime)
        result = rt.train(batches, config)
        assert (result.steps, result.examples) == (expected.steps, expected.examples)
        assert result.mean_loss == pytest.approx(expected.mean_loss, rel=RTOL)
        trained = rt.get_parameters()
        assert np.abs(trained - start).max() > 1e-4  # it really trained
        _close(trained - start, reference.get_parameters() - start, f"{model} {runtime} update after 3 steps")


@pytest.mark.parametrize("model", sorted(MODELS))
def test_evaluate_agrees_and_set_parameters_is_honoured(load: Callable[[str, str], Runtime], model: str) -> None:
    (x, y), = _batches(3, (21,))
    target = load(model, "torch").get_parameters() * np.float32(1.5)
    results = {}
    for runtime in RUNTIMES:
        rt = load(model, runtime)
        rt.set_parameters(target)
        np.testing.assert_array_equal(rt.get_parameters(), target)
        results[runtime] = rt.evaluate(x, y, batch_size=6)
    for runtime in ("onnx", "executorch"):
        assert results[runtime].examples == 21
        assert results[runtime].accuracy == results["torch"].accuracy
        assert results[runtime].loss == pytest.approx(results["torch"].loss, rel=RTOL)


def _hf_adamw(w: np.ndarray, gradient_at: Callable[[np.ndarray, int], np.ndarray], steps: int, lr: float,
              betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8) -> np.ndarray:
    """AdamW as ORT's AdamWOptimizer (adam_mode 1, the Hugging Face form: eps added before the bias
    correction of the step size) computes it; Loshchilov & Hutter, ICLR 2019."""
    m = np.zeros_like(w, dtype=np.float64)
    v = np.zeros_like(w, dtype=np.float64)
    w = w.astype(np.float64)
    for t in range(1, steps + 1):
        g = gradient_at(w.astype(np.float32), t - 1).astype(np.float64)
        m = betas[0] * m + (1 - betas[0]) * g
        v = betas[1] * v + (1 - betas[1]) * g * g
        step_size = lr * np.sqrt(1 - betas[1] ** t) / (1 - betas[0] ** t)
        w = w - step_size * m / (np.sqrt(v) + eps)
    return w.astype(np.float32)


def test_ort_adamw_bundle_trains_and_refuses_what_it_cannot_do(tmp_path: Path,
                                                               load: Callable[[str, str], Runtime]) -> None:
    export_bundle("mlp", MODELS["mlp"], out_dir=tmp_path / "adamw", runtime="onnx", seed=SEED,
                  optimizer={"name": "adamw", "lr": 0.01})
    rt = load_runtime(tmp_path / "adamw")
    batches = _batches(4, (8, 8))
    w0 = rt.get_parameters()
    rt.train(batches, TrainConfig(lr=0.01))
    first = rt.get_parameters()
    reference = load("mlp", "torch")

    def gradient_at(w: np.ndarray, step: int) -> np.ndarray:
        reference.set_parameters(w)
        return reference.gradient(*batches[step]).gradient

    expected = _hf_adamw(w0, gradient_at, steps=2, lr=0.01)
    # 1e-4, not 1e-5: Adam divides by sqrt(v), so a gradient entry near zero turns its float32
    # rounding (~1e-7 of the largest entry) into a step-sized difference (measured 5e-5)
    _close(first - w0, expected - w0, "ORT AdamW update after 2 steps", rtol=1e-4)
    # a fresh optimiser (moments, step count) per call: the same call from w0 lands on the same point
    rt.set_parameters(w0)
    rt.train(batches, TrainConfig(lr=0.01))
    np.testing.assert_allclose(rt.get_parameters(), first, rtol=0, atol=1e-7)
    for config, needle in [(TrainConfig(lr=0.01, momentum=0.9), "momentum"),
                           (TrainConfig(lr=0.01, prox_mu=0.1), "prox_mu"),
                           (TrainConfig(lr=0.01, weight_decay=0.1), "weight decay")]:
        with pytest.raises(RuntimeBackendError, match=needle):
            rt.train(batches, config)


def test_ort_flat_vector_maps_to_its_tensors_by_name(load: Callable[[str, str], Runtime]) -> None:
    # ORT's flat buffer follows its training graph; the manifest's layout must land on the right tensors
    rt = load("cnn", "onnx")
    manifest = rt.manifest
    target = np.random.default_rng(0).standard_normal(manifest.num_params).astype(np.float32)
    rt.set_parameters(target)
    for name, expected in manifest.split(target).items():
        np.testing.assert_array_equal(np.asarray(rt._state.parameters[name].data), expected)
    rt.set_threads(1)  # rebuilds the sessions, keeps the parameters
    np.testing.assert_array_equal(rt.get_parameters(), target)
