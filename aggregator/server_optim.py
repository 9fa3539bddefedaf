"""Server optimisers for Large Batch Training: pure numpy steps on the averaged gradient.

Every step the aggregator averages N devices' mini-batch gradients (an effective batch of N·b) and
applies one of these; devices then apply the same parameter change locally. The functions follow
``torch.optim.SGD``'s conventions so that a step over the broker equals a centralized torch step:

* SGD with momentum / Nesterov and L2 weight decay (``g ← g + λw``; ``buf ← μ·buf + g``, ``buf = g``
  on the first step; Nesterov uses ``g + μ·buf``). Both optimisers step through the SDK's one SGD
  kernel, ``edgetrain.sdk.optim.sgd``.
* LARS (You, Gitman, Ginsburg 2017, "Large Batch Training of Convolutional Networks"): a per-layer
  trust ratio ``η‖w‖ / (‖∇w‖ + λ‖w‖)`` scales each layer's step; 1-D parameters (biases, norm scales)
  are left unscaled, as is common practice.
* The linear scaling rule and gradual warm-up (Goyal et al. 2017, "Accurate, Large Minibatch SGD"):
  ``lr = base_lr · global_batch / reference_batch``, reached linearly from ``base_lr`` over
  ``warmup_steps``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Sequence

import numpy as np

from edgetrain.sdk.errors import ConfigError
from edgetrain.sdk.optim import check_sgd_hyper, layer_segments, sgd

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
        check_sgd_hyper(lr=self.base_lr, momentum=self.momentum, nesterov=self.nesterov,
                        weight_decay=self.weight_decay, trust_coefficient=self.trust_coefficient,
                        names={"lr": "base_lr", "trust_coefficient": "LARS trust_coefficient"})
        if self.reference_batch < 1 or self.warmup_steps < 0:
            raise ConfigError("reference_batch must be >= 1 and warmup_steps >= 0")


def learning_rate(hyper: LargeBatchHyper, step: int, global_batch: int) -> float:
    """The step's learning rate: linear scaling (if asked) reached by gradual warm-up (Goyal et al.)."""
    target = hyper.base_lr * (global_batch / hyper.reference_batch if hyper.scale_lr else 1.0)
    if hyper.warmup_steps and step < hyper.warmup_steps:
        return hyper.base_lr + (target - hyper.base_lr) * (step + 1) / hyper.warmup_steps
    return target


def sgd_step(params: np.ndarray, grad: np.ndarray, state: Mapping[str, np.ndarray], hyper: LargeBatchHyper,
             lr: float) -> tuple[np.ndarray, OptimState]:
    """One SGD (momentum / Nesterov, weight decay) step; returns the new parameters and state."""
    new, buffer = sgd(params, grad, state.get("momentum"), lr=lr, momentum=hyper.momentum,
                      nesterov=hyper.nesterov, weight_decay=hyper.weight_decay)
    return new, ({} if buffer is None else {"momentum": buffer})


def lars_step(params: np.ndarray, grad: np.ndarray, state: Mapping[str, np.ndarray], hyper: LargeBatchHyper,
              lr: float, shapes: Sequence[tuple[int, ...]]) -> tuple[np.ndarray, OptimState]:
    """LARS (You et al. 2017): per-layer lr·trust, then momentum on the scaled step.

    ``v ← μ·v + lr·trust_l·(∇w_l + λw_l)``; ``w ← w − v``; trust_l = η‖w_l‖/(‖∇w_l‖ + λ‖w_l‖), 1 for
    1-D tensors and where a norm is zero. With ``nesterov`` the kernel's Nesterov direction applies.
    """
    new, buffer = sgd(params, grad, state.get("momentum"), lr=lr, momentum=hyper.momentum,
                      nesterov=hyper.nesterov, weight_decay=hyper.weight_decay,
                      trust_coefficient=hyper.trust_coefficient, segments=layer_segments(shapes))
    return new, ({} if buffer is None else {"momentum": buffer})
