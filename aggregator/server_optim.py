"""Server optimisers for Large Batch Training: pure numpy steps on the averaged gradient.

Every step the aggregator averages N devices' mini-batch gradients (an effective batch of N·b) and
applies one of these; devices then apply the same parameter change locally. The functions follow
``torch.optim.SGD``'s conventions so that a step over the broker equals a centralized torch step:

* SGD with momentum / Nesterov and L2 weight decay (``g ← g + λw``; ``buf ← μ·buf + g``, ``buf = g``
  on the first step; Nesterov uses ``g + μ·buf``).
* LARS (You, Gitman, Ginsburg 2017, "Large Batch Training of Convolutional Networks"): a per-layer
  trust ratio ``η‖w‖ / (‖∇w‖ + λ‖w‖)`` scales each layer's step; 1-D parameters (biases, norm scales)
  are left unscaled, as is common practice.
* The linear scaling rule and gradual warm-up (Goyal et al. 2017, "Accurate, Large Minibatch SGD"):
  ``lr = base_lr · global_batch / reference_batch``, reached linearly from ``base_lr`` over
  ``warmup_steps``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Mapping, Sequence

import numpy as np

from edgetrain.sdk.errors import ConfigError

OptimState = dict[str, np.ndarray]
OPTIMIZERS = ("sgd", "lars")


@dataclass(frozen=True)
class LargeBatchHyper:
    optimizer: str = "sgd"
    base_lr: float = 0.05
    momentum: float = 0.9
    nesterov: bool = False
    weight_decay: float = 0.0
    trust_coefficient: float = 0.001  # LARS η
    scale_lr: bool = False  # Goyal et al.'s linear scaling rule
    reference_batch: int = 32  # the batch ``base_lr`` was tuned for
    warmup_steps: int = 0

    def __post_init__(self) -> None:
        if self.optimizer not in OPTIMIZERS:
            raise ConfigError(f"unknown large-batch optimizer {self.optimizer!r}; known: {', '.join(OPTIMIZERS)}")
        if not (math.isfinite(self.base_lr) and self.base_lr > 0):
            raise ConfigError(f"lr must be finite and > 0, got {self.base_lr}")
        if not 0.0 <= self.momentum < 1.0:
            raise ConfigError(f"momentum must be in [0, 1), got {self.momentum}")
        if self.nesterov and self.momentum == 0:
            raise ConfigError("nesterov needs momentum > 0")
        if not (math.isfinite(self.weight_decay) and self.weight_decay >= 0):
            raise ConfigError(f"weight_decay must be >= 0, got {self.weight_decay}")
        if not self.trust_coefficient > 0:
            raise ConfigError(f"LARS trust coefficient must be > 0, got {self.trust_coefficient}")
        if self.reference_batch < 1 or self.warmup_steps < 0:
            raise ConfigError("reference_batch must be >= 1 and warmup_steps >= 0")


def learning_rate(hyper: LargeBatchHyper, step: int, global_batch: int) -> float:
    """The step's learning rate: linear scaling (if asked) reached by gradual warm-up (Goyal et al.)."""
    target = hyper.base_lr * (global_batch / hyper.reference_batch if hyper.scale_lr else 1.0)
    if hyper.warmup_steps and step < hyper.warmup_steps:
        return hyper.base_lr + (target - hyper.base_lr) * (step + 1) / hyper.warmup_steps
    return target


def _segments_from_shapes(shapes: Sequence[tuple[int, ...]]) -> list[tuple[int, int, bool]]:
    out, offset = [], 0
    for shape in shapes:
        size = math.prod(shape)
        out.append((offset, offset + size, len(shape) > 1))
        offset += size
    return out


def sgd_direction(params: np.ndarray, grad: np.ndarray, state: Mapping[str, np.ndarray],
                  hyper: LargeBatchHyper) -> tuple[np.ndarray, OptimState]:
    """torch.optim.SGD's update direction (before multiplying by lr) and the new momentum buffer."""
    g = grad.astype(np.float32, copy=True)
    if hyper.weight_decay:
        g += np.float32(hyper.weight_decay) * params
    if not hyper.momentum:
        return g, {}
    buf = state.get("momentum")
    buf = g.copy() if buf is None else np.float32(hyper.momentum) * buf + g
    direction = g + np.float32(hyper.momentum) * buf if hyper.nesterov else buf
    return direction, {"momentum": buf}


def sgd_step(params: np.ndarray, grad: np.ndarray, state: Mapping[str, np.ndarray], hyper: LargeBatchHyper,
             lr: float) -> tuple[np.ndarray, OptimState]:
    """One SGD (momentum / Nesterov, weight decay) step; returns the new parameters and state."""
    direction, new_state = sgd_direction(params, grad, state, hyper)
    return (params - np.float32(lr) * direction).astype(np.float32), new_state


def lars_step(params: np.ndarray, grad: np.ndarray, state: Mapping[str, np.ndarray], hyper: LargeBatchHyper,
              lr: float, shapes: Sequence[tuple[int, ...]]) -> tuple[np.ndarray, OptimState]:
    """LARS (You et al. 2017): per-layer lr·trust, then momentum on the scaled step.

    ``v ← μ·v + lr·trust_l·(∇w_l + λw_l)``; ``w ← w − v``; trust_l = η‖w_l‖/(‖∇w_l‖ + λ‖w_l‖), 1 for
    1-D tensors and where a norm is zero.
    """
    segments = _segments_from_shapes(shapes)
    covered = segments[-1][1] if segments else 0
    if covered != params.size:
        raise ConfigError(f"LARS layer shapes cover {covered} entries, the vector has {params.size}")
    scaled = np.empty_like(params)
    for start, stop, adapt in segments:
        w, g = params[start:stop], grad[start:stop].astype(np.float32)
        trust = 1.0
        if adapt:
            w_norm = float(np.linalg.norm(w.astype(np.float64)))
            g_norm = float(np.linalg.norm(g.astype(np.float64)))
            if w_norm > 0 and g_norm > 0:
                trust = hyper.trust_coefficient * w_norm / (g_norm + hyper.weight_decay * w_norm)
        scaled[start:stop] = np.float32(lr * trust) * (g + np.float32(hyper.weight_decay) * w)
    buf = state.get("momentum")
    buf = scaled if buf is None else np.float32(hyper.momentum) * buf + scaled
    return (params - buf).astype(np.float32), {"momentum": buf}
