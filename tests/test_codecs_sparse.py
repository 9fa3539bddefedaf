"""Sparsifying codecs with error feedback: DGC (Lin et al. 2018) and STC (Sattler et al. 2019).
Nothing is lost (sent + residual = accumulated input), selection is the true top-k, the DGC
warm-up and momentum masking behave as in the paper, and state survives safetensors."""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.numpy import load_file, save_file

from edgetrain.sdk.codecs import get_codec
from edgetrain.sdk.codecs.dgc import sampled_top_k, warmup_density
from edgetrain.sdk.errors import ConfigError


def _gradients(steps: int, size: int, seed: int) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    scales = np.exp(rng.standard_normal(size)).astype(np.float32)  # uneven magnitudes, like real layers
    return [(rng.standard_normal(size).astype(np.float32) * scales) for _ in range(steps)]


@settings(max_examples=25, deadline=None)
@given(st.integers(0, 2**31), st.sampled_from(["fp16", "fp32"]), st.floats(0.0, 0.95),
       st.sampled_from([1e-9, 1e-5, 1.0, 1e5]))  # fp16 subnormals, normals, and overflow (sent as fp32)
def test_dgc_step_conserves_mass_exactly_and_masks_momentum(seed: int, values: str, momentum: float,
                                                            scale: float) -> None:
    codec = get_codec("dgc")
    params = {"sparsity": 0.95, "momentum": momentum, "values": values, "sample_ratio": 0.05}
    state = None
    for gradient in _gradients(4, 3000, seed):
        gradient *= np.float32(scale)
        u_old = np.zeros(3000, np.float32) if state is None else state["u"]
        v_old = np.zeros(3000, np.float32) if state is None else state["v"]
        u_new = u_old * np.float32(momentum) + gradient
        accumulated = v_old + u_new
        data, state = codec.encode(gradient, state, params)
        sent = codec.decode(data, 3000, params)
        assert np.array_equal(sent + state["v"], accumulated)  # bit for bit: fp16 rounding error stays in v
        assert np.all(state["u"][sent != 0] == 0)  # momentum factor masking
        if values == "fp32":
            assert np.all(state["v"][sent != 0] == 0)  # nothing left behind where a full-precision value went


def test_dgc_without_momentum_sends_the_running_sum() -> None:
    codec = get_codec("dgc")
    gradients = _gradients(30, 5000, 1)
    state, total_sent = None, np.zeros(5000, np.float64)
    for gradient in gradients:
        data, state = codec.encode(gradient, state, {"sparsity": 0.99, "momentum": 0.0})
        total_sent += codec.decode(data, 5000, {})
    total_input = np.sum(gradients, axis=0, dtype=np.float64)
    np.testing.assert_allclose(total_sent + state["v"], total_input, rtol=1e-5, atol=1e-5)
    assert int(state["step"][0]) == 30


def test_sampled_threshold_selects_the_exact_top_k() -> None:
    rng = np.random.default_rng(2)
    magnitude = np.abs(rng.standard_normal(200_000) * np.exp(rng.standard_normal(200_000)))
    for k in (1, 20, 200, 5000):
        chosen = sampled_top_k(magnitude, k, 0.005, rng)
        exact = np.sort(np.argpartition(magnitude, magnitude.size - k)[magnitude.size - k :])
        assert chosen.size == k and np.array_equal(np.sort(magnitude[chosen]), np.sort(magnitude[exact]))
        assert np.all(np.diff(chosen) > 0)


def test_dgc_warmup_goes_from_75_percent_to_target_exponentially() -> None:
    densities = [warmup_density(step, 0.001, 8) for step in range(10)]
    assert densities[0] == 0.25 and densities[8] == densities[9] == 0.001
    ratios = np.array(densities[1:9]) / np.array(densities[:8])
    assert np.allclose(ratios, ratios[0]) and ratios[0] < 1  # a constant factor per step
    codec = get_codec("dgc")
    state = None
    for step, gradient in enumerate(_gradients(10, 4000, 3)):
        data, state = codec.encode(gradient, state, {"sparsity": 0.999, "warmup_steps": 8})
        sent = np.count_nonzero(codec.decode(data, 4000, {}))
        assert sent == math.ceil(round(densities[step] * 4000, 6))


def test_dgc_clips_the_local_gradient() -> None:
    gradient = np.full(1000, 3.0, dtype=np.float32)
    codec = get_codec("dgc")
    data, state = codec.encode(gradient, None, {"clip_norm": 2.0, "sparsity": 0.5, "values": "fp32"})
    accumulated = codec.decode(data, 1000, {}) + state["v"]
    assert np.linalg.norm(accumulated) == pytest.approx(2.0, rel=1e-5)


def test_stc_is_ternary_and_conserves_mass() -> None:
    codec = get_codec("stc")
    state, total_sent = None, np.zeros(8000, np.float64)
    gradients = _gradients(20, 8000, 4)
    for gradient in gradients:
        previous = np.zeros(8000, np.float32) if state is None else state["residual"]
        accumulated = previous + gradient
        data, state = codec.encode(gradient, state, {"sparsity": 0.98})
        sent = codec.decode(data, 8000, {})
        total_sent += sent
        nonzero = sent[sent != 0]
        assert nonzero.size == 160 and np.unique(np.abs(nonzero)).size == 1  # one magnitude mu, two signs
        assert np.abs(nonzero[0]) == pytest.approx(np.sort(np.abs(accumulated))[-160:].mean(), rel=1e-5)
        np.testing.assert_allclose(sent + state["residual"], accumulated, rtol=0, atol=1e-6 * np.abs(accumulated).max())
    np.testing.assert_allclose(total_sent + state["residual"], np.sum(gradients, axis=0, dtype=np.float64),
                               rtol=1e-5, atol=1e-4)


def test_stc_payload_is_near_its_entropy_bound() -> None:
    codec = get_codec("stc")
    data, _ = codec.encode(_gradients(1, 100_000, 5)[0], None, {"sparsity": 0.99})
    account = codec.account(data, 100_000)
    assert account.total_bits == 8 * len(data)
    assert 0 <= account.index_excess < 0.03  # Rice-coded gaps within 3% of log2 C(n, k)
    assert account.value_bits == 32 + 8 * math.ceil(1000 / 8)  # mu plus one sign bit per position


@pytest.mark.parametrize(("name", "params"), [("dgc", {"sparsity": 0.9}), ("stc", {"sparsity": 0.9})])
def test_state_survives_safetensors(name: str, params: dict, tmp_path: Path) -> None:
    codec = get_codec(name)
    first, second = _gradients(2, 2000, 6)
    _, state = codec.encode(first, None, params)
    save_file(state, str(tmp_path / "state.safetensors"))
    reloaded = load_file(str(tmp_path / "state.safetensors"))
    assert codec.encode(second, reloaded, params)[0] == codec.encode(second, state, params)[0]


def test_state_from_another_model_is_a_config_error() -> None:
    _, state = get_codec("dgc").encode(np.ones(10, np.float32), None, {"sparsity": 0.5})
    with pytest.raises(ConfigError, match="another model"):
        get_codec("dgc").encode(np.ones(11, np.float32), state, {"sparsity": 0.5})
    with pytest.raises(ConfigError, match="residual"):
        get_codec("stc").encode(np.ones(3, np.float32), {"residual": np.ones(3, np.float64)}, {})
