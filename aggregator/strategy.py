"""Federated strategies: who trains each round, with what settings, and how updates combine.

Shaped after Flower's ``flwr.server.strategy``: one abstract ``Strategy`` with lifecycle verbs
(``configure_round`` → ``begin_round`` → ``accumulate``… → ``aggregate``), the arithmetic in
``aggregator.aggregation``. Updates reaching a strategy are already validated deltas
``w_local − w_round_start`` (see ``aggregator.validation``); weights are example counts, as in
FedAvg's n_k / n.
"""
from __future__ import annotations

import math
from abc import ABC, abstractmethod
from dataclasses import asdict, dataclass, field, fields
from typing import Any, ClassVar, Mapping, Sequence

import numpy as np

from edgetrain.sdk.errors import ConfigError
from edgetrain.sdk.round_settings import RoundSettings

from .aggregation import BLOCK_UPDATES, SERVER_STEPS, ServerHyper, ServerState, WeightedMean, init_server_state


@dataclass(frozen=True)
class RoundPlan:
    """Which devices work in a round, on what (``task``: "train" or "gradient"), with which settings."""

    round_id: int
    selected: tuple[str, ...]
    task: str
    settings: RoundSettings


@dataclass(frozen=True)
class PrivacySpent:
    """What a differentially private round released and the privacy spent so far (``aggregator.dp``)."""

    epsilon: float  # ε of the whole run so far at ``delta``
    delta: float
    noise_multiplier: float  # z charged by the accountant
    clip_norm: float  # S this round
    noise_stddev: float  # σ of the noise added to the sum of clipped updates
    sampling_rate: float  # q: devices asked / live devices
    updates_clipped: int  # updates whose norm exceeded S


@dataclass(frozen=True)
class AggregateInfo:
    """What one ``aggregate`` call combined (norms are L2, in parameter units)."""

    num_updates: int
    total_examples: int
    mean_delta_norm: float  # ‖Δ̄‖ of the example-weighted mean update
    step_norm: float  # ‖w_new − w‖ actually applied by the server optimiser
    server_optimizer: str
    rounds_aggregated: int  # including this one
    rule_metrics: Mapping[str, Any] = field(default_factory=dict)  # a robust rule's figures, for the round's metrics
    privacy: PrivacySpent | None = None  # set by a differentially private strategy


class Strategy(ABC):
    """The lifecycle every aggregation strategy follows (FedAvg family here; large batch later)."""

    name: ClassVar[str] = "abstract"
    min_devices: int = 1  # fewer updates than this by the deadline: the round is retried

    def enough(self, reported: int) -> bool:
        """Whether a round may close before every chosen device reported (backup workers)."""
        return False

    def accepts_more(self) -> bool:
        """Whether the open round still takes updates (False once a large-batch step is full)."""
        return True

    @abstractmethod
    def ready(self, num_live: int) -> bool:
        """Whether ``num_live`` connected devices are enough to configure a round."""

    @abstractmethod
    def configure_round(self, round_id: int, live_devices: Sequence[str], rng: np.random.Generator) -> RoundPlan:
        """Pick this round's devices (deterministic given ``rng``) and their training settings."""

    @abstractmethod
    def begin_round(self, params: np.ndarray) -> None:
        """Start accumulating for a round whose global parameters are ``params`` (a retry restarts)."""

    @abstractmethod
    def accumulate(self, update_vector: np.ndarray, num_examples: int, device_id: str) -> None:
        """Fold one validated delta in as it arrives (streaming, O(model) memory)."""

    def accumulate_stale(self, update_vector: np.ndarray, num_examples: int, device_id: str,
                         staleness: int) -> None:
        """``accumulate`` for an update trained from a model ``staleness`` versions old; only an
        asynchronous strategy (``aggregator.fedbuff``) takes stale ones (validation sees to that)."""
        if staleness != 0:
            raise ConfigError(f"{self.name} aggregates synchronous rounds only; got an update {staleness} "
                              "version(s) old")
        self.accumulate(update_vector, num_examples, device_id)

    @abstractmethod
    def aggregate(self, params: np.ndarray) -> tuple[np.ndarray, AggregateInfo]:
        """Close the round: the new global parameters and what went into them."""

    @abstractmethod
    def state_dict(self) -> dict[str, np.ndarray]:
        """Arrays a resumed run needs (server optimiser moments…), for a checkpoint."""

    @abstractmethod
    def state_meta(self) -> dict[str, Any]:
        """JSON-able companion of ``state_dict`` (name, configuration, counters)."""

    @abstractmethod
    def load_state_dict(self, arrays: Mapping[str, np.ndarray], meta: Mapping[str, Any]) -> None:
        """Restore what ``state_dict`` / ``state_meta`` saved, so the run continues exactly."""


