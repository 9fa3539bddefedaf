"""Secure FedAvg rounds: the devices' updates travel masked (SecAgg+; Bonawitz et al. CCS 2017, Bell et al.
CCS 2020) and the aggregator learns only their sum, which it hands to the strategy as the round's mean.

Weighting: uniform. The protocol sums unweighted vectors; weighting on the device (masking w·Δ and w) would let
a device claim any weight, and the server could no longer cap it (``update_caps``) because it never sees one
device's count: with masks, an inflated weight is an undetectable way to steer the model. With IID-sized
partitions the uniform mean is FedAvg's n_k/n mean; with skewed sizes it is the "FedAvg with equal weights" of
Li et al. (ICLR 2020). ``total_examples`` of a secure round therefore counts the devices summed.

Refused at start, with the reason: sparsifying codecs (``sdk.secagg.device_round.SUMMABLE_CODECS``), robust
rules (they need each update), DP-FedAvg (it clips each update on the server), ``--max-norm`` (the server never
sees a norm), large batch, and aggregation workers. Norm bounding by zero-knowledge proof is out of scope.
"""
from __future__ import annotations

import argparse
import logging
import time
from dataclasses import asdict, dataclass, replace
from typing import Any, Callable

from edgetrain.sdk.cli_args import positive_float, positive_int
from edgetrain.sdk.codecs import CodecSpec
from edgetrain.sdk.errors import ConfigError, EdgetrainError
from edgetrain.sdk.secagg.device_round import check_summable_codec
from edgetrain.sdk.secagg.quantize import FixedPoint
from edgetrain.sdk.transport.base import Handler, Transport
from edgetrain.sdk.wire.secagg import MAX_SECAGG_DEVICES

from .secagg import SecAggParams, SecAggResult, SecAggServer, SecAggServerSession, Stage
from .strategy import RoundPlan

_log = logging.getLogger(__name__)
PUMP_WAIT_S = 0.02  # between two looks at the secure-aggregation queue, the aggregator's own inbox is served
MIN_SECURE_DEVICES = 3  # threshold >= 2 shares, and each device needs >= threshold neighbours


