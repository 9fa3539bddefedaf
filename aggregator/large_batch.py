"""Large Batch Training as a strategy: one synchronous optimizer step per "round".

Each step the chosen devices compute the mean-loss gradient on their next local mini-batch of b
examples (never training ahead); the aggregator averages the gradients weighted by examples — the
gradient of the mean loss over the union of the batches, an effective batch of N·b — and takes one
server-optimizer step (``aggregator.server_optim``). With ``backup_devices`` = k, N + k devices are
asked and the step goes ahead with the first N gradients (Chen et al. 2016, "Revisiting Distributed
Synchronous SGD"); the rest arrive late and are dropped.
"""
from __future__ import annotations

import math
from dataclasses import asdict
from typing import Any, ClassVar, Mapping, Sequence

import numpy as np

from edgetrain.sdk.errors import ConfigError
from edgetrain.sdk.round_settings import RoundSettings

from .aggregation import BLOCK_UPDATES, WeightedMean
from .server_optim import LargeBatchHyper, OptimState, lars_step, learning_rate, sgd_step
from .strategy import AggregateInfo, RoundPlan, Strategy


class LargeBatch(Strategy):
    """Synchronous data-parallel SGD/LARS over the fleet; updates are gradients, not deltas."""

    name: ClassVar[str] = "large-batch"

    def __init__(self, shapes: Sequence[tuple[int, ...]], fraction: float = 1.0, min_devices: int = 2,
                 batch_size: int = 32, backup_devices: int = 0, hyper: LargeBatchHyper | None = None) -> None:
        if not 0.0 < fraction <= 1.0:
            raise ConfigError(f"fraction must be in (0, 1], got {fraction}")
        if min_devices < 1 or backup_devices < 0:
            raise ConfigError("need min_devices >= 1 and backup_devices >= 0")
        RoundSettings(batch_size=batch_size)  # the devices' check of the batch size, before any round
        self.shapes = [tuple(int(d) for d in s) for s in shapes]
        self.fraction, self.min_devices = fraction, min_devices
        self.batch_size, self.backup_devices = batch_size, backup_devices
        self.hyper = hyper or LargeBatchHyper()
        self.steps_taken = 0
        self._state: OptimState = {}
        self._mean: WeightedMean | None = None
        self._examples = 0
        self._wanted = 0

    # -- selection ---------------------------------------------------------------------------
    def ready(self, num_live: int) -> bool:
        return num_live >= self.min_devices

    def configure_round(self, round_id: int, live_devices: Sequence[str], rng: np.random.Generator) -> RoundPlan:
        live = sorted(set(live_devices))
        if not self.ready(len(live)):
            raise ConfigError(f"step {round_id}: {len(live)} live device(s), {self.min_devices} needed")
        workers = min(len(live), max(math.ceil(round(self.fraction * len(live), 9)), self.min_devices))
        asked = min(len(live), workers + self.backup_devices)
        self._wanted = workers
        picked = rng.choice(len(live), size=asked, replace=False)
        selected = tuple(sorted(live[int(i)] for i in picked))
        return RoundPlan(round_id=round_id, selected=selected, task="gradient",
                         settings=RoundSettings(batch_size=self.batch_size))

    def enough(self, reported: int) -> bool:
        """The step may close once this many gradients arrived (backup workers are not waited for)."""
        return reported >= self._wanted > 0

    # -- accumulation ------------------------------------------------------------------------
    def begin_round(self, params: np.ndarray) -> None:
        if sum(math.prod(s) for s in self.shapes) != params.size:
            raise ConfigError(f"layer shapes cover {sum(math.prod(s) for s in self.shapes)} entries, "
                              f"the parameters have {params.size}")
        self._mean = WeightedMean(params.size, block_updates=BLOCK_UPDATES)  # the hot path: float32 blocks
        self._examples = 0

    def accumulate(self, update_vector: np.ndarray, num_examples: int, device_id: str) -> None:
        if self._mean is None:
            raise ConfigError("large-batch: no step is open; call begin_round(params) first")
        if self.enough(self._mean.count):
            raise ConfigError(f"large-batch: step already has its {self._wanted} gradients; {device_id!r} is late")
        self._mean.add(update_vector, float(num_examples))
        self._examples += int(num_examples)

    def accepts_more(self) -> bool:
        return self._mean is not None and not self.enough(self._mean.count)

    def aggregate(self, params: np.ndarray) -> tuple[np.ndarray, AggregateInfo]:
        if self._mean is None or self._mean.count == 0:
            raise ConfigError("large-batch: no gradients to aggregate")
        grad = self._mean.result()
        lr = learning_rate(self.hyper, self.steps_taken, self._examples)
        if self.hyper.optimizer == "lars":
            new, self._state = lars_step(params, grad, self._state, self.hyper, lr, self.shapes)
        else:
            new, self._state = sgd_step(params, grad, self._state, self.hyper, lr)
        self.steps_taken += 1
        info = AggregateInfo(num_updates=self._mean.count, total_examples=self._examples,
                             mean_delta_norm=float(np.linalg.norm(grad.astype(np.float64))),
                             step_norm=float(np.linalg.norm(new.astype(np.float64) - params)),
                             server_optimizer=self.hyper.optimizer, rounds_aggregated=self.steps_taken)
        self._mean = None
        return new, info

    # -- checkpointing -----------------------------------------------------------------------
    def config(self) -> dict[str, Any]:

        return {"hyper": asdict(self.hyper), "fraction": self.fraction, "min_devices": self.min_devices,
                "batch_size": self.batch_size, "backup_devices": self.backup_devices}

    def state_dict(self) -> dict[str, np.ndarray]:
        return {k: v.copy() for k, v in self._state.items()}

    def state_meta(self) -> dict[str, Any]:
        return {"strategy": self.name, "config": self.config(), "steps_taken": self.steps_taken}

    def load_state_dict(self, arrays: Mapping[str, np.ndarray], meta: Mapping[str, Any]) -> None:
        if meta.get("strategy") != self.name or meta.get("config") != self.config():
            raise ConfigError(f"checkpoint was written by {meta.get('strategy')!r} with settings {meta.get('config')}; "
                              f"this run is {self.name!r} with {self.config()}: resume with the same settings")
        self._state = {k: np.asarray(v, dtype=np.float32).copy() for k, v in arrays.items()}
        self.steps_taken = int(meta["steps_taken"])
        self._mean = None
