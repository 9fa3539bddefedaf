"""The runtime seam: what every on-device training backend (torch, ONNX Runtime, ExecuTorch) does.

Inputs are numpy: ``x`` float32 of shape ``(B, *manifest.input_shape)`` (already normalised, see
``sdk.data.to_model_input``), ``y`` int64 class labels of shape ``(B,)``. Parameters cross the seam as
one flat float32 vector in manifest order, so aggregation, codecs and the wire never see a framework.
"""
from __future__ import annotations

import time
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Callable, ContextManager, Iterable

import numpy as np

from ..bundle import Manifest
from ..errors import ConfigError
from ..optim import SGDHyper, check_sgd_hyper


def check_batch(x: np.ndarray, y: np.ndarray, manifest: Manifest,
                nonempty_for: str | None = None) -> tuple[np.ndarray, np.ndarray]:
    """One numpy batch checked against the manifest: contiguous float32 inputs, int64 labels in range.
    ``nonempty_for`` names the operation that cannot take an empty batch ("gradient", "evaluate")."""
    x = np.asarray(x)
    y = np.asarray(y)
    if x.ndim != 1 + len(manifest.input_shape) or tuple(x.shape[1:]) != manifest.input_shape:
        raise ConfigError(f"input batch has shape {x.shape}, expected (B, {', '.join(map(str, manifest.input_shape))})")
    if y.shape != (x.shape[0],):
        raise ConfigError(f"labels have shape {y.shape}, expected ({x.shape[0]},) to match the inputs")
    if not np.issubdtype(y.dtype, np.integer):
        raise ConfigError(f"labels must be integers, got {y.dtype}")
    if y.size and (y.min() < 0 or y.max() >= manifest.num_classes):
        raise ConfigError(f"labels must lie in [0, {manifest.num_classes}), got [{y.min()}, {y.max()}]")
    if nonempty_for is not None and y.size == 0:
        raise ConfigError(f"{nonempty_for} needs a non-empty batch")
    return np.ascontiguousarray(x, dtype=np.float32), np.ascontiguousarray(y, dtype=np.int64)


def check_evaluation(x: np.ndarray, y: np.ndarray, manifest: Manifest,
                     batch_size: int) -> tuple[np.ndarray, np.ndarray]:
    """``check_batch`` for ``Runtime.evaluate``, plus its batch size."""
    if batch_size < 1:
        raise ConfigError(f"evaluation batch size must be >= 1, got {batch_size}")
    return check_batch(x, y, manifest, nonempty_for="evaluate")


@dataclass(frozen=True)
class TrainConfig:
    """Local optimiser settings for one call of ``Runtime.train`` (fresh optimiser state each call).

    ``prox_mu`` > 0 adds FedProx's proximal term mu/2·||w − w_start||² (Li et al., MLSys 2020),
    where ``w_start`` are the parameters at the start of the call.
    """

    lr: float
    momentum: float = 0.0
    weight_decay: float = 0.0
    nesterov: bool = False
    prox_mu: float = 0.0

    def __post_init__(self) -> None:
        check_sgd_hyper(lr=self.lr, momentum=self.momentum, nesterov=self.nesterov,
                        weight_decay=self.weight_decay, prox_mu=self.prox_mu)

    def sgd_hyper(self) -> SGDHyper:
        """These settings for the numpy SGD kernel (``edgetrain.sdk.optim``)."""
        return SGDHyper(lr=self.lr, momentum=self.momentum, nesterov=self.nesterov,
                        weight_decay=self.weight_decay, prox_mu=self.prox_mu)


# One optimiser step on a checked, non-empty batch; returns the batch's mean cross-entropy (without
# any proximal term, so losses stay comparable across prox_mu settings).
TrainStep = Callable[[np.ndarray, np.ndarray], float]


@dataclass(frozen=True)
class TrainResult:
    steps: int
    examples: int
    mean_loss: float
    compute_s: float


@dataclass(frozen=True)
class GradientResult:
    gradient: np.ndarray  # flat float32, manifest order; mean over the batch
    loss: float
    examples: int


@dataclass(frozen=True)
class EvalResult:
    examples: int
    loss: float
    accuracy: float


class Runtime(ABC):
    """One loaded bundle, ready to train. Backends import their heavy library lazily."""

    name: str = "abstract"

    def __init__(self, manifest: Manifest) -> None:
        self.manifest = manifest

    def set_threads(self, threads: int) -> None:
        """Cap the backend's intra-op threads (one per device process keeps N simulated devices from
        oversubscribing the cores). Backends without such a knob keep this no-op."""

    @abstractmethod
    def get_parameters(self) -> np.ndarray:
        """A copy of the parameters as the flat float32 vector."""

    @abstractmethod
    def set_parameters(self, flat: np.ndarray) -> None:
        """Overwrite every parameter from the flat float32 vector (checked against the manifest)."""

    def train(self, batches: Iterable[tuple[np.ndarray, np.ndarray]], config: TrainConfig) -> TrainResult:
        """One optimiser step per batch, in order: the one training loop every backend shares.

        Each batch is checked against the manifest; empty batches are skipped (no step). ``mean_loss``
        is the example-weighted mean cross-entropy (NaN when no batch came); ``compute_s`` times the
        steps, not the optimiser's set-up.
        """
        steps = examples = 0
        loss_sum = 0.0
        with self._training(config) as step:
            started = time.perf_counter()
            for x, y in batches:
                x, y = check_batch(x, y, self.manifest)
                if len(y) == 0:
                    continue
                loss_sum += step(x, y) * len(y)
                steps += 1
                examples += len(y)
            compute_s = time.perf_counter() - started
        mean_loss = loss_sum / examples if examples else float("nan")
        return TrainResult(steps=steps, examples=examples, mean_loss=mean_loss, compute_s=compute_s)

    def warm_up(self) -> None:
        """Pay the backend's first-step costs (lazy imports, allocations, kernel selection) now, while the
        device loads, rather than in its first round; the model must come out exactly as it went in.
        Backends whose first step costs nothing worth moving keep this no-op."""

    @abstractmethod
    def _training(self, config: TrainConfig) -> ContextManager[TrainStep]:
        """The backend's primitive under ``train``: set up a fresh optimiser for one call (no state may
        leak across rounds once parameters are replaced), yield its ``TrainStep``, clean up on exit."""

    @abstractmethod
    def gradient(self, x: np.ndarray, y: np.ndarray) -> GradientResult:
        """The mean-loss gradient on one batch, without changing the parameters."""

    @abstractmethod
    def evaluate(self, x: np.ndarray, y: np.ndarray, batch_size: int = 1000) -> EvalResult:
        """Mean loss and accuracy over all of ``x``."""
