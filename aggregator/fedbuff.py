"""FedBuff: buffered asynchronous aggregation (Nguyen et al., AISTATS 2022, "Federated Learning with
Buffered Asynchronous Aggregation", Algorithm 1).

Devices train continuously from the newest model they hold; the server folds every update into a buffer
as it arrives, weighted by its staleness s = (current version − the update's base version), and steps
once the buffer holds K updates:

    Δ̄ = (1/K) · Σ_k w(s_k) · Δ_k,    w ← w + η · Δ̄,    version ← version + 1

with w(s) = 1/(1+s)^a ("poly", a = 0.5 by default, the paper's choice) or w(s) = 1 ("const"). As in
the paper the buffer divides by K, not by Σ w(s_k): stale updates shrink the step instead of being
renormalised away, and updates are not weighted by example counts. Updates staler than S are refused by
validation (``too_stale``) before they get here. Pure numpy apart from the Strategy plumbing.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar, Iterable, Sequence

import numpy as np

from edgetrain.sdk.errors import ConfigError
from edgetrain.sdk.round_settings import TASK_TRAIN_CONTINUOUS
from edgetrain.sdk.spec_text import spec_number, split_spec

from .aggregation import ServerHyper, fedavg_step
from .strategy import AggregateInfo, FedAvg, RoundPlan

DEFAULT_MAX_STALENESS = 20  # with poly a=0.5 an update 20 versions old still weighs 0.22
DEFAULT_STALENESS_WEIGHT = "poly:a=0.5"
MAX_EXPONENT = 100.0  # 1/(1+s)^100 is already 0 for any s >= 1: larger is a typo


@dataclass(frozen=True)
class StalenessWeight:
    """w(s): ``poly`` 1/(1+s)^exponent or ``const`` 1 (Nguyen et al. 2022, §3)."""

    kind: str = "poly"
    exponent: float = 0.5

    def __post_init__(self) -> None:
        if self.kind not in ("poly", "const"):
            raise ConfigError(f"staleness weight must be poly:a=A or const, got kind {self.kind!r}")
        if isinstance(self.exponent, bool) or not isinstance(self.exponent, (int, float)) \
                or not 0.0 <= self.exponent <= MAX_EXPONENT:
            raise ConfigError(f"staleness weight exponent a must be in [0, {MAX_EXPONENT:g}], got {self.exponent!r}")

    @classmethod
    def parse(cls, text: str) -> "StalenessWeight":
        """``poly`` | ``poly:a=A`` | ``const``; ConfigError names what is wrong."""
        usage = "use poly, poly:a=A (e.g. poly:a=0.5) or const"
        try:
            kind, params = split_spec(text, "staleness weight")
        except ConfigError as exc:
            raise ConfigError(f"{exc}; {usage}") from None
        if kind == "const":
            if params:
                raise ConfigError(f"staleness weight 'const' takes no parameters, got {text!r}")
            return cls("const", 0.0)
        if kind != "poly":
            raise ConfigError(f"unknown staleness weight {text!r}; {usage}")
        if not params:
            return cls()
        if set(params) != {"a"}:
            raise ConfigError(f"staleness weight {text!r}: the one parameter is a=A, e.g. poly:a=0.5")
        return cls("poly", float(spec_number(f"staleness weight {text!r}", "a", params["a"])))

    def __str__(self) -> str:
        return "const" if self.kind == "const" else f"poly:a={self.exponent:g}"

    def __call__(self, staleness: int) -> float:
        if isinstance(staleness, bool) or not isinstance(staleness, (int, np.integer)) or staleness < 0:
            raise ConfigError(f"staleness must be an integer >= 0, got {staleness!r}")
        return 1.0 if self.kind == "const" else float((1.0 + int(staleness)) ** -self.exponent)


def buffered_delta(deltas: Iterable[np.ndarray], stalenesses: Sequence[int], weight: StalenessWeight) -> np.ndarray:
    """The reference Δ̄ = (1/K) Σ_k w(s_k)·Δ_k of one full buffer (float64 sums, float32 result)."""
    rows = [np.asarray(d, dtype=np.float64) for d in deltas]
    if not rows or len(rows) != len(stalenesses):
        raise ConfigError(f"a buffer needs as many staleness values as updates (>= 1), got {len(rows)} "
                          f"updates and {len(stalenesses)} staleness values")
    return (sum(weight(s) * d for s, d in zip(stalenesses, rows)) / len(rows)).astype(np.float32)


class FedBuff(FedAvg):
    """FedBuff (Nguyen et al. 2022): step every ``buffer_size`` (K) updates, each weighted by its staleness.

    Any live device may contribute, and more than once to one buffer (a fast device contributes more:
    that is the point); validation bounds staleness at ``max_staleness`` (S) and clips norms as for FedAvg.
    ``server_lr`` is η. Devices are told ``train_continuous``: they train again from the newest model they
    hold as soon as they finish (``sdk.device``).
    """

    name: ClassVar[str] = "fedbuff"
    server_optimizer: ClassVar[str] = "fedavg"

    def __init__(self, buffer_size: int = 10, max_staleness: int = DEFAULT_MAX_STALENESS,
                 staleness_weight: str | StalenessWeight = DEFAULT_STALENESS_WEIGHT, server_lr: float = 1.0,
                 **client: Any) -> None:
        super().__init__(**client, server_hyper=ServerHyper(server_lr=server_lr))
        for what, value, low in (("buffer size K", buffer_size, 1), ("max staleness S", max_staleness, 0)):
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ConfigError(f"fedbuff: {what} must be an integer >= {low}, got {value!r}")
        self.buffer_size = buffer_size
        self.max_staleness = max_staleness
        self.staleness_weight = (staleness_weight if isinstance(staleness_weight, StalenessWeight)
                                 else StalenessWeight.parse(staleness_weight))
        self._sum: np.ndarray | None = None  # Σ w(s_k)·Δ_k of the open buffer (float64)
        self._stalenesses: list[int] = []

    def configure_round(self, round_id: int, live_devices: Sequence[str], rng: np.random.Generator) -> RoundPlan:
        plan = super().configure_round(round_id, live_devices, rng)
        return RoundPlan(round_id=plan.round_id, selected=plan.selected, task=TASK_TRAIN_CONTINUOUS,
                         settings=plan.settings)

    def begin_round(self, params: np.ndarray) -> None:
        super().begin_round(params)
        self._sum = np.zeros(params.size, dtype=np.float64)
        self._stalenesses = []

    def enough(self, reported: int) -> bool:
        return len(self._stalenesses) >= self.buffer_size

    def accepts_more(self) -> bool:
        return len(self._stalenesses) < self.buffer_size

    @property
    def buffered(self) -> int:
        """Updates in the open buffer."""
        return len(self._stalenesses)

    def accumulate(self, update_vector: np.ndarray, num_examples: int, device_id: str) -> None:
        self.accumulate_stale(update_vector, num_examples, device_id, 0)

    def accumulate_stale(self, update_vector: np.ndarray, num_examples: int, device_id: str,
                         staleness: int) -> None:
        """Fold one validated delta ``staleness`` versions old into the buffer (w(s)·Δ)."""
        if self._sum is None:
            raise ConfigError(f"{self.name}: no buffer is open; call begin_round(params) first")
        if not self.accepts_more():
            raise ConfigError(f"{self.name}: the buffer already holds its {self.buffer_size} updates")
        if isinstance(staleness, bool) or not isinstance(staleness, int) or not 0 <= staleness <= self.max_staleness:
            raise ConfigError(f"{self.name}: staleness must be an integer in [0, {self.max_staleness}], "
                              f"got {staleness!r} (validation rejects staler updates)")
        vector = np.asarray(update_vector)
        if vector.shape != self._sum.shape:
            raise ConfigError(f"{self.name}: update has shape {vector.shape}, the model {self._sum.shape}")
        self._sum += np.multiply(vector, self.staleness_weight(staleness), dtype=np.float64)
        self._stalenesses.append(staleness)
        self._total_examples += int(num_examples)

    def merge_partial(self, partial: Any, total_examples: int) -> None:
        raise ConfigError("fedbuff runs in one aggregator process; --workers is for the FedAvg family")

    def aggregate(self, params: np.ndarray) -> tuple[np.ndarray, AggregateInfo]:
        if self._sum is None or not self._stalenesses:
            raise ConfigError(f"{self.name}: the buffer is empty; nothing to step with")
        params = np.asarray(params, dtype=np.float32)
        delta = (self._sum / len(self._stalenesses)).astype(np.float32)
        new_params, _ = fedavg_step(params, delta, {}, self.server_hyper)
        self._rounds_aggregated += 1
        stalenesses, self._stalenesses, self._sum, self._mean = self._stalenesses, [], None, None
        info = AggregateInfo(
            num_updates=len(stalenesses), total_examples=self._total_examples,
            mean_delta_norm=float(np.linalg.norm(delta.astype(np.float64))),
            step_norm=float(np.linalg.norm(new_params.astype(np.float64) - params)),
            server_optimizer=self.server_optimizer, rounds_aggregated=self._rounds_aggregated,
            rule_metrics={"buffer": self.buffer_size, "staleness_mean": float(np.mean(stalenesses)),
                          "staleness_max": int(max(stalenesses))})
        return new_params, info

    def config(self) -> dict[str, Any]:
        return {**super().config(), "buffer_size": self.buffer_size, "max_staleness": self.max_staleness,
                "staleness_weight": str(self.staleness_weight)}
