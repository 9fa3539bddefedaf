"""``--aggregation RULE``: a robust aggregation rule wrapped around an FL strategy.

``RobustAggregation`` takes the round's validated updates in place of the wrapped strategy, combines
them with a rule of ``aggregator.robust`` and hands the wrapped strategy that one vector, so the
server step (FedAvg, FedAvgM, FedAdam…), selection and device settings stay the wrapped strategy's.
Memory per round: ``median``, ``trimmed-mean`` and ``multi-krum`` need every update of the round at
once, O(devices × model) float32 (10 devices × 1 M parameters: 40 MB); ``norm-bound`` streams, each
update clipped as it arrives into the wrapped strategy's O(model) running mean.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, ClassVar, Mapping, Sequence

import numpy as np

from edgetrain.sdk.errors import ConfigError
from edgetrain.sdk.spec_text import spec_number, split_spec

from .robust import (clip_to_norm, coordinate_median, krum_min_updates, multi_krum, multi_krum_selection,
                     trimmed_count, trimmed_mean)
from .strategy import AggregateInfo, RoundPlan, Strategy

MEAN = "mean"
# rule -> (required parameters, optional parameters)
RULE_PARAMETERS: Mapping[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    MEAN: ((), ()),
    "median": ((), ()),
    "trimmed-mean": (("beta",), ()),
    "multi-krum": (("f",), ("m",)),
    "norm-bound": (("max",), ()),
}
BUFFERING_RULES = frozenset({"median", "trimmed-mean", "multi-krum"})


@dataclass(frozen=True)
class AggregationRule:
    """A parsed ``--aggregation`` spec; the constructor checks what needs no knowledge of the fleet."""

    kind: str = MEAN
    beta: float | None = None  # trimmed-mean: share dropped from each end of every coordinate
    f: int | None = None  # multi-krum: Byzantine updates tolerated per round
    m: int | None = None  # multi-krum: updates averaged (None: n − f)
    max_norm: float | None = None  # norm-bound: L2 bound M

    def __post_init__(self) -> None:
        if self.kind not in RULE_PARAMETERS:
            raise ConfigError(f"unknown aggregation rule {self.kind!r}; known: {', '.join(RULE_PARAMETERS)}")
        given = {key for key, value in (("beta", self.beta), ("f", self.f), ("m", self.m), ("max", self.max_norm))
                 if value is not None}
        required, optional = RULE_PARAMETERS[self.kind]
        if missing := set(required) - given:
            raise ConfigError(f"aggregation {self.kind} needs {', '.join(sorted(missing))}=…, e.g. {_EXAMPLES[self.kind]}")
        if unknown := given - set(required) - set(optional):
            raise ConfigError(f"aggregation {self.kind} takes no {', '.join(sorted(unknown))}; e.g. {_EXAMPLES[self.kind]}")
        if self.beta is not None:
            trimmed_count(1, self.beta)  # ConfigError unless 0 <= beta < 0.5
        if self.f is not None and (isinstance(self.f, bool) or not isinstance(self.f, int) or self.f < 0):
            raise ConfigError(f"multi-krum's f must be an integer >= 0, got {self.f!r}")
        if self.m is not None and (isinstance(self.m, bool) or not isinstance(self.m, int) or self.m < 1):
            raise ConfigError(f"multi-krum's m must be an integer >= 1, got {self.m!r}")
        if self.max_norm is not None and not (math.isfinite(self.max_norm) and self.max_norm > 0):
            raise ConfigError(f"norm-bound's max must be finite and > 0, got {self.max_norm}")

    @classmethod
    def parse(cls, spec: str) -> "AggregationRule":
        """``mean`` | ``median`` | ``trimmed-mean:beta=B`` | ``multi-krum:f=F[,m=M]`` | ``norm-bound:max=M``."""
        kind, params = split_spec(spec, "--aggregation")
        if kind not in RULE_PARAMETERS:
            raise ConfigError(f"--aggregation {spec!r}: unknown rule {kind!r}; known: {', '.join(RULE_PARAMETERS)}")
        values: dict[str, Any] = {}
        for key, text in params.items():
            field_name = {"max": "max_norm"}.get(key, key)
            if field_name not in ("beta", "f", "m", "max_norm"):
                raise ConfigError(f"--aggregation {spec!r}: unknown parameter {key!r}")
            values[field_name] = spec_number(f"--aggregation {kind}", key, text, integer=key in ("f", "m"))
        return cls(kind, **values)

    def __str__(self) -> str:
        params = [f"{key}={value:g}" if isinstance(value, float) else f"{key}={value}"
                  for key, value in (("beta", self.beta), ("f", self.f), ("m", self.m), ("max", self.max_norm))
                  if value is not None]
        return self.kind + (":" + ",".join(params) if params else "")

    @property
    def buffers(self) -> bool:
        """Whether the rule needs the whole round's updates at once (O(devices × model) memory)."""
        return self.kind in BUFFERING_RULES

    def min_updates(self) -> int:
        """The fewest updates a round needs for the rule to be defined (and to defend)."""
        if self.kind == "multi-krum":
            assert self.f is not None  # __post_init__
            return max(krum_min_updates(self.f), self.f + (self.m or 1))
        return 1

    def combine(self, updates: np.ndarray) -> np.ndarray:
        """The rule applied to the round's stacked updates (buffering rules only)."""
        if self.kind == "median":
            return coordinate_median(updates)
        if self.kind == "trimmed-mean":
            assert self.beta is not None
            return trimmed_mean(updates, self.beta)
        if self.kind == "multi-krum":
            assert self.f is not None
            return multi_krum(updates, self.f, self.m)
        raise ConfigError(f"aggregation {self.kind} streams; it has no whole-round combine")