@dataclass(frozen=True)
class ClientConfig:
    """Device selection and local training settings (McMahan et al. 2017: C, E, B, plus lr/momentum)."""

    fraction: float = 0.1  # C: share of live devices picked per round
    min_devices: int = 2  # never fewer than this many per round
    local_epochs: int = 1  # E
    batch_size: int = 32  # B
    lr: float = 0.05
    momentum: float = 0.0
    # Exactly this many local steps per round instead of E epochs (None: E epochs). Fewer steps
    # and more rounds is how FL trades uplink bytes for staleness (McMahan et al.'s u = E·n/B).
    local_steps: int | None = None

    def __post_init__(self) -> None:
        if not 0.0 < self.fraction <= 1.0:
            raise ConfigError(f"fraction must be in (0, 1], got {self.fraction}")
        if isinstance(self.min_devices, bool) or not isinstance(self.min_devices, int) or self.min_devices < 1:
            raise ConfigError(f"min_devices must be an integer >= 1, got {self.min_devices!r}")
        self.settings()  # the device-side settings are checked where the device checks them

    def settings(self, prox_mu: float = 0.0) -> RoundSettings:
        """What the devices are told (``sdk.round_settings``: the defaults and checks both ends share)."""
        return RoundSettings(lr=self.lr, momentum=self.momentum, batch_size=self.batch_size,
                             local_epochs=self.local_epochs, local_steps=self.local_steps, prox_mu=prox_mu)


def _flat_float32(params: np.ndarray, what: str) -> np.ndarray:
    array = np.asarray(params)
    if array.ndim != 1 or array.dtype != np.float32:
        raise ConfigError(f"{what} must be a flat float32 vector, got {array.dtype} with shape {array.shape}")
    return array


