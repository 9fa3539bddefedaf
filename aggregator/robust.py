"""Byzantine-robust aggregation rules: pure numpy, no I/O, no threads.

Each rule maps the round's updates, stacked as an ``(n, d)`` array (one validated delta per row),
to one ``d``-vector the server optimiser then applies in place of the mean:

* ``coordinate_median`` and ``trimmed_mean`` — Yin et al., ICML 2018, "Byzantine-Robust Distributed
  Learning: Towards Optimal Statistical Rates" (coordinate-wise median; coordinate-wise β-trimmed mean).
* ``multi_krum`` — Blanchard et al., NeurIPS 2017, "Machine Learning with Adversaries: Byzantine
  Tolerant Gradient Descent" (Krum scores; Multi-Krum averages the m best-scored updates).
* ``clip_to_norm`` — norm bounding, Sun et al. 2019, "Can You Really Backdoor Federated Learning?":
  every update is scaled down to L2 norm at most M. The only one that streams (one update at a time).

The rules are unweighted, as in their papers: an example count is a claim the device makes, and a
weight an attacker chooses would undo the robustness.
"""
from __future__ import annotations

import math

import numpy as np

from edgetrain.sdk.errors import ConfigError


def _stacked(updates: np.ndarray, minimum: int, rule: str) -> np.ndarray:
    array = np.asarray(updates)
    if array.ndim != 2 or array.shape[1] == 0:
        raise ConfigError(f"{rule} needs a 2-D (updates, parameters) array, got shape {array.shape}")
    if array.shape[0] < minimum:
        raise ConfigError(f"{rule} needs at least {minimum} update(s), got {array.shape[0]}")
    return array.astype(np.float64, copy=False)


def coordinate_median(updates: np.ndarray) -> np.ndarray:
    """The coordinate-wise median (Yin et al. 2018, Option I); an even count averages the middle two."""
    return np.median(_stacked(updates, 1, "median"), axis=0).astype(np.float32)


def trimmed_count(num_updates: int, beta: float) -> int:
    """How many updates the β-trimmed mean drops from *each* end of every coordinate: ⌊β·n⌋."""
    if not 0.0 <= beta < 0.5:
        raise ConfigError(f"trimmed mean needs 0 <= beta < 0.5, got {beta}")
    # round() first so that 0.1 * 30 = 3.0000000000000004 and 0.3 * 10 = 2.9999999999999996 floor as intended.
    return math.floor(round(beta * num_updates, 9))


def trimmed_mean(updates: np.ndarray, beta: float) -> np.ndarray:
    """The coordinate-wise β-trimmed mean (Yin et al. 2018, Option II): per coordinate, drop the
    ⌊β·n⌋ largest and ⌊β·n⌋ smallest values and average the rest."""
    array = _stacked(updates, 1, "trimmed mean")
    k = trimmed_count(array.shape[0], beta)
    ordered = np.sort(array, axis=0)
    return ordered[k:array.shape[0] - k].mean(axis=0).astype(np.float32)


def krum_min_updates(f: int) -> int:
    """Krum's condition n > 2f + 2 (Blanchard et al. 2017, Proposition 1): at least 2f + 3 updates."""
    return 2 * f + 3


def krum_scores(updates: np.ndarray, f: int) -> np.ndarray:
    """Score of update i: the sum of squared L2 distances to its n − f − 2 nearest other updates."""
    if isinstance(f, bool) or not isinstance(f, int) or f < 0:
        raise ConfigError(f"Krum's f must be an integer >= 0, got {f!r}")
    array = _stacked(updates, krum_min_updates(f), f"Krum with f={f}")
    # ‖a − b‖² = ‖a‖² + ‖b‖² − 2a·b: one (n, n) Gram matrix instead of n² vector differences.
    squared_norms = np.einsum("ij,ij->i", array, array)
    distances = np.maximum(squared_norms[:, None] + squared_norms[None, :] - 2.0 * array @ array.T, 0.0)
    np.fill_diagonal(distances, np.inf)  # an update is not its own neighbour
    neighbours = array.shape[0] - f - 2
    return np.sort(distances, axis=1)[:, :neighbours].sum(axis=1)


def multi_krum_selection(updates: np.ndarray, f: int, m: int | None = None) -> np.ndarray:
    """Indices (ascending) of the ``m`` best-scored updates; ``m`` None means n − f."""
    scores = krum_scores(updates, f)
    count = scores.size - f if m is None else m
    if isinstance(count, bool) or not isinstance(count, int) or not 1 <= count <= scores.size - f:
        raise ConfigError(f"Multi-Krum's m must be an integer in [1, n − f] = [1, {scores.size - f}], got {m!r}")
    # A stable sort: equal scores keep the order of arrival, so the selection is deterministic.
    return np.sort(np.argsort(scores, kind="stable")[:count])


def multi_krum(updates: np.ndarray, f: int, m: int | None = None) -> np.ndarray:
    """Multi-Krum (Blanchard et al. 2017): the mean of the ``m`` updates with the lowest Krum scores
    (m = 1 is Krum itself; m None means n − f)."""
    array = _stacked(updates, krum_min_updates(f), f"Multi-Krum with f={f}")
    return array[multi_krum_selection(array, f, m)].mean(axis=0).astype(np.float32)


def clip_to_norm(update: np.ndarray, max_norm: float) -> tuple[np.ndarray, bool]:
    """Norm bounding (Sun et al. 2019): ``update · min(1, M / ‖update‖)``, and whether it was scaled."""
    if not (math.isfinite(max_norm) and max_norm > 0):
        raise ConfigError(f"norm bound must be finite and > 0, got {max_norm}")
    vector = np.asarray(update, dtype=np.float32)
    norm = float(np.linalg.norm(vector.astype(np.float64)))
    if norm <= max_norm:
        return vector, False
    return (vector * np.float32(max_norm / norm)).astype(np.float32), True