@dataclass(frozen=True)
class SecureAggregation:
    """The secure rounds' knobs: ``neighbours`` k per device (SecAgg+ graph; all devices when n-1 <= k),
    Shamir ``threshold`` t (None: k//2 + 1, the least Bell et al. allow), per-value ``clip`` and ``value_bits``
    of the fixed-point quantisation, and each protocol stage's timeout after the first (which also covers
    local training and gets the round timeout)."""

    neighbours: int = 8
    threshold: int | None = None
    clip: float = 0.5
    value_bits: int = 20
    stage_timeout_s: float = 30.0

    def __post_init__(self) -> None:
        if isinstance(self.neighbours, bool) or not isinstance(self.neighbours, int) or self.neighbours < 2:
            raise ConfigError(f"--secagg-neighbours must be an integer >= 2, got {self.neighbours!r}")
        if self.threshold is not None and (not isinstance(self.threshold, int) or not
                                           self.neighbours // 2 < self.threshold <= self.neighbours):
            raise ConfigError(f"--secagg-threshold must exceed half the {self.neighbours} neighbours and not exceed "
                              f"them (Bell et al.: t > k/2), got {self.threshold!r}")
        # ConfigError names a bad clip or bit count, or a ring that a round of the most devices a roster can
        # list would overflow: checked now, not at round 1.
        FixedPoint(self.clip, self.value_bits, MAX_SECAGG_DEVICES)
        if not self.stage_timeout_s > 0:
            raise ConfigError(f"--secagg-stage-timeout must be > 0, got {self.stage_timeout_s!r}")

    def round_params(self, num_selected: int, num_params: int, first_stage_timeout_s: float) -> SecAggParams:
        """The protocol settings of a round of ``num_selected`` devices."""
        if num_selected < MIN_SECURE_DEVICES:
            raise ConfigError(f"a secure round needs at least {MIN_SECURE_DEVICES} devices, {num_selected} chosen")
        k = min(self.neighbours, num_selected - 1)
        if k < num_selected - 1 and k % 2:  # the Harary graph needs an even degree below n-1
            k -= 1
        threshold = k // 2 + 1 if self.threshold is None else min(self.threshold, k)
        if 2 * threshold <= k:
            threshold = k // 2 + 1
        return SecAggParams(threshold, k, FixedPoint(self.clip, self.value_bits, num_selected), num_params,
                            self.stage_timeout_s, first_stage_timeout_s=first_stage_timeout_s)


def add_secure_aggregation_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("secure aggregation (SecAgg+: the aggregator learns only the sum of the updates)")
    g.add_argument("--secure-aggregation", action="store_true",
                   help="mask every update (SecAgg+); FedAvg-family strategies, --aggregation mean, dense/fp16/q8")
    g.add_argument("--secagg-neighbours", type=positive_int, default=SecureAggregation.neighbours,
                   help="k: neighbours each device masks with (default 8; all devices when fewer)")
    g.add_argument("--secagg-threshold", type=positive_int,
                   help="t: shares needed to unmask (default k//2+1; must exceed k/2)")
    g.add_argument("--secagg-clip", type=positive_float, default=SecureAggregation.clip,
                   help="clip each update value to [-C, C] before quantising (default 0.5)")
    g.add_argument("--secagg-bits", type=positive_int, default=SecureAggregation.value_bits,
                   help="bits per quantised value (default 20; error <= C/(2^B-1) per value of the mean)")
    g.add_argument("--secagg-stage-timeout", type=positive_float, default=SecureAggregation.stage_timeout_s,
                   help="seconds per protocol stage after the first (default 30)")


def secure_aggregation_from_args(args: argparse.Namespace) -> SecureAggregation | None:
    """The run's secure-aggregation settings, or None without --secure-aggregation; ConfigError says why
    another flag cannot go with it."""
    if not getattr(args, "secure_aggregation", False):
        return None
    aggregation = getattr(args, "aggregation", None) or "mean"
    if getattr(args, "strategy", "fedavg") == "large-batch":
        raise ConfigError("--secure-aggregation is for FL strategies (fedavg, fedprox, fedavgm, fedadam…); "
                          "large-batch steps on individual gradients with backup workers")
    if aggregation != "mean":
        raise ConfigError(f"--secure-aggregation refuses --aggregation {aggregation}: a robust rule needs every "
                          "device's update, and the aggregator sees only their sum")
    if getattr(args, "dp_clip", None) is not None or getattr(args, "dp_noise_multiplier", None) is not None:
        raise ConfigError("--secure-aggregation refuses DP-FedAvg (--dp-*): it clips each update on the "
                          "aggregator, which sees only the masked sum")
    if getattr(args, "max_norm", None) is not None:
        raise ConfigError("--secure-aggregation refuses --max-norm: the aggregator never sees one update's norm "
                          "(norm bounding under masks needs zero-knowledge proofs, out of scope)")
    if getattr(args, "workers", 1) != 1:
        raise ConfigError("--secure-aggregation runs in one aggregator process (--workers 1)")
    if getattr(args, "min_devices", MIN_SECURE_DEVICES) < MIN_SECURE_DEVICES:
        raise ConfigError(f"--secure-aggregation needs --min-devices >= {MIN_SECURE_DEVICES} (t >= 2 shares, and "
                          f"each device needs t neighbours), got {args.min_devices}")
    check_summable_codec(CodecSpec.parse(getattr(args, "codec", "dense") or "dense").name)
    return SecureAggregation(neighbours=args.secagg_neighbours, threshold=args.secagg_threshold,
                             clip=args.secagg_clip, value_bits=args.secagg_bits,
                             stage_timeout_s=args.secagg_stage_timeout)


def secure_summary(settings: SecureAggregation | None) -> dict[str, Any]:
    """``summary.json``'s record of it: ``secure_aggregation`` (bool) and the knobs when on."""
    return {"secure_aggregation": settings is not None, **({"secagg": asdict(settings)} if settings else {})}


class _CountingTransport:
    """The transport, counting the bytes the secure-aggregation session sends and receives."""

    def __init__(self, transport: Transport) -> None:
        self.transport = transport
        self.bytes_up = self.bytes_down = 0

    def subscribe(self, topic_filter: str, handler: Handler, qos: int = 1, timeout_s: float = 10.0) -> None:
        def counted(topic: str, payload: bytes) -> None:  # network thread: an int add under the GIL
            self.bytes_up += len(payload)
            handler(topic, payload)
        self.transport.subscribe(topic_filter, counted, qos, timeout_s)

    def publish(self, topic: str, payload: bytes, *args: Any, **kwargs: Any) -> None:
        self.bytes_down += len(payload)
        self.transport.publish(topic, payload, *args, **kwargs)


@dataclass(frozen=True)
class SecureRoundOutcome:
    """A secure round's sum, and what it cost (bytes through the secure-aggregation topics)."""

    result: SecAggResult
    attempts: int
    bytes_up: int
    bytes_down: int
    rejections: dict[str, int]

    def extra(self) -> dict[str, Any]:
        """The round's metrics line: who was summed, who dropped, the bound on the mean's error per value."""
        n = len(self.result.survivors)
        return {"secure_aggregation": True, "secagg_survivors": n, "secagg_dropped": len(self.result.dropped),
                "secagg_mean_error_bound": self.result.error_bound / n, "secagg_bytes_up": self.bytes_up,
                "secagg_bytes_down": self.bytes_down, "secagg_rejected": self.rejections}


def run_secure_round(settings: SecureAggregation, transport: Transport, fleet: str, run_id: str, plan: RoundPlan,
                     num_params: int, round_timeout_s: float, max_attempts: int,
                     announce: Callable[[RoundPlan, tuple[str, ...]], int],
                     wait: Callable[[float], None], reselect: Callable[[tuple[str, ...]], tuple[str, ...]]
                     ) -> SecureRoundOutcome:
    """Announce ``plan`` as secure and run the server's SecAgg+ session until it has the sum; an aborted
    protocol is announced again (devices ``reselect`` chooses) up to ``max_attempts`` times, then fails.
    ``announce`` publishes and returns the bytes sent; ``wait(s)`` serves the aggregator's inbox for s seconds
    (statuses; it raises when the run is stopped)."""
    plan = replace(plan, settings=replace(plan.settings, secure_aggregation=True))
    selected = tuple(sorted(plan.selected))
    counter = _CountingTransport(transport)
    for attempt in range(1, max_attempts + 1):
        params = settings.round_params(len(selected), num_params, round_timeout_s)
        server = SecAggServer(run_id, plan.round_id, selected, params, time.time)
        session = SecAggServerSession(counter, fleet, server)  # subscribed before the announcement goes out
        counter.bytes_down += announce(replace(plan, selected=selected), selected)
        while server.stage not in (Stage.DONE, Stage.ABORTED):
            session.pump()
            wait(PUMP_WAIT_S)
        if server.result is not None:
            return SecureRoundOutcome(server.result, attempt, counter.bytes_up, counter.bytes_down,
                                      dict(server.rejections))
        _log.warning("round %d: secure aggregation aborted (attempt %d of %d): %s", plan.round_id, attempt,
                     max_attempts, server.abort_reason)
        if attempt < max_attempts:
            selected = reselect(selected)
    raise EdgetrainError(f"round {plan.round_id}: secure aggregation aborted {max_attempts} time(s); last: "
                         f"{server.abort_reason}")