class FedAvg(Strategy):
    """Federated Averaging (McMahan et al., AISTATS 2017): example-weighted mean of the deltas.

    Subclasses change only the server optimiser applied to the mean delta (``server_optimizer``)
    or what the devices are told (``_device_settings``).
    """

    name: ClassVar[str] = "fedavg"
    server_optimizer: ClassVar[str] = "fedavg"

    def __init__(self, fraction: float = 0.1, min_devices: int = 2, local_epochs: int = 1,
                 batch_size: int = 32, lr: float = 0.05, momentum: float = 0.0, local_steps: int | None = None,
                 *, server_hyper: ServerHyper | None = None) -> None:
        self.client = ClientConfig(fraction, min_devices, local_epochs, batch_size, lr, momentum, local_steps)
        self.min_devices = self.client.min_devices
        self.server_hyper = server_hyper if server_hyper is not None else ServerHyper()
        self._server_state: ServerState | None = None  # built on the first begin_round (size known then)
        self._num_params: int | None = None
        self._mean: WeightedMean | None = None  # not None while a round is open
        self._reported: set[str] = set()
        self._total_examples = 0
        self._rounds_aggregated = 0

    # -- selection ---------------------------------------------------------------------------
    def num_to_select(self, num_live: int) -> int:
        """max(⌈C·K⌉, M), capped at K (McMahan et al. use max(C·K, 1))."""
        # round() first so that e.g. 0.1 * 30 = 3.0000000000000004 does not become 4.
        wanted = math.ceil(round(self.client.fraction * num_live, 9))
        return min(num_live, max(wanted, self.client.min_devices))

    def ready(self, num_live: int) -> bool:
        """Whether enough devices are live to start a round."""
        return num_live >= self.client.min_devices

    def configure_round(self, round_id: int, live_devices: Sequence[str], rng: np.random.Generator) -> RoundPlan:
        if not isinstance(rng, np.random.Generator):
            raise ConfigError(f"configure_round needs a numpy Generator, got {type(rng).__name__}")
        # Sort first: the selection must depend on the rng and the set of devices, not on the
        # order in which they happened to announce themselves.
        live = sorted(set(live_devices))
        if not self.ready(len(live)):
            raise ConfigError(f"round {round_id}: {len(live)} live device(s), {self.name} needs at least "
                              f"{self.client.min_devices}; wait for more devices before configuring the round")
        picked = rng.choice(len(live), size=self.num_to_select(len(live)), replace=False)
        selected = tuple(sorted(live[int(i)] for i in picked))
        return RoundPlan(round_id=round_id, selected=selected, task="train", settings=self._device_settings())

    def _device_settings(self) -> RoundSettings:
        return self.client.settings()

    # -- accumulation ------------------------------------------------------------------------
    def begin_round(self, params: np.ndarray) -> None:
        params = _flat_float32(params, "round parameters")
        if self._num_params is None:
            self._num_params = params.size
        elif params.size != self._num_params:
            raise ConfigError(f"round parameters have {params.size} entries, this run has {self._num_params}")
        if self._server_state is None:
            self._server_state = init_server_state(self.server_optimizer, params.size, self.server_hyper)
        self._mean = WeightedMean(params.size, block_updates=BLOCK_UPDATES)  # the hot path: float32 blocks
        self._reported = set()
        self._total_examples = 0

    def _open_round(self) -> WeightedMean:
        if self._mean is None:
            raise ConfigError(f"{self.name}: no round is open; call begin_round(params) first")
        return self._mean

    def accumulate(self, update_vector: np.ndarray, num_examples: int, device_id: str) -> None:
        mean = self._open_round()
        if device_id in self._reported:
            # Validation rejects duplicates before this point; reaching here is a caller bug.
            raise ConfigError(f"{self.name}: device {device_id!r} already reported this round")
        if isinstance(num_examples, bool) or not isinstance(num_examples, (int, np.integer)) or num_examples < 1:
            raise ConfigError(f"{self.name}: num_examples must be an integer >= 1, got {num_examples!r}")
        mean.add(update_vector, float(num_examples))
        self._reported.add(device_id)
        self._total_examples += int(num_examples)

    def merge_partial(self, partial: WeightedMean, total_examples: int) -> None:
        """Fold in partial sums built by another aggregator worker over its own devices."""
        self._open_round().merge(partial)
        self._total_examples += int(total_examples)

    def aggregate(self, params: np.ndarray) -> tuple[np.ndarray, AggregateInfo]:
        mean = self._open_round()
        params = _flat_float32(params, "round parameters")
        if params.size != mean.size:
            raise ConfigError(f"aggregate got {params.size} parameters, the round began with {mean.size}")
        assert self._server_state is not None  # set by begin_round
        mean_delta = mean.result()
        step = SERVER_STEPS[self.server_optimizer]
        new_params, self._server_state = step(params, mean_delta, self._server_state, self.server_hyper)
        self._rounds_aggregated += 1
        self._mean = None
        info = AggregateInfo(
            num_updates=mean.count,
            total_examples=self._total_examples,
            mean_delta_norm=float(np.linalg.norm(mean_delta.astype(np.float64))),
            step_norm=float(np.linalg.norm(new_params.astype(np.float64) - params)),
            server_optimizer=self.server_optimizer,
            rounds_aggregated=self._rounds_aggregated,
        )
        return new_params, info

    # -- checkpointing -----------------------------------------------------------------------
    def config(self) -> dict[str, Any]:
        """Every setting that changes the run's trajectory (compared on resume)."""
        return {"client": asdict(self.client), "server": asdict(self.server_hyper)}

    def state_dict(self) -> dict[str, np.ndarray]:
        return {key: value.copy() for key, value in (self._server_state or {}).items()}

    def state_meta(self) -> dict[str, Any]:
        return {"strategy": self.name, "config": self.config(), "num_params": self._num_params,
                "rounds_aggregated": self._rounds_aggregated}

    def load_state_dict(self, arrays: Mapping[str, np.ndarray], meta: Mapping[str, Any]) -> None:
        if meta.get("strategy") != self.name:
            raise ConfigError(f"checkpoint was written by strategy {meta.get('strategy')!r}, this run uses "
                              f"{self.name!r}; resume with the same strategy")
        if meta.get("config") != self.config():
            raise ConfigError(f"{self.name}: checkpoint settings {meta.get('config')} differ from this run's "
                              f"{self.config()}; a resumed run must use the same settings to continue exactly")
        num_params = meta.get("num_params")
        rounds = meta.get("rounds_aggregated")
        if not isinstance(rounds, int) or rounds < 0:
            raise ConfigError(f"{self.name}: checkpoint meta has a bad rounds_aggregated {rounds!r}")
        if num_params is None:
            if arrays:
                raise ConfigError(f"{self.name}: checkpoint has state arrays but no num_params")
            state = None
        else:
            expected = init_server_state(self.server_optimizer, int(num_params), self.server_hyper)
            if set(arrays) != set(expected):
                raise ConfigError(f"{self.name}: checkpoint state holds {sorted(arrays)}, "
                                  f"expected {sorted(expected)}")
            state = {}
            for key in expected:
                array = np.asarray(arrays[key], dtype=np.float32)
                if array.shape != (int(num_params),):
                    raise ConfigError(f"{self.name}: state {key!r} has shape {array.shape}, "
                                      f"expected ({num_params},)")
                state[key] = array.copy()
        self._server_state = state
        self._num_params = None if num_params is None else int(num_params)
        self._rounds_aggregated = rounds
        self._mean = None


