"""Default bounds on what one update may weigh, from what the aggregator knows (issue 12, defect 8).

Without ``--max-examples`` / ``--max-norm`` one device could claim 10^12 examples, or send a delta a
million times larger than anyone else's, and dominate the average. Two defaults close that:

- **Example count**: an update weighs at most the partition size its device reported in its status
  (FedAvg's n_k *is* that size; a large-batch step's batch is part of it), and at most
  ``examples_factor`` x the median partition size of the fleet. The median bounds a device that also
  lies in its status: one of N devices weighs at most factor/(factor+N-1) of the round.
- **Norm**: an update whose L2 norm exceeds ``norm_factor`` x the running median of the norms accepted
  so far is *clipped* to that bound (scaled down, direction kept): the norm-bounding defence of Sun et
  al. 2019, "Can You Really Backdoor Federated Learning?" (arXiv:1911.07963). Clipped rather than
  rejected because an honest device with a large step (more data, a non-IID shard) then still counts,
  and a round never fails for want of updates the bound refused; an attacker's influence is bounded
  either way. The median (not the mean) is what a minority of hostile devices cannot drag upwards, and
  the clipped norm is what enters the history, so repeated large updates cannot ratchet the bound.
  Until ``norm_min_history`` norms were accepted there is no adaptive bound (only ``--max-norm``).
"""
from __future__ import annotations

import collections
import statistics
from typing import Callable, Iterable

from edgetrain.sdk.errors import ConfigError

# Why an example count was lowered (the round's record counts them under these names).
CAP_MAX_EXAMPLES = "max_examples"  # the operator's --max-examples
CAP_PARTITION_SIZE = "partition_size"  # more than the device's own status said it holds
CAP_FLEET_MEDIAN = "fleet_median"  # more than examples_factor x the fleet's median partition
CLIP_NORM_MEDIAN = "norm_median"  # norm above norm_factor x the running median of accepted norms


def check_factor(what: str, factor: float | None) -> None:
    """A cap factor is None (off) or a finite number >= 1 (below 1 would cut honest median devices)."""
    if factor is not None and not (1.0 <= factor < float("inf")):
        raise ConfigError(f"{what} must be >= 1 (or None to turn it off), got {factor!r}")


def example_caps(devices: Iterable[str], partition_size: Callable[[str], int | None],
                 examples_factor: float | None) -> dict[str, tuple[int, str]]:
    """Per device: (most examples one update of it may weigh, the cap's reason); devices without any
    known bound are absent. ``partition_size`` is what each device's status reported (None: unknown)."""
    devices = sorted(set(devices))
    sizes = {d: partition_size(d) for d in devices}
    known = [s for s in sizes.values() if s is not None]
    fleet_cap = (max(1, int(examples_factor * statistics.median(known)))
                 if known and examples_factor is not None else None)
    caps: dict[str, tuple[int, str]] = {}
    for device in devices:
        own = sizes[device]
        if own is not None and (fleet_cap is None or own <= fleet_cap):
            caps[device] = (own, CAP_PARTITION_SIZE)
        elif fleet_cap is not None:
            caps[device] = (fleet_cap, CAP_FLEET_MEDIAN)
    return caps


class NormHistory:
    """The last ``window`` accepted update norms; ``bound()`` is ``factor`` x their median."""

    def __init__(self, factor: float | None, window: int = 64, min_history: int = 3) -> None:
        check_factor("norm_clip_factor", factor)
        if window < 1 or not 1 <= min_history <= window:
            raise ConfigError(f"norm history needs window >= 1 and 1 <= min_history <= window, got window "
                              f"{window}, min_history {min_history}")
        self.factor = factor
        self.min_history = min_history
        self._norms: collections.deque[float] = collections.deque(maxlen=window)

    def bound(self) -> float | None:
        """The clipping bound now, or None (turned off, or too few norms seen yet)."""
        if self.factor is None or len(self._norms) < self.min_history:
            return None
        median = statistics.median(self._norms)
        return self.factor * median if median > 0 else None  # all-zero updates so far: nothing to scale from

    def add(self, norm: float) -> None:
        """Record an accepted update's norm (after clipping)."""
        self._norms.append(float(norm))
