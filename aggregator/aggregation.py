"""The aggregation arithmetic: pure numpy, no I/O, no threads.

Two pieces:

* ``WeightedMean`` — a streaming weighted mean of flat vectors. It keeps only the partial sums
  Σw·x (float64) and Σw, so memory is O(model) however many devices report, and two partial
  sums merge associatively: several aggregator workers can each keep one and a reducer adds
  them up. On the aggregator's hot path (``block_updates``) float32 updates are first summed in a
  float32 block that is flushed into the float64 sums every ``BLOCK_UPDATES`` updates.
* Server optimisers — pure ``step(params, delta, state, hyper) -> (new_params, new_state)``
  functions that apply the round's mean update (the negated pseudo-gradient) to the global
  parameters: FedAvg (McMahan et al., AISTATS 2017), FedAvgM (Hsu et al., 2019, "Measuring
  the Effects of Non-Identical Data Distribution…"), FedAdagrad / FedAdam / FedYogi (Reddi
  et al., ICLR 2021, "Adaptive Federated Optimization", Algorithm 2).

Updates are deltas ``w_local − w_round_start``, so the mean delta points *downhill* and every
optimiser adds it (Reddi et al. write ``Δ_t`` for the same quantity).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Mapping

import numpy as np

from edgetrain.sdk.errors import ConfigError
from edgetrain.sdk.optim import check_positive, check_sgd_hyper, check_unit_interval, sgd

try:  # BLAS axpy: acc += w·x in one fused pass, no temporary (scipy comes with the server extra)
    from scipy.linalg.blas import daxpy as _daxpy, saxpy as _saxpy
except ImportError:  # pragma: no cover - a server without scipy: the same sums in two passes
    _daxpy = _saxpy = None

# float32 updates are summed into a float32 block partial, flushed into the float64 sums every
# BLOCK_UPDATES adds: one saxpy over the update's 4-byte values per add instead of widening it and a
# daxpy over 8-byte sums (3x the memory traffic), and the flush (~1 float64 pass) is paid once per block.
# Each entry's error stays within ~BLOCK_UPDATES float32 roundings of the block's Σ|w·x| (bound tested).
BLOCK_UPDATES = 16
_MAX_BLOCK_WEIGHT = float(1 << 24)  # integer weights up to 2**24 are exact in float32; others go float64

ServerState = dict[str, np.ndarray]


def _check_vector(vector: np.ndarray, size: int, what: str) -> np.ndarray:
    array = np.asarray(vector)
    if array.ndim != 1 or array.size != size:
        raise ConfigError(f"{what} must be a 1-D vector of {size} entries, got shape {array.shape}")
    return array


class WeightedMean:
    """Streaming Σw·x / Σw over 1-D vectors of a fixed size (float64 sums, float32 result).

    ``block_updates`` > 0 (the aggregator's hot path uses ``BLOCK_UPDATES``): float32 vectors with integer
    weights are summed in float32 blocks of that many adds first (``_add_to_block``), every reader of the
    sums flushing the open block first. 0 (the default): every add goes straight into the float64 sums.
    """

    def __init__(self, size: int, block_updates: int = 0) -> None:
        if size <= 0:
            raise ConfigError(f"WeightedMean needs a positive vector size, got {size}")
        if isinstance(block_updates, bool) or not isinstance(block_updates, int) or block_updates < 0:
            raise ConfigError(f"block_updates must be an int >= 0, got {block_updates!r}")
        self.size = int(size)
        self.block_updates = block_updates
        self._weighted_sum = np.zeros(self.size, dtype=np.float64)
        self._block: np.ndarray | None = None  # float32 Σw·x of the last _block_count float32 adds
        self._block_count = 0
        self._total_weight = 0.0
        self._count = 0

    @classmethod
    def from_partial_sums(cls, weighted_sum: np.ndarray, total_weight: float, count: int) -> "WeightedMean":
        """Rebuild a partial mean shipped by another worker (its ``weighted_sum``, weight, count)."""
        array = np.asarray(weighted_sum)
        mean = cls(array.size)  # exact float64 sums: partials arrive summed
        _check_vector(array, mean.size, "weighted_sum")
        if not (math.isfinite(total_weight) and total_weight >= 0) or count < 0:
            raise ConfigError(f"bad partial sums: total_weight={total_weight}, count={count}")
        mean._weighted_sum[:] = array
        mean._total_weight = float(total_weight)
        mean._count = int(count)
        return mean

    @property
    def count(self) -> int:
        """How many vectors were added (including those merged in from other partial means)."""
        return self._count

    @property
    def total_weight(self) -> float:
        return self._total_weight

    @property
    def weighted_sum(self) -> np.ndarray:
        """A copy of Σw·x (float64), e.g. to ship to a reducer with ``total_weight`` and ``count``."""
        self._flush()
        return self._weighted_sum.copy()

    def add(self, vector: np.ndarray, weight: float) -> None:
        """Add ``weight · vector``; ``weight`` must be finite and > 0."""
        array = _check_vector(vector, self.size, "vector")
        weight = float(weight)
        if not (math.isfinite(weight) and weight > 0):
            raise ConfigError(f"weight must be finite and > 0, got {weight}")
        self._add_weighted(array, weight)
        self._total_weight += weight
        self._count += 1

    def _add_weighted(self, array: np.ndarray, weight: float) -> None:
        """Σw·x += weight·array: a float32 array into the float32 block (``_add_to_block``), anything else
        (or a weight float32 does not hold exactly) straight into the float64 sums.

        The float64 path is BLAS daxpy, one pass and no temporary (a float32 value is exact in float64,
        so only w· and + round: <= 2 ulp of the term per add, tests/test_hot_path.py).
        """
        if (self.block_updates and array.dtype == np.float32 and _saxpy is not None and array.flags.c_contiguous
                and weight <= _MAX_BLOCK_WEIGHT and weight == int(weight)):
            self._add_to_block(array, weight)
            return
        if _daxpy is None or array.dtype != np.float64 or not array.flags.c_contiguous:
            array = np.ascontiguousarray(array, dtype=np.float64)
        if _daxpy is None:
            self._weighted_sum += np.multiply(array, weight)
            return
        # The accumulator is float64 and contiguous, so daxpy updates it in place and returns it.
        self._weighted_sum = _daxpy(array, self._weighted_sum, a=weight)

    def _add_to_block(self, array: np.ndarray, weight: float) -> None:
        """block += weight·array with BLAS saxpy (the block's first add writes it: no zeroing pass).

        Callers keep |Σw·x| within a block far below float32's 3.4e38: validation hands updates with a norm
        >= 2**64 on as float64 (``ValidatedUpdate.accumulable``), so an integer weight <= 2**24 times
        BLOCK_UPDATES of them stays below 2**92.
        """
        if self._block_count == 0:
            if self._block is None:
                self._block = np.empty(self.size, dtype=np.float32)
            np.multiply(array, np.float32(weight), out=self._block)
        else:
            self._block = _saxpy(array, self._block, a=weight)
        self._block_count += 1
        if self._block_count == self.block_updates:
            self._flush()

    def _flush(self) -> None:
        """Fold the float32 block into the float64 sums (exact widening, one float64 rounding per entry)."""
        if self._block_count:
            self._weighted_sum += self._block
            self._block_count = 0

    def merge(self, other: "WeightedMean") -> None:
        """Fold another partial mean into this one (associative and commutative)."""
        if other.size != self.size:
            raise ConfigError(f"cannot merge a WeightedMean of size {other.size} into one of size {self.size}")
        self._flush()
        other._flush()
        self._weighted_sum += other._weighted_sum
        self._total_weight += other._total_weight
        self._count += other._count

    def result(self) -> np.ndarray:
        """The weighted mean as float32; fails when nothing was added."""
        if self._count == 0 or self._total_weight <= 0:
            raise ConfigError("weighted mean of zero vectors is undefined: no update was accumulated")
        self._flush()
        return (self._weighted_sum / self._total_weight).astype(np.float32)


@dataclass(frozen=True)
class ServerHyper:
    """Server-side optimiser settings; each step function reads the fields it needs.

    ``server_lr`` is η (1.0 with no momentum is plain FedAvg); ``momentum`` is FedAvgM's β;
    ``beta1``/``beta2``/``tau`` are Reddi et al.'s β₁, β₂ and adaptivity τ.
    """

    server_lr: float = 1.0
    momentum: float = 0.0
    beta1: float = 0.9
    beta2: float = 0.99
    tau: float = 1e-3

    def __post_init__(self) -> None:
        check_sgd_hyper(lr=self.server_lr, momentum=self.momentum,
                        names={"lr": "server_lr", "momentum": "server momentum"})
        check_unit_interval(self.beta1, "beta1")
        check_unit_interval(self.beta2, "beta2")
        check_positive(self.tau, "tau")


def _prepare(params: np.ndarray, delta: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    params = np.asarray(params, dtype=np.float32)
    if params.ndim != 1:
        raise ConfigError(f"params must be a flat vector, got shape {params.shape}")
    delta = _check_vector(delta, params.size, "delta").astype(np.float32, copy=False)
    return params, delta


def _state_array(state: Mapping[str, np.ndarray], key: str, size: int, optimizer: str) -> np.ndarray:
    if key not in state:
        raise ConfigError(f"{optimizer} state lacks {key!r}; build it with init_server_state({optimizer!r}, …)")
    return _check_vector(state[key], size, f"{optimizer} state {key!r}").astype(np.float32, copy=False)


def fedavg_step(params: np.ndarray, delta: np.ndarray, state: Mapping[str, np.ndarray],
                hyper: ServerHyper) -> tuple[np.ndarray, ServerState]:
    """FedAvg (McMahan et al. 2017): w ← w + η·Δ̄, η = 1 in the paper. Stateless."""
    params, delta = _prepare(params, delta)
    return params + np.float32(hyper.server_lr) * delta, {}


def fedavgm_step(params: np.ndarray, delta: np.ndarray, state: Mapping[str, np.ndarray],
                 hyper: ServerHyper) -> tuple[np.ndarray, ServerState]:
    """FedAvgM (Hsu et al. 2019): v ← β·v + Δ̄; w ← w + η·v (server momentum on the mean delta).

    This is the SGD kernel's momentum step on the pseudo-gradient −Δ̄ with lr η, its buffer being −v
    (negation is exact in floating point, so the two forms agree bit for bit)."""
    params, delta = _prepare(params, delta)
    velocity = _state_array(state, "velocity", params.size, "fedavgm")
    new, buffer = sgd(params, -delta, -velocity, lr=hyper.server_lr, momentum=hyper.momentum)
    return new, {"velocity": delta if buffer is None else -buffer}  # β = 0: plain FedAvg, no buffer kept


def _adaptive_step(params: np.ndarray, delta: np.ndarray, state: Mapping[str, np.ndarray], hyper: ServerHyper,
                   optimizer: str, second_moment: Callable[[np.ndarray, np.ndarray], np.ndarray],
                   ) -> tuple[np.ndarray, ServerState]:
    """Reddi et al. 2021, Alg. 2: m ← β₁m + (1−β₁)Δ̄; v ← f(v, Δ̄²); w ← w + η·m / (√v + τ).

    No bias correction, as in the paper; v starts at τ² (the paper's v₋₁ ≥ τ²).
    """
    params, delta = _prepare(params, delta)
    beta1 = np.float32(hyper.beta1)
    momentum = beta1 * _state_array(state, "m", params.size, optimizer) + (np.float32(1) - beta1) * delta
    variance = second_moment(_state_array(state, "v", params.size, optimizer), delta * delta)
    new_params = params + np.float32(hyper.server_lr) * momentum / (np.sqrt(variance) + np.float32(hyper.tau))
    return new_params.astype(np.float32, copy=False), {"m": momentum, "v": variance}


def fedadagrad_step(params: np.ndarray, delta: np.ndarray, state: Mapping[str, np.ndarray],
                    hyper: ServerHyper) -> tuple[np.ndarray, ServerState]:
    """FedAdagrad (Reddi et al. 2021): v ← v + Δ̄²."""
    return _adaptive_step(params, delta, state, hyper, "fedadagrad", lambda v, d2: v + d2)


def fedadam_step(params: np.ndarray, delta: np.ndarray, state: Mapping[str, np.ndarray],
                 hyper: ServerHyper) -> tuple[np.ndarray, ServerState]:
    """FedAdam (Reddi et al. 2021): v ← β₂v + (1−β₂)Δ̄²."""
    beta2 = np.float32(hyper.beta2)
    return _adaptive_step(params, delta, state, hyper, "fedadam",
                          lambda v, d2: beta2 * v + (np.float32(1) - beta2) * d2)


def fedyogi_step(params: np.ndarray, delta: np.ndarray, state: Mapping[str, np.ndarray],
                 hyper: ServerHyper) -> tuple[np.ndarray, ServerState]:
    """FedYogi (Reddi et al. 2021): v ← v − (1−β₂)·Δ̄²·sign(v − Δ̄²)."""
    one_minus_beta2 = np.float32(1) - np.float32(hyper.beta2)
    return _adaptive_step(params, delta, state, hyper, "fedyogi",
                          lambda v, d2: v - one_minus_beta2 * d2 * np.sign(v - d2))


ServerStep = Callable[[np.ndarray, np.ndarray, Mapping[str, np.ndarray], ServerHyper],
                      tuple[np.ndarray, ServerState]]

SERVER_STEPS: Mapping[str, ServerStep] = {
    "fedavg": fedavg_step,
    "fedavgm": fedavgm_step,
    "fedadagrad": fedadagrad_step,
    "fedadam": fedadam_step,
    "fedyogi": fedyogi_step,
}


def init_server_state(optimizer: str, num_params: int, hyper: ServerHyper) -> ServerState:
    """Fresh optimiser state for a model of ``num_params`` entries (zeros; v = τ² for adaptive ones)."""
    if optimizer not in SERVER_STEPS:
        raise ConfigError(f"unknown server optimizer {optimizer!r}; known: {', '.join(sorted(SERVER_STEPS))}")
    if optimizer == "fedavg":
        return {}
    if optimizer == "fedavgm":
        return {"velocity": np.zeros(num_params, dtype=np.float32)}
    return {"m": np.zeros(num_params, dtype=np.float32),
            "v": np.full(num_params, hyper.tau ** 2, dtype=np.float32)}
