"""The aggregator service's settings, checked whole before any round (``aggregator.service`` runs them)."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

from edgetrain.sdk import topics
from edgetrain.sdk.codecs import check_codec_spec
from edgetrain.sdk.errors import ConfigError

from .secure_rounds import SecureAggregation
from .update_caps import NormHistory, check_factor


@dataclass(frozen=True)
class AggregatorConfig:
    """What one aggregator run does; a bad value raises ConfigError naming it, before anything connects."""

    fleet: str
    out_dir: Path
    rounds: int
    round_timeout_s: float = 60.0
    join_timeout_s: float = 120.0  # how long to wait for enough live devices before a round
    expect_devices: int = 0  # before round 1, wait (up to join_timeout_s) for this many, e.g. a simulated fleet
    max_attempts: int = 3  # announcements of one round before the run fails
    seed: int = 0
    resume: bool = False
    uplink_codec: str = "dense"  # codec spec the devices are told to use
    max_norm: float | None = None
    max_examples: int | None = None
    eval_every: int = 1  # evaluate on the test set every K rounds (and after the last)
    checkpoint_every: int = 1  # checkpoint every K rounds (and after the last)
    resync_every: int = 1  # announce the whole model every K versions, deltas in between
    downlink_codec: str = "dense"  # codec of the announced deltas
    broker_outage_s: float = 300.0  # how long an announcement waits out a broker outage before the run fails
    labels: Mapping[str, Any] = field(default_factory=dict)  # run settings for summary.json (report)
    secure_aggregation: SecureAggregation | None = None  # SecAgg+ rounds (aggregator.secure_rounds); None: plain
    # Memory bounds under flooding (issue 12, defect 5): what overflows is dropped and counted.
    inbox_max_messages: int = 10_000
    inbox_max_bytes: int = 256 * 1024 * 1024
    chunk_timeout_s: float = 60.0  # an incomplete chunked message with no new chunk for this long is dropped
    max_pending_chunk_bytes: int = 256 * 1024 * 1024  # all incomplete chunked messages together
    max_pending_chunk_bytes_per_device: int = 64 * 1024 * 1024
    # Default caps (issue 12, defect 8; aggregator.update_caps), on without any flag; None turns one off.
    # An update weighs at most its device's reported partition and examples_cap_factor x the fleet's median
    # partition; its norm is clipped at norm_clip_factor x the median of the last norm_clip_window accepted
    # norms, once norm_clip_min_history of them were seen.
    examples_cap_factor: float | None = 4.0
    norm_clip_factor: float | None = 5.0
    norm_clip_window: int = 64
    norm_clip_min_history: int = 3

    def __post_init__(self) -> None:
        topics.validate_name(self.fleet, "fleet")
        if self.rounds < 1:
            raise ConfigError(f"rounds must be >= 1, got {self.rounds}")
        if not self.round_timeout_s > 0:
            raise ConfigError(f"round timeout must be > 0 s, got {self.round_timeout_s}")
        if not self.broker_outage_s > 0:
            raise ConfigError(f"broker_outage_s must be > 0 s, got {self.broker_outage_s}")
        if self.max_attempts < 1:
            raise ConfigError(f"max_attempts must be >= 1, got {self.max_attempts}")
        for what, every in (("eval_every", self.eval_every), ("checkpoint_every", self.checkpoint_every),
                            ("resync_every", self.resync_every)):
            if every < 1:
                raise ConfigError(f"{what} must be >= 1, got {every}")
        for what, bound in (("inbox_max_messages", self.inbox_max_messages), ("inbox_max_bytes", self.inbox_max_bytes),
                            ("max_pending_chunk_bytes", self.max_pending_chunk_bytes),
                            ("max_pending_chunk_bytes_per_device", self.max_pending_chunk_bytes_per_device)):
            if bound < 1:
                raise ConfigError(f"{what} must be >= 1, got {bound}")
        if not self.chunk_timeout_s > 0:
            raise ConfigError(f"chunk_timeout_s must be > 0 s, got {self.chunk_timeout_s}")
        self._check_default_caps()
        for what, spec in (("uplink", self.uplink_codec), ("downlink", self.downlink_codec)):
            try:  # unknown codec or a bad parameter: fail before any round, as bad configuration
                check_codec_spec(spec)
            except ConfigError as exc:
                raise ConfigError(f"{what} codec {spec!r}: {exc}") from None

    def _check_default_caps(self) -> None:
        check_factor("examples_cap_factor", self.examples_cap_factor)
        NormHistory(self.norm_clip_factor, self.norm_clip_window, self.norm_clip_min_history)  # raises if bad
