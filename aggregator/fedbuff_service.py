"""The aggregator's buffered asynchronous mode (FedBuff, Nguyen et al. 2022; ``aggregator.fedbuff``).

The synchronous service with three changes: every "round" is one server step, announced as
``train_continuous`` to every live device; it closes as soon as the buffer holds K updates, whoever sent
them (no waiting for a selection, so stragglers never hold a step up); and validation takes updates
trained from any of the last S model versions (``ValidationContext.max_staleness``), the strategy
weighting each by its staleness. Journal, acks, checkpoints and metrics are the synchronous service's.
"""
from __future__ import annotations

import logging
from typing import Callable

from edgetrain.sdk.errors import EdgetrainError

from .fedbuff import FedBuff
from .round_state import OpenRound, Progress
from .service import Aggregator
from .validation import ValidationContext

_log = logging.getLogger(__name__)


class BufferedAggregator(Aggregator):
    """Runs ``config.rounds`` FedBuff server steps; the strategy must be ``FedBuff``."""

    def __init__(self, *args, **kwargs) -> None:  # noqa: ANN002, ANN003 (the Aggregator's)
        super().__init__(*args, **kwargs)
        if not isinstance(self.strategy, FedBuff):
            raise EdgetrainError(f"the buffered service runs fedbuff, not {self.strategy.name}")
        self.fedbuff: FedBuff = self.strategy
        # Every device an announcement of this run selected: a stale update answers an older step, whose
        # selection the current one may not repeat (a device that went quiet for a while).
        self._ever_selected: set[str] = set()

    def _validation_context(self, round_id: int, selected: set[str]) -> ValidationContext:
        self._ever_selected |= selected
        ctx = super()._validation_context(round_id, self._ever_selected)
        ctx.max_staleness = self.fedbuff.max_staleness
        return ctx

    def _collect(self, open_round: OpenRound, on_progress: Callable[[Progress], None] | None) -> None:
        """Announce, then take updates until the buffer is full; a deadline with the buffer short
        announces the step again (to the devices live now) at most ``max_attempts`` times."""
        ctx, tally = open_round.ctx, open_round.tally
        while True:
            open_round.attempts += 1
            deadline_mono = self._announce_round(open_round)

            def full() -> bool:
                if on_progress:
                    on_progress(Progress(open_round.round_id, self.config.rounds, self.fedbuff.buffered,
                                         self.fedbuff.buffer_size))
                return not self.fedbuff.accepts_more()

            self._pump(full, deadline_mono, tally, ctx)
            if full():
                return
            if open_round.attempts >= self.config.max_attempts:
                raise EdgetrainError(f"step {open_round.round_id}: {self.fedbuff.buffered} of the "
                                     f"{self.fedbuff.buffer_size} buffered updates after {open_round.attempts} "
                                     "announcement(s); giving up")
            _log.warning("step %d: buffer holds %d of %d updates at the deadline; announcing again (attempt %d)",
                         open_round.round_id, self.fedbuff.buffered, self.fedbuff.buffer_size,
                         open_round.attempts + 1)
            open_round.selected = set(self._choosable(self.live)) or open_round.selected
            self._ever_selected |= open_round.selected
            ctx.selected = frozenset(self._ever_selected)
            ctx.example_caps = self._example_caps(self._ever_selected)
