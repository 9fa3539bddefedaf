"""Adversarial devices, for testing robust aggregation (``edgetrain device --attack KIND[:boost=B]``).

A Byzantine device of Blanchard et al. (NeurIPS 2017) may send anything; these are the classic
kinds used to evaluate robust rules, at the strengths their papers use:

* ``sign-flip`` — sends σ·Δ with σ = −boost, default −4: the sign-flipping attack of Li et al.
  (RSA, AAAI 2019), whose experiments use σ = −4. With a plain −Δ (σ = −1, Damaskinos et al. 2018)
  2 of 10 attackers only cancel 2 honest updates and slow FedAvg down; at σ = −4 they cancel all
  8 (8Δ − 2·4Δ ≈ 0), so the mean stops learning, which is the collapse the robust rules must resist;
* ``scale`` — sends boost·Δ, default 100, so one device dominates a mean (boosting, Bhagoji et al. 2019);
* ``random`` — sends i.i.d. N(0, 1) entries, Blanchard et al.'s "Gaussian" Byzantine worker (no boost);
* ``label-flip`` — trains on labels l → C − 1 − l (Fang et al., USENIX Security 2020) and sends
  boost·Δ, default 10: the explicit boosting of Bhagoji et al. (ICML 2019), whose boost factor is
  the number of agents K (10 in their runs and in edgetrain's attack table), undoing the 1/K weight
  of a mean. Unboosted (boost=1), 2 of 10 label flippers only slow FedAvg down.

The device applies ``poison_update`` to every update vector it sends (one place, ``Device._update``)
and ``poison_labels`` to its labels once, when it loads its data.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from .errors import ConfigError
from .spec_text import split_spec

ATTACK_KINDS = ("sign-flip", "scale", "random", "label-flip")
DEFAULT_BOOST = {"sign-flip": 4.0, "scale": 100.0, "label-flip": 10.0}  # random takes none
MAX_BOOST = 1e6  # larger overflows float32 updates into inf, which validation refuses: a typo, not an attack


@dataclass(frozen=True)
class Attack:
    """What an adversarial device does to its update or labels; ``boost`` None: the kind's default."""

    kind: str
    boost: float | None = None

    def __post_init__(self) -> None:
        if self.kind not in ATTACK_KINDS:
            raise ConfigError(f"unknown attack {self.kind!r}; known: {', '.join(ATTACK_KINDS)}")
        if self.boost is None:
            return
        if self.kind == "random":
            raise ConfigError("attack random takes no boost: it sends N(0, 1) entries whatever the update")
        if not (isinstance(self.boost, (int, float)) and math.isfinite(self.boost) and 0 < self.boost <= MAX_BOOST):
            raise ConfigError(f"attack {self.kind}: boost must be a number in (0, {MAX_BOOST:g}], got {self.boost!r}")

    @classmethod
    def parse(cls, text: str) -> "Attack":
        """``KIND`` or ``KIND:boost=B`` (e.g. ``label-flip:boost=10``) → the attack; bad input: ConfigError."""
        usage = "expected KIND or KIND:boost=B, e.g. label-flip:boost=10"
        try:
            kind, params = split_spec(text, "attack")
        except ConfigError as exc:
            raise ConfigError(f"{exc}; {usage}") from None
        if set(params) - {"boost"}:
            raise ConfigError(f"attack {text!r}: {usage}")
        if not params:
            return cls(kind)
        try:
            boost = float(params["boost"])  # NaN and inf too: the constructor says what a boost must be
        except ValueError:
            raise ConfigError(f"attack {text!r}: boost {params['boost']!r} is not a number") from None
        return cls(kind, boost)

    @property
    def factor(self) -> float:
        """The multiplier on the honest update Δ (1 for random, which replaces it)."""
        boost = self.boost if self.boost is not None else DEFAULT_BOOST.get(self.kind, 1.0)
        return -boost if self.kind == "sign-flip" else boost

    def __str__(self) -> str:
        """The spec ``parse`` reads back (a device's ``--attack`` flag)."""
        if self.boost is None:
            return self.kind
        short = f"{self.boost:g}"
        return f"{self.kind}:boost={short if float(short) == self.boost else repr(float(self.boost))}"

    def poison_update(self, update: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """The flat float32 update this attacker sends in place of ``update``."""
        vector = np.asarray(update, dtype=np.float32)
        if self.kind == "random":
            return rng.standard_normal(vector.size, dtype=np.float32)
        return vector * np.float32(self.factor)

    def poison_labels(self, labels: np.ndarray, num_classes: int) -> np.ndarray:
        """The labels this attacker trains on: l → C − 1 − l for ``label-flip``, else unchanged."""
        if self.kind != "label-flip":
            return labels
        if num_classes < 2:
            raise ConfigError(f"label-flip needs at least 2 classes, the model has {num_classes}")
        return (num_classes - 1 - labels).astype(labels.dtype)
