"""What one round accumulates while it runs, and what the service tells a progress display."""
from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass, field

from edgetrain.sdk.round_settings import RoundSettings

from .results import RoundRecord
from .strategy import RoundPlan
from .validation import ValidationContext


@dataclass(frozen=True)
class Progress:
    """What the service reports to a progress display while a round runs."""

    round_id: int
    rounds: int
    reported: int
    chosen: int
    record: RoundRecord | None = None  # set once the round closed


def examples_processed(settings: RoundSettings, claimed_examples: int, updates: int = 1) -> int:
    """Examples ``updates`` accepted updates trained on, from the round's settings: K steps x B each when
    ``local_steps`` is set, else E epochs x the examples they claim in all (a large-batch step claims its one
    batch, E = 1). Nominal: an epoch's short last batch counts whole. LB and FL are compared at equal examples
    with it; a worker's partial carries its updates' claimed sum, so the coordinator counts the same."""
    if settings.local_steps is not None:
        return updates * settings.local_steps * settings.batch_size
    return settings.local_epochs * max(0, int(claimed_examples))


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def local_dp_fields(local_epsilon: tuple[float, float] | None) -> dict[str, float]:
    """``local_epsilon`` / ``local_dp_delta`` of a (max ε, its δ) pair, for a round record's ``extra`` or a
    worker's final partial; {} without local DP."""
    return {} if local_epsilon is None else {"local_epsilon": local_epsilon[0], "local_dp_delta": local_epsilon[1]}


def larger_local_epsilon(current: tuple[float, float] | None, epsilon: object,
                         delta: object) -> tuple[float, float] | None:
    """(ε, δ) with the larger ε of ``current`` and a device's report; a figure off the wire that is not a
    finite number >= 0 (or a δ outside (0, 1)) is ignored: it is reported, never used."""
    if not (_is_number(epsilon) and epsilon >= 0 and _is_number(delta) and 0 < delta < 1):  # type: ignore[operator]
        return current
    if current is None or float(epsilon) > current[0]:  # type: ignore[arg-type]
        return float(epsilon), float(delta)  # type: ignore[arg-type]
    return current


MAX_DETAIL_LINES = 100  # a flood of rejections must not grow a round's record (or memory) without bound


@dataclass
class RoundTally:
    """Bytes, rejections and device-reported CPU seconds of the open round."""

    bytes_up: int = 0
    bytes_down: int = 0
    rejected: Counter = field(default_factory=Counter)
    detail: list[str] = field(default_factory=list)  # the first MAX_DETAIL_LINES lines, then a count
    detail_dropped: int = 0
    capped: int = 0
    capped_by: Counter = field(default_factory=Counter)  # update_caps.CAP_* -> updates
    clipped: int = 0  # updates whose norm was scaled down to the adaptive bound
    accepted_payload_bytes: int = 0
    metrics_bytes_up: int = 0  # the devices' metrics and status frames (instrumentation, not bytes_up)
    examples_processed: int = 0  # nominal examples behind the accepted updates (``examples_processed``)
    settings: RoundSettings | None = None  # the round's device settings, once it is opened
    device_cpu_s: float = 0.0
    train_loss_sum: float = 0.0  # Σ examples · training loss the devices reported with accepted updates
    train_loss_examples: int = 0
    local_epsilon: tuple[float, float] | None = None  # (max ε, its δ) over the devices with local DP
    replayed: int = 0  # accepted before a restart, read back from the update journal

    def add_train_loss(self, loss: object, examples: int) -> None:
        """Count a device's reported training loss (weighted by its examples); a non-finite or non-number
        figure off the wire is ignored: it is a display figure, never an input to the model."""
        if _is_number(loss) and examples > 0:
            self.train_loss_sum += float(loss) * examples  # type: ignore[arg-type]
            self.train_loss_examples += examples

    def train_loss(self) -> float | None:
        """The example-weighted mean training loss of the accepted updates (None when none said)."""
        return self.train_loss_sum / self.train_loss_examples if self.train_loss_examples else None

    def add_local_epsilon(self, epsilon: object, delta: object) -> None:
        """Keep the largest ε a device with local DP (sdk.local_dp) reported, with its δ."""
        self.local_epsilon = larger_local_epsilon(self.local_epsilon, epsilon, delta)

    def local_dp_extra(self) -> dict[str, float]:
        """The round's ``local_epsilon`` (max over its devices) and ``local_dp_delta``; {} without local DP."""
        return local_dp_fields(self.local_epsilon)

    def note(self, line: str) -> None:
        """Keep one human-readable line for the round's record, up to MAX_DETAIL_LINES."""
        if len(self.detail) < MAX_DETAIL_LINES:
            self.detail.append(line)
        else:
            self.detail_dropped += 1

    def detail_lines(self) -> tuple[str, ...]:
        """The kept lines, plus one saying how many were left out."""
        more = (f"... and {self.detail_dropped} more",) if self.detail_dropped else ()
        return (*self.detail, *more)


@dataclass
class OpenRound:
    """The round the service is collecting: its selection, validation context and tally."""

    round_id: int
    started_mono_s: float
    plan: RoundPlan  # what the strategy chose; announced with the (possibly widened) selection
    selected: set[str]
    ctx: ValidationContext
    tally: RoundTally = field(default_factory=RoundTally)
    attempts: int = 0
    join_wait_s: float = 0.0  # the wait for enough devices online, before the round's clock started
