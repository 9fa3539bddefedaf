"""The runtime seam: what every on-device training backend (torch, ONNX Runtime, ExecuTorch) does.

Inputs are numpy: ``x`` float32 of shape ``(B, *manifest.input_shape)`` (already normalised, see
``sdk.data.to_model_input``), ``y`` int64 class labels of shape ``(B,)``. Parameters cross the seam as
one flat float32 vector in manifest order, so aggregation, codecs and the wire never see a framework.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Iterable

import numpy as np

from ..bundle import Manifest
from ..errors import ConfigError


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
        if not self.lr > 0:
            raise ConfigError(f"learning rate must be > 0, got {self.lr}")
        if not 0.0 <= self.momentum < 1.0:
            raise ConfigError(f"momentum must be in [0, 1), got {self.momentum}")
        if self.weight_decay < 0:
            raise ConfigError(f"weight_decay must be >= 0, got {self.weight_decay}")
        if self.prox_mu < 0:
            raise ConfigError(f"prox_mu must be >= 0, got {self.prox_mu}")
        if self.nesterov and self.momentum == 0:
            raise ConfigError("nesterov needs momentum > 0")


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

    @abstractmethod
    def train(self, batches: Iterable[tuple[np.ndarray, np.ndarray]], config: TrainConfig) -> TrainResult:
        """One optimiser step per batch, in order."""

    @abstractmethod
    def gradient(self, x: np.ndarray, y: np.ndarray) -> GradientResult:
        """The mean-loss gradient on one batch, without changing the parameters."""

    @abstractmethod
    def evaluate(self, x: np.ndarray, y: np.ndarray, batch_size: int = 1000) -> EvalResult:
        """Mean loss and accuracy over all of ``x``."""
