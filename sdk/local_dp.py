"""Local differential privacy: noise on the device, before its update leaves it (``--local-dp-*``).

The device clips its update Δ to L2 norm S and adds N(0, (z·S)²) per coordinate (the Gaussian
mechanism of Dwork & Roth 2014, §A; as a local randomizer in the sense of Kasiviswanathan et al. 2011):
the server, the broker and anyone on the wire see only the noised vector. Unlike central DP-FedAvg
(``aggregator.dp``) it trusts nobody, and pays for it: the noise is per device, not per sum, so the
mean of m devices carries noise of scale z·S/√m instead of z·S/m.

Adjacency: user-level *replacement*, i.e. any two local data sets of this one device. In local DP
there is no "absent" user to compare with (the device sends an update either way), so the two
compared outputs are two clipped updates, ‖Δ − Δ'‖ ≤ 2S: the L2 sensitivity is 2S and each release
is a Gaussian mechanism of multiplier z·S / 2S = z/2. (Add/remove-one-user with the zero update,
sensitivity S, would report an ε about half as large for the same noise; we do not claim it.)

Accounting: each update the device sends is one release of its data; there is no sampling
amplification (the device knows it was asked). The releases compose in Google's ``dp-accounting``
(RDP accountant, Mironov 2017), imported only when local DP is on: it ships with the server extra,
and a board without it gets a clear error at start. The count of releases is kept in the device's
state directory across restarts and runs (the data are the same, so ε never starts afresh).

Limits: noise from numpy's PCG64 seeded from OS entropy, in float64 (see ``aggregator.dp``).
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .atomic_write import atomic_write_json
from .errors import ConfigError

DEFAULT_DELTA = 1e-5
SENSITIVITY_IN_CLIPS = 2.0  # replacement adjacency: two clipped updates differ by at most 2S
LEDGER_FILE = "local_dp.json"


@dataclass(frozen=True)
class LocalDPConfig:
    """``--local-dp-clip S --local-dp-noise-multiplier Z [--local-dp-delta D]``."""

    clip_norm: float
    noise_multiplier: float
    delta: float = DEFAULT_DELTA

    def __post_init__(self) -> None:
        for name in ("clip_norm", "noise_multiplier"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not (
                    math.isfinite(value) and value > 0):
                raise ConfigError(f"--local-dp-{name.replace('_norm', '').replace('_', '-')} must be a finite "
                                  f"number > 0, got {value!r}")
        if isinstance(self.delta, bool) or not isinstance(self.delta, (int, float)) or not 0.0 < self.delta < 1.0:
            raise ConfigError(f"--local-dp-delta must be in (0, 1), got {self.delta!r} (δ >= 1 guarantees nothing)")

    @classmethod
    def from_flags(cls, clip: float | None, noise_multiplier: float | None,
                   delta: float | None) -> "LocalDPConfig | None":
        """The config the three flags ask for; None when none is given; ConfigError for a partial set."""
        if clip is None and noise_multiplier is None:
            if delta is not None:
                raise ConfigError("--local-dp-delta needs --local-dp-clip and --local-dp-noise-multiplier")
            return None
        if clip is None:
            raise ConfigError("--local-dp-noise-multiplier needs --local-dp-clip: Gaussian noise without "
                              "clipping bounds nothing (the update's norm is unbounded)")
        if noise_multiplier is None:
            raise ConfigError("--local-dp-clip needs --local-dp-noise-multiplier: clipping without noise "
                              "gives no privacy")
        return cls(float(clip), float(noise_multiplier), DEFAULT_DELTA if delta is None else float(delta))

    @property
    def noise_stddev(self) -> float:
        """σ = z·S, per coordinate."""
        return self.noise_multiplier * self.clip_norm

    @property
    def mechanism_multiplier(self) -> float:
        """σ over the L2 sensitivity (2S): the Gaussian mechanism's multiplier the accountant charges."""
        return self.noise_multiplier / SENSITIVITY_IN_CLIPS


def privatize(update: np.ndarray, config: LocalDPConfig, rng: np.random.Generator) -> np.ndarray:
    """Δ·min(1, S/‖Δ‖) + N(0, (z·S)²·I), computed in float64, sent as float32."""
    vector = np.asarray(update, dtype=np.float64).ravel()
    norm = float(np.linalg.norm(vector))
    if not math.isfinite(norm):
        raise ConfigError("local DP: the update has non-finite entries; nothing to clip")
    if norm > config.clip_norm:
        vector = vector * (config.clip_norm / norm)
    return (vector + rng.normal(0.0, config.noise_stddev, size=vector.size)).astype(np.float32)


def require_accountant() -> None:
    """Fail at start, not at the first round, when ``dp-accounting`` is missing."""
    try:
        import dp_accounting  # noqa: F401
    except ImportError as exc:
        raise ConfigError(f"local DP needs the 'dp-accounting' package for its privacy accounting ({exc}); "
                          "install it (pip install dp-accounting, or edgetrain's server extra)") from None


def local_epsilon(releases: list[list[float]], delta: float) -> float:
    """ε at ``delta`` after ``releases`` ([mechanism multiplier, count] pairs): unsampled Gaussian
    mechanisms composed by dp-accounting's RDP accountant (0 before any release)."""
    if not releases:
        return 0.0
    import dp_accounting

    accountant = dp_accounting.rdp.RdpAccountant()
    for multiplier, count in releases:
        accountant.compose(dp_accounting.GaussianDpEvent(float(multiplier)), int(count))
    return float(accountant.get_epsilon(delta))


class LocalPrivacyLedger:
    """The releases this device made, run-length by mechanism multiplier, kept in ``state_dir``."""

    def __init__(self, state_dir: Path) -> None:
        self.path = Path(state_dir) / LEDGER_FILE
        self.releases = self._read()

    def _read(self) -> list[list[float]]:
        try:
            raw = json.loads(self.path.read_text())["releases"]
        except FileNotFoundError:
            return []
        except (ValueError, KeyError, TypeError) as exc:
            # Never start afresh silently: that would under-report the privacy already spent.
            raise ConfigError(f"{self.path} is unreadable ({exc}); the privacy this device spent is unknown. "
                              "Remove it only if this device's data changed") from None
        if not isinstance(raw, list) or not all(
                isinstance(p, list) and len(p) == 2 and isinstance(p[1], int) and p[1] >= 1
                and isinstance(p[0], (int, float)) and math.isfinite(p[0]) and p[0] > 0 for p in raw):
            raise ConfigError(f"{self.path}: releases must be [multiplier > 0, count >= 1] pairs, got {raw!r}")
        return [[float(m), int(c)] for m, c in raw]

    def record(self, multiplier: float) -> None:
        """Charge one release (saved before the update is sent: a crash over-counts, never under-counts)."""
        if self.releases and self.releases[-1][0] == multiplier:
            self.releases[-1][1] += 1
        else:
            self.releases.append([float(multiplier), 1])
        atomic_write_json(self.path, {"releases": self.releases})

    def epsilon(self, delta: float) -> float:
        return local_epsilon(self.releases, delta)