_EXAMPLES = {MEAN: "mean", "median": "median", "trimmed-mean": "trimmed-mean:beta=0.1",
             "multi-krum": "multi-krum:f=2 or multi-krum:f=2,m=4", "norm-bound": "norm-bound:max=1.0"}


class RobustAggregation(Strategy):
    """``rule`` in place of the wrapped strategy's mean; everything else is the wrapped strategy's."""

    name: ClassVar[str] = "robust"  # replaced per instance by the wrapped strategy's name

    def __init__(self, inner: Strategy, rule: AggregationRule) -> None:
        if rule.kind == MEAN:
            raise ConfigError("aggregation mean is the wrapped strategy itself; use with_aggregation()")
        self.inner = inner
        self.rule = rule
        self.name = inner.name  # type: ignore[misc]  # what the announcements and checkpoints name
        self.min_devices = inner.min_devices
        _check_fits(rule, inner.min_devices)
        self._updates: list[np.ndarray] = []
        self._device_ids: list[str] = []
        self._total_examples = 0
        self._norm_bounded = 0
        self._open = False

    # -- selection: the wrapped strategy's ------------------------------------------------------
    def enough(self, reported: int) -> bool:
        return self.inner.enough(reported)

    def accepts_more(self) -> bool:
        return self.inner.accepts_more()

    def ready(self, num_live: int) -> bool:
        return self.inner.ready(num_live)

    def configure_round(self, round_id: int, live_devices: Sequence[str], rng: np.random.Generator) -> RoundPlan:
        return self.inner.configure_round(round_id, live_devices, rng)

    # -- accumulation ----------------------------------------------------------------------------
    def begin_round(self, params: np.ndarray) -> None:
        self.inner.begin_round(params)
        self._updates, self._device_ids = [], []
        self._total_examples = self._norm_bounded = 0
        self._open = True

    def accumulate(self, update_vector: np.ndarray, num_examples: int, device_id: str) -> None:
        if not self._open:
            raise ConfigError(f"{self.name} ({self.rule}): no round is open; call begin_round(params) first")
        if device_id in self._device_ids:  # validation rejects duplicates first; here it is a caller bug
            raise ConfigError(f"{self.name} ({self.rule}): device {device_id!r} already reported this round")
        if self.rule.kind == "norm-bound":
            assert self.rule.max_norm is not None
            update_vector, scaled = clip_to_norm(update_vector, self.rule.max_norm)
            self.inner.accumulate(update_vector, num_examples, device_id)  # checks num_examples
            self._norm_bounded += int(scaled)
        else:
            if isinstance(num_examples, bool) or not isinstance(num_examples, (int, np.integer)) or num_examples < 1:
                raise ConfigError(f"{self.name}: num_examples must be an integer >= 1, got {num_examples!r}")
            self._updates.append(np.array(update_vector, dtype=np.float32))  # a copy: the caller may reuse its buffer
        self._device_ids.append(device_id)
        self._total_examples += int(num_examples)

    def aggregate(self, params: np.ndarray) -> tuple[np.ndarray, AggregateInfo]:
        if not self._open:
            raise ConfigError(f"{self.name} ({self.rule}): no round is open; call begin_round(params) first")
        metrics: dict[str, Any] = {"aggregation": str(self.rule)}
        if self.rule.buffers:
            if not self._updates:
                raise ConfigError(f"{self.rule}: no update was accumulated this round")
            stacked = np.stack(self._updates)
            self.inner.accumulate(self.rule.combine(stacked), 1, f"aggregate:{self.rule.kind}")
            if self.rule.kind == "multi-krum":
                assert self.rule.f is not None
                chosen = set(multi_krum_selection(stacked, self.rule.f, self.rule.m).tolist())
                metrics["krum_left_out"] = sorted(d for i, d in enumerate(self._device_ids) if i not in chosen)
        else:
            metrics["norm_bounded"] = self._norm_bounded
        new_params, info = self.inner.aggregate(params)
        self._open = False
        self._updates = []
        return new_params, dataclasses.replace(info, num_updates=len(self._device_ids),
                                               total_examples=self._total_examples, rule_metrics=metrics)

    # -- checkpointing: the wrapped strategy's, plus the rule --------------------------------------
    def state_dict(self) -> dict[str, np.ndarray]:
        return self.inner.state_dict()

    def state_meta(self) -> dict[str, Any]:
        return {**self.inner.state_meta(), "aggregation": str(self.rule)}

    def load_state_dict(self, arrays: Mapping[str, np.ndarray], meta: Mapping[str, Any]) -> None:
        saved = meta.get("aggregation", MEAN)
        if saved != str(self.rule):
            raise ConfigError(f"checkpoint was aggregated with {saved!r}, this run uses {str(self.rule)!r}; "
                              "resume with the same --aggregation")
        self.inner.load_state_dict(arrays, {k: v for k, v in meta.items() if k != "aggregation"})
        self._open = False


def _check_fits(rule: AggregationRule, min_updates: int) -> None:
    """Refuse, before any round, a rule that a round closing with ``min_updates`` updates would break."""
    needed = rule.min_updates()
    if min_updates < needed:
        raise ConfigError(f"--aggregation {rule} needs at least {needed} updates per round (Krum: n >= 2f+3"
                          f"{', and n >= f+m' if rule.m else ''}); a round may close with --min-devices "
                          f"{min_updates}: raise --min-devices to {needed} or lower f")
    if rule.kind == "trimmed-mean" and rule.beta is not None and trimmed_count(min_updates, rule.beta) == 0:
        raise ConfigError(f"--aggregation {rule} trims floor({rule.beta:g} x {min_updates}) = 0 updates from each "
                          f"end when a round closes with --min-devices {min_updates}: that is the plain mean; "
                          f"raise beta to at least {1 / min_updates:.3g} (below 0.5) or raise --min-devices")


def with_aggregation(strategy: Strategy, rule: AggregationRule) -> Strategy:
    """``strategy`` itself for ``mean``, else wrapped in ``RobustAggregation``."""
    return strategy if rule.kind == MEAN else RobustAggregation(strategy, rule)
