"""``DPFedAvg``: a wrapper that makes a FedAvg-family strategy differentially private (DP-FedAvg).

McMahan et al., ICLR 2018 (see ``aggregator.dp`` for the estimator and its reasons): the wrapper
clips each validated update to S as it arrives (streaming, O(model) memory), and at the close of
the round hands the wrapped strategy one update, the noised fixed-denominator mean, which its server
optimiser applies (FedAvg, FedAvgM, FedAdam…: post-processing, so no privacy cost). Selection and
the devices' settings are the wrapped strategy's.

Clipping happens here, on the decoded update the sum really takes in, so any uplink codec keeps
the sensitivity argument (a codec's sparsification or error feedback only changes what the device
sends; what enters the sum is clipped after decoding). It wraps mean-type strategies only: a robust
rule (median, Krum…) has a different sensitivity, and large batch steps on gradients, not deltas.
"""
from __future__ import annotations

import math
from dataclasses import asdict, replace
from typing import Any, Mapping, Sequence

import numpy as np

from edgetrain.sdk.errors import ConfigError

from .dp import DPConfig, PrivacyAccountant, adapted_clip, clip_to_norm, noised_mean, update_noise_multiplier
from .strategy import AggregateInfo, PrivacySpent, RoundPlan, Strategy

NOISED_MEAN_ID = "dp-noised-mean"  # the one "device" the wrapped strategy hears from


class DPFedAvg(Strategy):
    """DP-FedAvg around ``inner``: per-update clipping, Gaussian noise on the sum, ε from dp-accounting."""

    def __init__(self, inner: Strategy, config: DPConfig, rng: np.random.Generator | None = None) -> None:
        if not isinstance(config, DPConfig):
            raise ConfigError(f"DPFedAvg needs a DPConfig, got {type(config).__name__}")
        self.inner = inner
        self.config = config
        self.name = f"dp-{inner.name}"
        self.min_devices = inner.min_devices
        # Fresh OS entropy by default: noise that a seed could reproduce protects nothing.
        self._rng = rng if rng is not None else np.random.default_rng()
        self.accountant = PrivacyAccountant(config.noise_multiplier, config.delta)
        self.clip_norm = float(config.clip_norm)  # S; moves each round with adaptive clipping
        self._expected = 0  # m: devices the round planned to hear from (the fixed denominator)
        self._live = 0
        self._sum: np.ndarray | None = None  # Σ clipped updates (float64) while a round is open
        self._accepted = 0
        self._clipped = 0
        self._examples = 0

    def ready(self, num_live: int) -> bool:
        return self.inner.ready(num_live)

    def enough(self, reported: int) -> bool:
        return self.inner.enough(reported)

    def accepts_more(self) -> bool:
        return self.inner.accepts_more()

    def configure_round(self, round_id: int, live_devices: Sequence[str], rng: np.random.Generator) -> RoundPlan:
        plan = self.inner.configure_round(round_id, live_devices, rng)
        if plan.task != "train":
            raise ConfigError(f"DP-FedAvg wraps strategies whose devices train and send deltas; {self.inner.name} "
                              f"asks for {plan.task!r}")
        self._expected = len(plan.selected)
        self._live = len(set(live_devices))
        if self.config.adaptive:  # fail before the devices train, not at the close of the round
            update_noise_multiplier(self.config.noise_multiplier, self.config.count_stddev(self._expected))
        return plan

    def begin_round(self, params: np.ndarray) -> None:
        self.inner.begin_round(params)
        self._sum = np.zeros(np.asarray(params).size, dtype=np.float64)
        self._accepted = self._clipped = self._examples = 0

    def accumulate(self, update_vector: np.ndarray, num_examples: int, device_id: str) -> None:
        if self._sum is None:
            raise ConfigError(f"{self.name}: no round is open; call begin_round(params) first")
        clipped, norm = clip_to_norm(update_vector, self.clip_norm)
        if clipped.shape != self._sum.shape:
            raise ConfigError(f"{self.name}: update has {clipped.size} entries, the round has {self._sum.size}")
        self._sum += clipped
        self._accepted += 1
        self._clipped += int(norm > self.clip_norm)
        self._examples += int(num_examples)  # reported, not weighed: DP-FedAvg weighs devices uniformly

    def _count_stddev(self) -> float | None:
        return self.config.count_stddev(self._expected) if self.config.adaptive else None

    def aggregate(self, params: np.ndarray) -> tuple[np.ndarray, AggregateInfo]:
        if self._sum is None or self._expected < 1:
            raise ConfigError(f"{self.name}: no round is open; call configure_round and begin_round first")
        noise_multiplier = update_noise_multiplier(self.config.noise_multiplier, self._count_stddev())
        noise_stddev = noise_multiplier * self.clip_norm
        mean = noised_mean(self._sum, noise_stddev, self._expected, self._rng)
        self.inner.accumulate(mean, 1, NOISED_MEAN_ID)
        new_params, info = self.inner.aggregate(params)
        # A retried round may have asked more devices than planned: charge the larger rate.
        sampling_rate = min(1.0, max(self._expected, self._accepted) / max(1, self._live))
        self.accountant.spend(sampling_rate)
        clip_used = self.clip_norm
        if self.config.adaptive:
            count_stddev = self._count_stddev()
            assert count_stddev is not None  # adaptive
            self.clip_norm = adapted_clip(self.clip_norm, self._accepted - self._clipped, count_stddev,
                                          self._expected, self.config.target_quantile or 0.0, self.config.clip_lr,
                                          self._rng)
        privacy = PrivacySpent(epsilon=self.accountant.epsilon(), delta=self.config.delta,
                               noise_multiplier=self.config.noise_multiplier, clip_norm=clip_used,
                               noise_stddev=noise_stddev, sampling_rate=sampling_rate, updates_clipped=self._clipped)
        self._sum = None
        return new_params, replace(info, num_updates=self._accepted, total_examples=self._examples, privacy=privacy)

    # -- checkpointing -----------------------------------------------------------------------
    def state_dict(self) -> dict[str, np.ndarray]:
        return self.inner.state_dict()

    def state_meta(self) -> dict[str, Any]:
        return {"strategy": self.name, "dp": asdict(self.config), "inner": self.inner.state_meta(),
                "clip_norm": self.clip_norm, "accountant": self.accountant.history()}

    def load_state_dict(self, arrays: Mapping[str, np.ndarray], meta: Mapping[str, Any]) -> None:
        if meta.get("strategy") != self.name:
            raise ConfigError(f"checkpoint was written by strategy {meta.get('strategy')!r}, this run uses "
                              f"{self.name!r}; resume with the same strategy and DP flags")
        if meta.get("dp") != asdict(self.config):
            raise ConfigError(f"{self.name}: checkpoint DP settings {meta.get('dp')} differ from this run's "
                              f"{asdict(self.config)}; a resumed run must keep them (ε composes over the whole run)")
        clip_norm = meta.get("clip_norm")
        if isinstance(clip_norm, bool) or not isinstance(clip_norm, (int, float)) or not (
                math.isfinite(clip_norm) and clip_norm > 0):
            raise ConfigError(f"{self.name}: checkpoint has a bad clip_norm {clip_norm!r}")
        inner_meta = meta.get("inner")
        if not isinstance(inner_meta, Mapping):
            raise ConfigError(f"{self.name}: checkpoint lacks the wrapped strategy's state")
        self.inner.load_state_dict(arrays, inner_meta)
        self.accountant.load_history(meta.get("accountant"))
        self.clip_norm = float(clip_norm)
        self._sum = None
