"""Adversarial devices, for testing robust aggregation (``edgetrain device --attack KIND``).

A Byzantine device of Blanchard et al. (NeurIPS 2017) may send anything; these are the classic
kinds used to evaluate robust rules:

* ``sign-flip`` — sends −Δ, pushing the model uphill (Damaskinos et al. 2018; Li et al. 2019);
* ``scale`` — sends 100·Δ, so one device dominates a mean (the boosting of Bhagoji et al. 2019);
* ``random`` — sends i.i.d. N(0, 1) entries, Blanchard et al.'s "Gaussian" Byzantine worker;
* ``label-flip`` — trains honestly on labels l → C − 1 − l (Fang et al., USENIX Security 2020).

The device applies ``poison_update`` to every update vector it sends (one place, ``Device._update``)
and ``poison_labels`` to its labels once, when it loads its data.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .errors import ConfigError

ATTACK_KINDS = ("sign-flip", "scale", "random", "label-flip")
SCALE_FACTOR = 100.0


@dataclass(frozen=True)
class Attack:
    """What an adversarial device does to its update or labels."""

    kind: str

    def __post_init__(self) -> None:
        if self.kind not in ATTACK_KINDS:
            raise ConfigError(f"unknown attack {self.kind!r}; known: {', '.join(ATTACK_KINDS)}")

    def poison_update(self, update: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """The flat float32 update this attacker sends in place of ``update``."""
        vector = np.asarray(update, dtype=np.float32)
        if self.kind == "sign-flip":
            return -vector
        if self.kind == "scale":
            return vector * np.float32(SCALE_FACTOR)
        if self.kind == "random":
            return rng.standard_normal(vector.size, dtype=np.float32)
        return vector  # label-flip poisons the data, not the update

    def poison_labels(self, labels: np.ndarray, num_classes: int) -> np.ndarray:
        """The labels this attacker trains on: l → C − 1 − l for ``label-flip``, else unchanged."""
        if self.kind != "label-flip":
            return labels
        if num_classes < 2:
            raise ConfigError(f"label-flip needs at least 2 classes, the model has {num_classes}")
        return (num_classes - 1 - labels).astype(labels.dtype)
