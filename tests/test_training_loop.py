"""The one training loop (Runtime.train) over a backend's TrainStep, with a recording numpy backend."""
from __future__ import annotations

import math
from contextlib import contextmanager
from typing import Iterator

import numpy as np
import pytest

from edgetrain.sdk.bundle import Manifest, ParamSpec
from edgetrain.sdk.errors import ConfigError
from edgetrain.sdk.runtime import EvalResult, GradientResult, Runtime, TrainConfig, TrainStep


class RecordingRuntime(Runtime):
    """A backend whose step records what it was handed and returns a loss fixed per batch (its first x)."""

    name = "recording"

    def __init__(self, manifest: Manifest) -> None:
        super().__init__(manifest)
        self.seen: list[tuple[np.ndarray, np.ndarray]] = []
        self.sessions: list[str] = []

    @contextmanager
    def _training(self, config: TrainConfig) -> Iterator[TrainStep]:
        self.sessions.append("open")

        def step(x: np.ndarray, y: np.ndarray) -> float:
            self.seen.append((x, y))
            return float(x.reshape(len(y), -1)[0, 0])

        try:
            yield step
        finally:
            self.sessions.append("closed")

    def get_parameters(self) -> np.ndarray:
        return np.zeros(self.manifest.num_params, np.float32)

    def set_parameters(self, flat: np.ndarray) -> None:
        raise NotImplementedError

    def gradient(self, x: np.ndarray, y: np.ndarray) -> GradientResult:
        raise NotImplementedError

    def evaluate(self, x: np.ndarray, y: np.ndarray, batch_size: int = 1000) -> EvalResult:
        raise NotImplementedError


@pytest.fixture()
def runtime() -> RecordingRuntime:
    manifest = Manifest(model="linear", model_config={}, runtime="recording", input_shape=(2, 3), num_classes=4,
                        params=(ParamSpec("w", (4, 6), "float32", 0),), files={})
    return RecordingRuntime(manifest)


def _batch(manifest: Manifest, n: int, value: float) -> tuple[np.ndarray, np.ndarray]:
    return np.full((n, *manifest.input_shape), value, np.float64), np.zeros(n, np.int32)


def test_loop_steps_once_per_nonempty_batch_and_weights_the_loss_by_examples(runtime: RecordingRuntime) -> None:
    m = runtime.manifest
    batches = [_batch(m, 3, 1.0), _batch(m, 0, 9.0), _batch(m, 1, 5.0)]
    result = runtime.train(iter(batches), TrainConfig(lr=0.1))
    assert (result.steps, result.examples) == (2, 4)
    assert result.mean_loss == pytest.approx((3 * 1.0 + 1 * 5.0) / 4)
    assert result.compute_s >= 0
    # the step gets checked, contiguous float32 / int64 batches
    assert [(x.dtype, y.dtype, len(y)) for x, y in runtime.seen] == [(np.float32, np.int64, 3),
                                                                     (np.float32, np.int64, 1)]
    assert runtime.sessions == ["open", "closed"]


def test_no_batch_gives_nan_loss_and_zero_steps(runtime: RecordingRuntime) -> None:
    result = runtime.train(iter([_batch(runtime.manifest, 0, 1.0)]), TrainConfig(lr=0.1))
    assert (result.steps, result.examples) == (0, 0) and math.isnan(result.mean_loss)


def test_a_bad_batch_fails_and_still_closes_the_session(runtime: RecordingRuntime) -> None:
    m = runtime.manifest
    bad = (np.zeros((2, *m.input_shape), np.float32), np.array([0, m.num_classes]))
    with pytest.raises(ConfigError, match="labels must lie"):
        runtime.train(iter([_batch(m, 2, 1.0), bad]), TrainConfig(lr=0.1))
    assert runtime.sessions == ["open", "closed"] and len(runtime.seen) == 1
