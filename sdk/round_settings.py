"""What a device is told to do in a round, typed: the one place its defaults and checks live.

The aggregator builds ``RoundSettings`` from its configuration (``aggregator.strategy``) and sends it
in every ``Announcement``; the device receives it typed and uses it as it is. Both ends therefore
agree on every default (no device-side fallbacks), and a value the device would refuse is refused
by the aggregator before its first round. Local SGD follows McMahan et al. 2017 (E, B, lr) with
FedProx's proximal term (Li et al., MLSys 2020) and Nesterov momentum (Sutskever et al. 2013).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any, Mapping

from .errors import ConfigError
from .optim import check_sgd_hyper

TASK_TRAIN, TASK_GRADIENT = "train", "gradient"  # local training (FL) | one mini-batch gradient (large batch)
# Buffered asynchronous FL (FedBuff, Nguyen et al. 2022): the selected devices train again and again from the
# newest model they hold until a newer announcement or its deadline; each result is one update.
TASK_TRAIN_CONTINUOUS = "train_continuous"
TASKS = (TASK_TRAIN, TASK_GRADIENT, TASK_TRAIN_CONTINUOUS)
MAX_BATCH_SIZE = 1 << 20  # a batch this large is a typo or an attack, not a setting
MAX_LOCAL_ITERATIONS = 1 << 20  # epochs or steps: bounds the work one announcement can ask for
MAX_REAL_SETTING = 1e6  # lr, weight decay, prox mu: larger is a typo or an attack


def _integer(name: str, value: Any, upper: int, optional: bool = False) -> None:
    if optional and value is None:
        return
    # bool is an int subclass; True as a batch size is a bug, not a number.
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= upper:
        raise ConfigError(f"round setting {name} must be an integer in [1, {upper}], got {value!r}")


def _bounded(name: str, value: float) -> float:
    number = float(value)  # already a finite real: check_sgd_hyper ran first
    if number > MAX_REAL_SETTING:
        raise ConfigError(f"round setting {name} must be <= {MAX_REAL_SETTING:g}, got {value!r}")
    return number


@dataclass(frozen=True)
class RoundSettings:
    """The device's local optimiser and schedule for one round (defaults are the protocol's)."""

    lr: float = 0.05
    momentum: float = 0.0
    nesterov: bool = False
    weight_decay: float = 0.0
    prox_mu: float = 0.0  # FedProx mu; 0 is plain local SGD
    batch_size: int = 32  # B
    local_epochs: int = 1  # E
    local_steps: int | None = None  # exactly K steps instead of E epochs when set
    # The round's updates travel masked (SecAgg+, ``sdk.secagg``): the device answers the secure-aggregation
    # stages on its secagg topics instead of sending an Update the aggregator could read.
    secure_aggregation: bool = False

    def __post_init__(self) -> None:
        for flag in ("nesterov", "secure_aggregation"):
            if not isinstance(getattr(self, flag), bool):
                raise ConfigError(f"round setting {flag} must be true or false, got {getattr(self, flag)!r}")
        # The optimiser's rules live in one place (sdk.optim); the frame adds upper bounds only.
        check_sgd_hyper(lr=self.lr, momentum=self.momentum, nesterov=self.nesterov, weight_decay=self.weight_decay,
                        prox_mu=self.prox_mu, names={name: f"round setting {name}" for name in
                                                     ("lr", "momentum", "dampening", "weight_decay", "prox_mu")})
        for name in ("lr", "momentum", "weight_decay", "prox_mu"):  # frozen: normalise ints to floats once, here
            object.__setattr__(self, name, _bounded(name, getattr(self, name)))
        _integer("batch_size", self.batch_size, MAX_BATCH_SIZE)
        _integer("local_epochs", self.local_epochs, MAX_LOCAL_ITERATIONS)
        _integer("local_steps", self.local_steps, MAX_LOCAL_ITERATIONS, optional=True)

    def to_dict(self) -> dict[str, Any]:
        """JSON-able, every field present (the frame carries the settings whole)."""
        return asdict(self)

    @classmethod
    def from_mapping(cls, raw: Mapping[str, Any]) -> "RoundSettings":
        """Settings from a decoded frame or a config file; unknown or bad keys raise ConfigError."""
        if not isinstance(raw, Mapping):
            raise ConfigError(f"round settings must be a mapping, got {type(raw).__name__}")
        known = {f.name for f in fields(cls)}
        unknown = sorted(str(key) for key in raw if key not in known)
        if unknown:
            raise ConfigError(f"unknown round setting(s) {', '.join(unknown)} (known: {', '.join(sorted(known))})")
        return cls(**{str(key): value for key, value in raw.items()})