class FedProx(FedAvg):
    """FedProx (Li et al., MLSys 2020): FedAvg whose devices add mu/2·‖w − w_round_start‖².

    The proximal term runs on the device (``sdk.runtime.base.TrainConfig.prox_mu``); the server
    side is plain FedAvg, so this only carries ``prox_mu`` in the round's settings.
    """

    name: ClassVar[str] = "fedprox"

    def __init__(self, mu: float = 0.01, **client: Any) -> None:
        super().__init__(**client)
        self.mu = self.client.settings(prox_mu=mu).prox_mu  # checked as the devices check it

    def _device_settings(self) -> RoundSettings:
        return self.client.settings(prox_mu=self.mu)

    def config(self) -> dict[str, Any]:
        return {**super().config(), "mu": self.mu}


class FedAvgM(FedAvg):
    """FedAvg with server momentum (Hsu et al. 2019): v ← β·v + Δ̄; w ← w + η·v."""

    name: ClassVar[str] = "fedavgm"
    server_optimizer: ClassVar[str] = "fedavgm"

    def __init__(self, server_lr: float = 1.0, server_momentum: float = 0.9, **client: Any) -> None:
        super().__init__(**client, server_hyper=ServerHyper(server_lr=server_lr, momentum=server_momentum))


class FedAdam(FedAvg):
    """FedAdam (Reddi et al., ICLR 2021, "Adaptive Federated Optimization")."""

    name: ClassVar[str] = "fedadam"
    server_optimizer: ClassVar[str] = "fedadam"

    def __init__(self, server_lr: float = 1e-2, beta1: float = 0.9, beta2: float = 0.99, tau: float = 1e-3,
                 **client: Any) -> None:
        super().__init__(**client, server_hyper=ServerHyper(server_lr=server_lr, beta1=beta1, beta2=beta2, tau=tau))


class FedYogi(FedAdam):
    """FedYogi (Reddi et al. 2021): Adam's second moment with Yogi's additive, sign-controlled update."""

    name: ClassVar[str] = "fedyogi"
    server_optimizer: ClassVar[str] = "fedyogi"


class FedAdagrad(FedAdam):
    """FedAdagrad (Reddi et al. 2021): second moment is the running sum of Δ̄² (beta2 unused)."""

    name: ClassVar[str] = "fedadagrad"
    server_optimizer: ClassVar[str] = "fedadagrad"


STRATEGIES: Mapping[str, type[FedAvg]] = {
    cls.name: cls for cls in (FedAvg, FedProx, FedAvgM, FedAdam, FedYogi, FedAdagrad)
}


def strategy_names() -> tuple[str, ...]:
    return tuple(sorted(STRATEGIES))


def make_strategy(name: str, **kwargs: Any) -> Strategy:
    """Build a strategy by name, e.g. ``make_strategy("fedadam", fraction=0.5, server_lr=0.01)``."""
    cls = STRATEGIES.get(name.lower())
    if cls is None:
        raise ConfigError(f"unknown strategy {name!r}; known strategies: {', '.join(strategy_names())}")
    try:
        return cls(**kwargs)
    except TypeError as exc:  # an unknown or misspelt keyword
        client_fields = ", ".join(f.name for f in fields(ClientConfig))
        raise ConfigError(f"strategy {name!r}: {exc} (client settings: {client_fields})") from exc
