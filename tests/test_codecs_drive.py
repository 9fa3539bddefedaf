"""DRIVE (Vargaftik et al., NeurIPS 2021): rotation + 1 sign bit a coordinate + one scale a segment.
Its error on Gaussian vectors is the paper's (1 - 2/pi biased, pi/2 - 1 unbiased), the unbiased
scale is unbiased over rotations, the payload is ~1 bit a parameter, the sparse form's positions sit
near log2 C(n, k), error feedback loses nothing, and forged headers are refused before allocating."""
from __future__ import annotations

import math
import struct
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from edgetrain.sdk.codecs import CodecSpec, get_codec
from edgetrain.sdk.codecs.drive import MIN_SEGMENT, layout, segments
from edgetrain.sdk.errors import ConfigError, WireError

DRIVE = get_codec("drive")
SIZE = 25_450  # the project's CNN: segments 16384, 8192, 512, 256, 64 and a padded 42


def _gaussian(size: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal(size).astype(np.float32)


def _nmse(x: np.ndarray, y: np.ndarray) -> float:
    x64 = x.astype(np.float64)
    return float(np.sum((y - x64) ** 2) / np.sum(x64**2))


@pytest.mark.parametrize(("unbiased", "expected"), [(False, 1 - 2 / math.pi), (True, math.pi / 2 - 1)])
def test_error_on_gaussian_vectors_is_the_papers(unbiased: bool, expected: float) -> None:
    # R x of a Gaussian x is Gaussian, so E|.| = sqrt(2/pi) sigma gives the limits; one trial's spread at
    # this size was 0.002 (biased) and 0.005 (unbiased), so 10 trials sit well inside 0.01.
    params = {"unbiased": unbiased, "feedback": False, "seed": 0}
    errors = []
    for trial in range(10):
        x = _gaussian(SIZE, trial)
        errors.append(_nmse(x, DRIVE.decode(DRIVE.encode(x, None, {**params, "seed": trial})[0], SIZE, {})))
    assert abs(np.mean(errors) - expected) < 0.01
    assert max(errors) < expected + 0.03


@pytest.mark.parametrize(("unbiased", "gain"), [(True, 1.0), (False, 2 / math.pi)])
def test_unbiased_scale_averages_to_the_vector(unbiased: bool, gain: float) -> None:
    # Over rotation seeds E[x^] = x for the unbiased scale; the biased one shrinks by ||Rx||_1^2/(n||x||^2) ~ 2/pi.
    x = _gaussian(256, 3)
    mean = np.mean([DRIVE.decode(DRIVE.encode(x, None, {"unbiased": unbiased, "feedback": False, "seed": s})[0],
                                 x.size, {}) for s in range(400)], axis=0)
    assert np.linalg.norm(mean - gain * x) / np.linalg.norm(gain * x) < 0.1  # measured ~0.04 (unbiased)
    assert abs(float(mean @ x / (x @ x)) - gain) < 0.03


def test_dense_payload_is_one_bit_a_parameter_plus_the_scales() -> None:
    data, _ = DRIVE.encode(_gaussian(SIZE, 1), None, {"feedback": False})
    parts = segments(SIZE, 1 << 16)
    padded = sum(width for _, _, width in parts)
    assert padded - SIZE < MIN_SEGMENT and len(parts) == 6
    assert len(data) == 11 + 4 * len(parts) + math.ceil(padded / 8)
    account = DRIVE.account(data, SIZE)
    assert account.index_bits == 0 and account.total_bits == 8 * len(data)
    assert 8 * len(data) / SIZE < 1.02  # a 2**15 pad (the sketch codec's) would be 1.29
    assert account.value_bits - account.value_bound_bits < 0.001 * SIZE  # the signs are ~fair coins


def test_sparse_payload_positions_near_their_entropy_floor() -> None:
    data, _ = DRIVE.encode(_gaussian(100_000, 2), None, {"sparsity": 0.99})
    account = DRIVE.account(data, 100_000)
    assert 0 <= account.index_excess < 0.08  # Rice-coded gaps (measured +5 % at 25k, 1 % density)
    assert account.value_bits == 8 * (4 * len(segments(1000, 1 << 16)) + math.ceil(1024 / 8))
    assert 8 * len(data) / 100_000 < 0.1


def test_decode_is_deterministic_and_the_seed_fixes_the_payload() -> None:
    x = _gaussian(3000, 4)
    first, _ = DRIVE.encode(x, None, {"seed": 7, "sparsity": 0.9})
    assert DRIVE.encode(x, None, {"seed": 7, "sparsity": 0.9})[0] == first
    assert DRIVE.encode(x, None, {"seed": 8, "sparsity": 0.9})[0] != first
    assert np.array_equal(DRIVE.decode(first, 3000, {}), DRIVE.decode(first, 3000, {}))
    assert np.count_nonzero(DRIVE.decode(first, 3000, {})) <= 300  # only kept positions carry values


@pytest.mark.parametrize("sparsity", [0.0, 0.99])
def test_error_feedback_loses_nothing(sparsity: float) -> None:
    rng = np.random.default_rng(5)
    gradients = [rng.standard_normal(4000).astype(np.float32) * np.exp(rng.standard_normal(4000)).astype(np.float32)
                 for _ in range(30)]
    state, sent = None, np.zeros(4000, np.float64)
    for step, gradient in enumerate(gradients):
        accumulated = gradient + (0 if state is None else state["residual"])
        data, state = DRIVE.encode(gradient, state, {"sparsity": sparsity, "seed": step})
        decoded = DRIVE.decode(data, 4000, {})
        np.testing.assert_allclose(decoded + state["residual"], accumulated, rtol=1e-5, atol=1e-5)
        sent += decoded
    total = np.sum(gradients, axis=0, dtype=np.float64)
    np.testing.assert_allclose(sent + state["residual"], total, rtol=1e-4, atol=1e-3)
    if sparsity == 0.0:  # 1-bit alone: the residual stays bounded, far below the 30 steps' sum
        assert np.linalg.norm(state["residual"]) < 0.5 * np.linalg.norm(total)


def test_without_feedback_no_state_is_kept(tmp_path: Path) -> None:
    assert DRIVE.encode(_gaussian(100, 0), None, {"feedback": False})[1] is None
    first, second = _gaussian(2000, 6), _gaussian(2000, 7)
    params = {"sparsity": 0.9, "seed": 1}
    _, state = DRIVE.encode(first, None, params)
    save_file(state, str(tmp_path / "state.safetensors"))
    reloaded = load_file(str(tmp_path / "state.safetensors"))
    assert DRIVE.encode(second, reloaded, params)[0] == DRIVE.encode(second, state, params)[0]


@pytest.mark.parametrize("spec, needle", [
    ("drive:sparsity=1.0", "sparsity"), ("drive:sparsity=-0.1", "sparsity"), ("drive:block=32", "block"),
    ("drive:block=100", "block"), ("drive:seed=-1", "seed"), ("drive:unbiased=yes", "unbiased"),
    ("drive:sparsty=0.9", "unknown parameter"), ("drive:feedback=1", "feedback"),
])
def test_bad_parameters_are_refused_once_with_a_clear_error(spec: str, needle: str) -> None:
    with pytest.raises(ConfigError, match=needle):
        CodecSpec.parse(spec)


def test_segments_cover_the_values_with_little_padding() -> None:
    for count in [0, 1, 63, 64, 65, 127, 1000, 65_535, 65_536, 65_537, 200_001]:
        parts = segments(count, 1 << 16)
        assert [start for start, _, _ in parts] == list(np.cumsum([0] + [v for _, v, _ in parts])[:-1])
        assert sum(v for _, v, _ in parts) == count
        assert sum(w for _, _, w in parts) - count < MIN_SEGMENT
        assert all(v == w for _, v, w in parts[:-1])  # only the last segment is padded
        assert layout(count, 1 << 16) == (len(parts), sum(w for _, _, w in parts))


def _header(flags: int, log_block: int, seed: int = 1) -> bytes:
    return struct.pack("<BBBQ", 0x56, flags, log_block, seed)


@pytest.mark.parametrize("payload, size, needle", [
    (_header(0, 16)[:-1], 10, "shorter than its header"),
    (_header(0, 5) + bytes(4 + 2), 10, "block"),  # below the smallest block
    (_header(0, 25) + bytes(4 + 2), 10, "block"),  # above 2**24
    (_header(4, 16) + bytes(4 + 2), 10, "bad header"),  # unknown flag
    (_header(0, 16) + bytes(4 + 2), 2**40, "header implies"),  # claims a huge vector in a few bytes
    (_header(0, 16) + struct.pack("<f", math.nan) + bytes(2), 10, "scale"),
    (_header(0, 16) + struct.pack("<f", -1.0) + bytes(2), 10, "scale"),
    (_header(2, 16) + struct.pack("<I", 2**32 - 1) + bytes(100), 10, "positions"),  # more kept than entries
    (_header(2, 16) + struct.pack("<I", 5) + bytes(1), 10, "truncated"),
])
def test_forged_payloads_are_wire_errors(payload: bytes, size: int, needle: str) -> None:
    with pytest.raises(WireError, match=needle):
        DRIVE.decode(payload, size, {})


def test_a_valid_payload_read_at_another_size_is_refused() -> None:
    data, _ = DRIVE.encode(_gaussian(157, 0), None, {"feedback": False})
    assert DRIVE.decode(data, 157, {}).shape == (157,)
    for wrong in (0, 100, 300, 10**9):  # (156 would fit: 128 + 28 padded to 32, as 157)
        with pytest.raises(WireError, match="header implies"):
            DRIVE.decode(data, wrong, {})
