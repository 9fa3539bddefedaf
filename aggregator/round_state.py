"""What one round accumulates while it runs, and what the service tells a progress display."""
from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass, field

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


@dataclass
class RoundTally:
    """Bytes, rejections and device-reported CPU seconds of the open round."""

    bytes_up: int = 0
    bytes_down: int = 0
    rejected: Counter = field(default_factory=Counter)
    detail: list[str] = field(default_factory=list)
    capped: int = 0
    accepted_payload_bytes: int = 0
    device_cpu_s: float = 0.0
    train_loss_sum: float = 0.0  # Σ examples · training loss the devices reported with accepted updates
    train_loss_examples: int = 0

    def add_train_loss(self, loss: object, examples: int) -> None:
        """Count a device's reported training loss (weighted by its examples); a non-finite or non-number
        figure off the wire is ignored: it is a display figure, never an input to the model."""
        if isinstance(loss, (int, float)) and not isinstance(loss, bool) and math.isfinite(loss) and examples > 0:
            self.train_loss_sum += float(loss) * examples
            self.train_loss_examples += examples

    def train_loss(self) -> float | None:
        """The example-weighted mean training loss of the accepted updates (None when none said)."""
        return self.train_loss_sum / self.train_loss_examples if self.train_loss_examples else None
    replayed: int = 0  # accepted before a restart, read back from the update journal


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
