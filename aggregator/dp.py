"""Differential privacy for federated rounds: the arithmetic and the accounting, no I/O.

DP-FedAvg (McMahan, Ramage, Talwar, Zhang, "Learning Differentially Private Recurrent Language
Models", ICLR 2018): every device's update is clipped to L2 norm ``S``, the clipped updates are
summed with uniform weights, Gaussian noise N(0, (z·S)²) per coordinate is added to the *sum*, and
the sum is divided by a fixed denominator, the number of devices the round planned to hear from.

Why the fixed-denominator estimator (the paper's f_f) with uniform weights: its sensitivity to one
device is exactly S / m whatever the other devices send, so noise of scale z·S on the sum gives
a Gaussian mechanism of multiplier z. The clipped-count estimator (f_c, dividing by the number of
updates that arrived) has a data-dependent denominator and needs a looser bound; example-count
weights (FedAvg's n_k) would let one device weigh more than another, and counts arrive off the
wire, so a device could buy influence by lying. Uniform weights make the guarantee user-level.

Adaptive clipping (Andrew, Thakkar, McMahan, Ramaswamy, "Differentially Private Learning with
Adaptive Clipping", NeurIPS 2021): the bound follows a target quantile γ of the update norms,
S ← S·exp(−η·(b̃ − γ)), where b̃ is the noised fraction of updates whose norm was ≤ S. The count
gets noise N(0, σ_b²) and the update noise multiplier becomes z_Δ = (z⁻² − (2σ_b)⁻²)^(-1/2), so the
two releases together are a Gaussian mechanism of multiplier z (their Theorem 1): the configured
z is what the accountant charges.

The accountant is Google's ``dp-accounting`` (RDP accountant, Mironov 2017; sampled Gaussian
mechanism, Mironov, Talwar, Zhang 2019) with Poisson sampling at rate q = devices asked / live
devices per round. Our selection draws a fixed-size sample without replacement; Poisson sampling
at the same rate is the standard model for it (as in McMahan et al. 2018 and TF Privacy).

Limits: noise comes from numpy's PCG64 (seeded from OS entropy), not a cryptographic generator,
and float64 Gaussian samples are subject to Mironov's 2012 floating-point attack; this protects
against what the released model reveals, not against an adversary with that level of access.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import dp_accounting
import numpy as np

from edgetrain.sdk.errors import ConfigError

# Andrew et al. 2021 recommend a clip learning rate of 0.2 and σ_b = (expected devices)/20.
DEFAULT_CLIP_LR = 0.2
CLIP_COUNT_STDDEV_PER_DEVICE = 1 / 20
# Integer Rényi orders: dp-accounting's default list adds fractional orders in (1, 11), whose series do
# not converge at the high sampling rates of a small fleet (q = 0.5: it warns and drops them); at such
# rates the minimising order is an integer one anyway, and any set of orders gives a valid bound.
RDP_ORDERS = tuple(range(2, 65)) + (128, 256, 512, 1024)


@dataclass(frozen=True)
class DPConfig:
    """What ``--dp-clip`` / ``--dp-noise-multiplier`` / ``--dp-delta`` / ``--dp-adaptive-clip`` ask for.

    ``clip_norm`` is S (the initial bound when adaptive); ``noise_multiplier`` is z; ``delta`` is the
    δ at which ε is reported; ``target_quantile`` (γ) turns adaptive clipping on;
    ``clip_count_stddev`` is σ_b (None: expected devices / 20, per round).
    """

    clip_norm: float
    noise_multiplier: float
    delta: float = 1e-5
    target_quantile: float | None = None
    clip_lr: float = DEFAULT_CLIP_LR
    clip_count_stddev: float | None = None

    def __post_init__(self) -> None:
        if not (isinstance(self.clip_norm, (int, float)) and math.isfinite(self.clip_norm) and self.clip_norm > 0):
            raise ConfigError(f"DP needs a clipping bound: --dp-clip must be a finite number > 0, got "
                              f"{self.clip_norm!r} (Gaussian noise without clipping bounds nothing)")
        if not (math.isfinite(self.noise_multiplier) and self.noise_multiplier > 0):
            raise ConfigError(f"--dp-noise-multiplier must be a finite number > 0, got {self.noise_multiplier!r}; "
                              "for clipping without privacy use --max-norm")
        if not 0.0 < self.delta < 1.0:
            raise ConfigError(f"--dp-delta must be in (0, 1), got {self.delta!r} (δ >= 1 guarantees nothing)")
        if self.target_quantile is not None and not 0.0 < self.target_quantile < 1.0:
            raise ConfigError(f"--dp-adaptive-clip target quantile must be in (0, 1), got {self.target_quantile!r}")
        if not (math.isfinite(self.clip_lr) and self.clip_lr > 0):
            raise ConfigError(f"--dp-clip-lr must be a finite number > 0, got {self.clip_lr!r}")
        if self.clip_count_stddev is not None:
            if self.target_quantile is None:
                raise ConfigError("--dp-clip-count-stddev is for adaptive clipping; add --dp-adaptive-clip QUANTILE")
            update_noise_multiplier(self.noise_multiplier, self.clip_count_stddev)  # fails when too small

    @property
    def adaptive(self) -> bool:
        return self.target_quantile is not None

    def count_stddev(self, expected_devices: int) -> float:
        """σ_b for a round expecting ``expected_devices`` updates."""
        if self.clip_count_stddev is not None:
            return self.clip_count_stddev
        return CLIP_COUNT_STDDEV_PER_DEVICE * expected_devices


def update_noise_multiplier(noise_multiplier: float, count_stddev: float | None) -> float:
    """z_Δ = (z⁻² − (2σ_b)⁻²)^(-1/2) (Andrew et al. 2021, Thm. 1); z itself without adaptive clipping."""
    if count_stddev is None:
        return noise_multiplier
    if not (math.isfinite(count_stddev) and 2 * count_stddev > noise_multiplier):
        raise ConfigError(f"adaptive clipping: the clipped-count noise σ_b = {count_stddev:g} must exceed z/2 = "
                          f"{noise_multiplier / 2:g}, else it alone spends the whole privacy budget; raise "
                          "--dp-clip-count-stddev (or the number of devices per round: the default is devices/20)")
    return (noise_multiplier ** -2 - (2 * count_stddev) ** -2) ** -0.5


def clip_to_norm(update: np.ndarray, clip_norm: float) -> tuple[np.ndarray, float]:
    """``update · min(1, S/‖update‖)`` in float64, and the norm before clipping."""
    vector = np.asarray(update, dtype=np.float64)
    norm = float(np.linalg.norm(vector))
    if not math.isfinite(norm):
        raise ConfigError("cannot clip an update with non-finite entries (validation should have rejected it)")
    return (vector * (clip_norm / norm) if norm > clip_norm else vector), norm


def noised_mean(clipped_sum: np.ndarray, noise_stddev: float, denominator: int,
                rng: np.random.Generator) -> np.ndarray:
    """(Σ clipped + N(0, σ²·I)) / m: the fixed-denominator estimator, as float32."""
    if denominator < 1:
        raise ConfigError(f"the DP denominator must be >= 1 device, got {denominator}")
    noise = rng.normal(0.0, noise_stddev, size=clipped_sum.shape)
    return ((clipped_sum + noise) / denominator).astype(np.float32)


def adapted_clip(clip_norm: float, unclipped_count: int, count_stddev: float, expected_devices: int,
                 target_quantile: float, clip_lr: float, rng: np.random.Generator) -> float:
    """Andrew et al. 2021, geometric update: S ← S·exp(−η·(b̃ − γ)), b̃ = (Σ 1[‖Δ‖ ≤ S] + N(0, σ_b²)) / m."""
    noisy_fraction = (unclipped_count + rng.normal(0.0, count_stddev)) / expected_devices
    return float(clip_norm * math.exp(-clip_lr * (noisy_fraction - target_quantile)))


class PrivacyAccountant:
    """ε at δ after the rounds so far: the sampled Gaussian mechanism composed by ``dp-accounting``'s
    RDP accountant, one Poisson-sampled event per round with that round's sampling rate q."""

    def __init__(self, noise_multiplier: float, delta: float) -> None:
        self.noise_multiplier = float(noise_multiplier)
        self.delta = float(delta)
        self._rates: list[list[float]] = []  # [q, rounds at q], run-length: a fleet's q rarely changes

    @property
    def rounds(self) -> int:
        return int(sum(count for _, count in self._rates))

    def spend(self, sampling_rate: float) -> None:
        """Charge one round that asked a fraction ``sampling_rate`` of the live devices."""
        if not 0.0 < sampling_rate <= 1.0:
            raise ConfigError(f"a round's sampling rate must be in (0, 1], got {sampling_rate!r}")
        if self._rates and self._rates[-1][0] == sampling_rate:
            self._rates[-1][1] += 1
        else:
            self._rates.append([float(sampling_rate), 1])

    def epsilon(self) -> float:
        """ε such that the rounds so far are (ε, δ)-DP (0 before any round)."""
        accountant = dp_accounting.rdp.RdpAccountant(list(RDP_ORDERS))
        for rate, count in self._rates:
            event = dp_accounting.PoissonSampledDpEvent(rate, dp_accounting.GaussianDpEvent(self.noise_multiplier))
            accountant.compose(event, int(count))
        return float(accountant.get_epsilon(self.delta))

    def history(self) -> list[list[float]]:
        """The per-round sampling rates, run-length encoded, for a checkpoint."""
        return [list(pair) for pair in self._rates]

    def load_history(self, history: object) -> None:
        """Restore what ``history`` returned (checked: it comes from a file)."""
        if not isinstance(history, list):
            raise ConfigError(f"DP accountant history must be a list, got {type(history).__name__}")
        rates: list[list[float]] = []
        for pair in history:
            if (not isinstance(pair, list) or len(pair) != 2 or not isinstance(pair[1], int)
                    or isinstance(pair[1], bool) or pair[1] < 1 or not isinstance(pair[0], (int, float))
                    or not 0.0 < pair[0] <= 1.0):
                raise ConfigError(f"DP accountant history entry {pair!r} is not [rate in (0, 1], rounds >= 1]")
            rates.append([float(pair[0]), int(pair[1])])
        self._rates = rates
