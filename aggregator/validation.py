"""The one gate every update passes before any strategy sees it.

``validate_update`` either returns a ``ValidatedUpdate`` (the decoded float32 delta, its example
count capped at the configured maximum and at the device's default cap, its norm clipped at the adaptive
bound of ``aggregator.update_caps``) or raises ``sdk.errors.UpdateRejected`` whose ``reason``
is one of the ``REJECT_*`` codes below; the aggregator acks the device with that code and counts
it in the round's metrics. Checks run cheapest and most telling first: header facts (sender,
round, model version, duplicates, example count), then the codec, then the decoded numbers.

The context is per round and mutable: the caller calls ``ctx.mark_accepted(update)`` only once the
update is actually folded in, so a rejected update never blocks a correct retry.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Mapping

import numpy as np

from edgetrain.sdk.codecs import get_codec, parse_codec_spec
from edgetrain.sdk.errors import ConfigError, UpdateRejected, WireError
from edgetrain.sdk.wire.messages import Update

from .update_caps import CAP_MAX_EXAMPLES

try:  # BLAS sdot straight: numpy's dot would also check (and warn about) the FP flags an overflow sets
    from scipy.linalg.blas import sdot as _sdot
except ImportError:  # pragma: no cover - a server without scipy
    _sdot = None


REJECT_SPOOFED_SENDER = "spoofed_sender"  # update.device_id differs from the topic it arrived on
REJECT_UNKNOWN_DEVICE = "unknown_device"  # not selected for this round
REJECT_WRONG_ROUND = "wrong_round"  # a future round
REJECT_LATE = "late"  # a past round: arrived after its round (or large-batch step) closed
REJECT_WRONG_MODEL_VERSION = "wrong_model_version"  # trained from other global parameters
REJECT_DUPLICATE = "duplicate"  # update_id already seen, or the device already reported this round
REJECT_BAD_EXAMPLE_COUNT = "bad_example_count"  # num_examples <= 0
REJECT_UNKNOWN_CODEC = "unknown_codec"  # unparsable spec, unregistered or not allowed here
REJECT_UNDECODABLE = "undecodable"  # the codec refused the payload bytes
REJECT_WRONG_SHAPE = "wrong_shape"  # decoded vector is not (num_params,)
REJECT_NON_FINITE = "non_finite"  # NaN or Inf anywhere
REJECT_NORM_TOO_LARGE = "norm_too_large"  # L2 norm above ctx.max_norm
REJECT_BAD_METRICS = "bad_metrics"  # a metrics value NaN/Inf or out of range, or too many of them
REJECT_WRONG_RUN = "wrong_run"  # answers a round of another run (its run id is not this run's)
REJECT_TOO_STALE = "too_stale"  # FedBuff: trained from a model more than max_staleness versions old

REJECT_REASONS: tuple[str, ...] = (
    REJECT_SPOOFED_SENDER, REJECT_UNKNOWN_DEVICE, REJECT_WRONG_ROUND, REJECT_LATE, REJECT_WRONG_MODEL_VERSION,
    REJECT_DUPLICATE, REJECT_BAD_EXAMPLE_COUNT, REJECT_UNKNOWN_CODEC, REJECT_UNDECODABLE,
    REJECT_WRONG_SHAPE, REJECT_NON_FINITE, REJECT_NORM_TOO_LARGE, REJECT_WRONG_RUN,
    REJECT_BAD_METRICS, REJECT_TOO_STALE,
)

# The figures an update carries (cpu_s, loss, latency_s…) are summed into the round's record and its
# strict-JSON checkpoint: each must be finite and plausible, or the update is refused whole.
MAX_METRICS = 64
MAX_METRIC_KEY_CHARS = 64
MAX_METRIC_ABS = 1e12
MAX_DURATION_S = 7 * 24 * 3600.0  # a "*_s" figure: one round's seconds, never negative


@dataclass
class ValidationContext:
    """What the aggregator expects in the current round, plus what it has already accepted.

    ``seen_update_ids`` may be carried across rounds (QoS 1 redeliveries can arrive late);
    ``reported_devices`` is per round. ``allowed_codecs`` (codec names, None = any registered)
    limits what this server accepts; codec parameters travel in the update's codec spec.
    ``example_caps`` (device -> (cap, reason), ``update_caps.example_caps``) lowers a device's claimed
    count on top of ``max_examples``; an update whose norm exceeds ``clip_norm`` is scaled down to it
    (``max_norm`` rejects instead: the operator's hard limit).

    ``max_staleness`` (FedBuff, buffered asynchronous FL): None for a synchronous round, which takes
    updates from its own model version only, once per device. Set, an update trained from any of the last
    ``max_staleness`` versions (its round being that version's) is valid, and a device may report more
    than once; ``ValidatedUpdate.staleness`` says how many versions old it is.
    """

    round_id: int
    model_version: int
    selected: frozenset[str]
    num_params: int
    run_id: str = ""  # the run; an update for another run is refused (wire v2 updates carry their run)
    max_norm: float | None = None
    max_examples: int | None = None
    allowed_codecs: frozenset[str] | None = None
    example_caps: Mapping[str, tuple[int, str]] = field(default_factory=dict)
    clip_norm: float | None = None
    seen_update_ids: set[str] = field(default_factory=set)
    reported_devices: set[str] = field(default_factory=set)
    max_staleness: int | None = None

    def __post_init__(self) -> None:
        self.selected = frozenset(self.selected)
        if self.max_staleness is not None and (isinstance(self.max_staleness, bool)
                                               or not isinstance(self.max_staleness, int) or self.max_staleness < 0):
            raise ConfigError(f"max_staleness must be an integer >= 0 or None, got {self.max_staleness!r}")
        if self.allowed_codecs is not None:
            self.allowed_codecs = frozenset(self.allowed_codecs)
        if self.num_params < 1:
            raise ConfigError(f"num_params must be >= 1, got {self.num_params}")
        if self.max_norm is not None and not (self.max_norm > 0):
            raise ConfigError(f"max_norm must be > 0 or None, got {self.max_norm}")
        if self.max_examples is not None and self.max_examples < 1:
            raise ConfigError(f"max_examples must be >= 1 or None, got {self.max_examples}")
        if self.clip_norm is not None and not (0 < self.clip_norm < math.inf):
            raise ConfigError(f"clip_norm must be finite and > 0 or None, got {self.clip_norm}")
        if any(cap < 1 for cap, _ in self.example_caps.values()):
            raise ConfigError(f"example caps must be >= 1, got {dict(self.example_caps)}")

    def mark_accepted(self, update: Update) -> None:
        """Record an update the caller has folded in, so a redelivery or a second one is a duplicate."""
        self.seen_update_ids.add(update.update_id)
        self.reported_devices.add(update.device_id)

    def pending_devices(self) -> frozenset[str]:
        """Selected devices that have not reported yet."""
        return self.selected - self.reported_devices


@dataclass(frozen=True, eq=False)
class ValidatedUpdate:
    """An accepted update: the decoded delta and the example count to weight it by.

    ``capped`` is True when the device claimed more than its cap (``ctx.max_examples`` or its entry in
    ``ctx.example_caps``, whichever is lower); ``num_examples`` is then the cap, ``cap_reason`` names it
    and ``claimed_examples`` is what the device said (log it, it may be lying). ``clipped``: the vector
    was scaled from ``claimed_norm`` down to ``norm`` (``ctx.clip_norm``).
    """

    device_id: str
    update_id: str
    vector: np.ndarray  # float32, shape (num_params,); may be a read-only view of the payload
    num_examples: int
    claimed_examples: int
    capped: bool
    norm: float  # L2 norm of ``vector``
    cap_reason: str = ""  # an update_caps.CAP_* code when capped
    clipped: bool = False
    claimed_norm: float = 0.0  # the norm as sent (== norm unless clipped)
    staleness: int = 0  # model versions between the update's base and the current one (FedBuff)

    def accumulable(self) -> np.ndarray:
        """The vector for ``Strategy.accumulate``: the float32 vector itself (``WeightedMean`` sums it in
        float32 blocks), widened to float64 (same values) when its norm is so large (>= 2**64) that a
        block of float32 partial sums could come near float32's range."""
        return self.vector if self.norm < FLOAT32_SAFE_NORM else self.vector.astype(np.float64)


def _example_cap(update: Update, ctx: ValidationContext) -> tuple[int, str] | None:
    """The lowest cap that applies to ``update``'s device, with its reason; None when there is none."""
    caps = [(ctx.max_examples, CAP_MAX_EXAMPLES)] if ctx.max_examples is not None else []
    if update.device_id in ctx.example_caps:
        caps.append(ctx.example_caps[update.device_id])
    return min(caps) if caps else None


def _reject(reason: str, update: Update, detail: str) -> UpdateRejected:
    return UpdateRejected(reason, f"update {update.update_id!r} from {update.device_id!r}: {detail}")


def _check_header(update: Update, topic_device: str, ctx: ValidationContext) -> None:
    if update.device_id != topic_device:
        raise _reject(REJECT_SPOOFED_SENDER, update, f"arrived on the topic of device {topic_device!r}")
    if update.run_id != ctx.run_id:  # e.g. re-sent from a device's outbox after the run it answered
        raise _reject(REJECT_WRONG_RUN, update, f"answers run {update.run_id!r}, this is run {ctx.run_id!r}")
    # Before the round checks: an update accepted in an earlier round and re-sent because its ack was
    # lost is one we hold (the device is acked "accepted"), not a late one.
    if update.update_id in ctx.seen_update_ids:
        raise _reject(REJECT_DUPLICATE, update, "update_id already accepted")
    if ctx.max_staleness is not None:
        _check_version_window(update, ctx)
    elif update.round_id < ctx.round_id:
        raise _reject(REJECT_LATE, update, f"is for past round {update.round_id}, current is {ctx.round_id}")
    if update.round_id > ctx.round_id:
        raise _reject(REJECT_WRONG_ROUND, update, f"is for future round {update.round_id}, current is {ctx.round_id}")
    if update.device_id not in ctx.selected:
        raise _reject(REJECT_UNKNOWN_DEVICE, update, f"device was not selected for round {ctx.round_id}")
    if update.model_version != ctx.model_version and ctx.max_staleness is None:
        raise _reject(REJECT_WRONG_MODEL_VERSION, update,
                      f"trained from model version {update.model_version}, round uses {ctx.model_version}")
    if update.device_id in ctx.reported_devices and ctx.max_staleness is None:
        raise _reject(REJECT_DUPLICATE, update, f"device already reported for round {ctx.round_id}")
    count = update.num_examples
    if isinstance(count, bool) or not isinstance(count, int) or count <= 0:
        raise _reject(REJECT_BAD_EXAMPLE_COUNT, update, f"num_examples must be a positive int, got {count!r}")
    _check_metrics(update)


def _check_version_window(update: Update, ctx: ValidationContext) -> None:
    """FedBuff: the update's base is one of the last ``max_staleness`` versions, announced in its round."""
    assert ctx.max_staleness is not None
    staleness = ctx.model_version - update.model_version
    if staleness < 0:
        raise _reject(REJECT_WRONG_MODEL_VERSION, update, f"trained from future model version "
                                                          f"{update.model_version}, current is {ctx.model_version}")
    if staleness > ctx.max_staleness:
        raise _reject(REJECT_TOO_STALE, update, f"trained from model version {update.model_version}, "
                                                f"{staleness} behind {ctx.model_version} (at most {ctx.max_staleness})")
    # Rounds and versions advance together (one server step each): the base version fixes the round.
    if update.round_id != ctx.round_id - staleness:
        raise _reject(REJECT_LATE if update.round_id < ctx.round_id - staleness else REJECT_WRONG_ROUND, update,
                      f"round {update.round_id} did not announce model version {update.model_version}")


def _check_metrics(update: Update) -> None:
    metrics = update.metrics
    if len(metrics) > MAX_METRICS or any(len(key) > MAX_METRIC_KEY_CHARS for key in metrics):
        raise _reject(REJECT_BAD_METRICS, update, f"{len(metrics)} metrics (at most {MAX_METRICS}, keys up to "
                                                  f"{MAX_METRIC_KEY_CHARS} characters)")
    for key, value in metrics.items():
        if not (math.isfinite(value) and abs(value) <= MAX_METRIC_ABS):
            raise _reject(REJECT_BAD_METRICS, update, f"metrics[{key!r}] = {value!r} is not a finite number "
                                                      f"within +-{MAX_METRIC_ABS:g}")
        if key.endswith("_s") and not 0.0 <= value <= MAX_DURATION_S:
            raise _reject(REJECT_BAD_METRICS, update, f"metrics[{key!r}] = {value!r} s is outside 0..{MAX_DURATION_S:g}")


def _decode(update: Update, ctx: ValidationContext) -> np.ndarray:
    try:
        name, params = parse_codec_spec(update.codec)
        codec = get_codec(name)
    except (ConfigError, WireError) as exc:
        raise _reject(REJECT_UNKNOWN_CODEC, update, str(exc)) from None
    if ctx.allowed_codecs is not None and name not in ctx.allowed_codecs:
        raise _reject(REJECT_UNKNOWN_CODEC, update,
                      f"codec {name!r} is not accepted here (allowed: {', '.join(sorted(ctx.allowed_codecs))})")
    # A codec with ``decode_view`` (dense) lends a read-only view of the payload instead of a copy.
    decode = getattr(codec, "decode_view", codec.decode)
    try:
        decoded = decode(update.payload, ctx.num_params, params)
    except (WireError, ConfigError) as exc:  # ConfigError: the spec's parameters are wrong for the codec
        raise _reject(REJECT_UNDECODABLE, update, str(exc)) from None
    vector = np.asarray(decoded)
    if vector.shape != (ctx.num_params,):
        raise _reject(REJECT_WRONG_SHAPE, update, f"decoded shape {vector.shape}, expected ({ctx.num_params},)")
    return vector.astype(np.float32, copy=False)


_FLOAT32_TINY = float(np.finfo(np.float32).tiny)  # the smallest normal float32, 2**-126
FLOAT32_SAFE_NORM = 2.0 ** 64  # below it a float32 sum of squares cannot overflow (squares < 2**128)


def _float32_squares(vector: np.ndarray) -> float:
    """Σ x² of a float32 vector in float32 (inf/NaN where it overflows or a value is not finite)."""
    if _sdot is not None and vector.dtype == np.float32 and vector.flags.c_contiguous and vector.flags.aligned:
        return float(_sdot(vector, vector))
    with np.errstate(over="ignore", invalid="ignore"):
        return float(np.dot(vector, vector))


def _norm(update: Update, vector: np.ndarray) -> float:
    """``vector``'s L2 norm, or REJECT_NON_FINITE: one float32 BLAS dot (sdot) is both checks.

    A NaN makes the sum of squares NaN and an Inf makes it +Inf (terms >= 0 never cancel it), so a finite
    sum means every value is finite. The float32 sum is trusted only where neither overflow nor underflow
    can have touched it: >= n·2**-126 (squares below float32's normal range then change it by < 2**-24
    relative) and finite (every square < 2**128, i.e. norm < 2**64). Outside that (a NaN/Inf, an update
    near float32's range, an all-zero or vanishingly small one) the exact float64 sum decides, as before
    this fast path: in float64 n < 2**53 squares of float32 values cannot overflow, so it is finite iff
    every value is. sdot's rounding is ~1e-7 relative against the float64 norm's ~1e-16.
    """
    squares = _float32_squares(vector)
    if squares < FLOAT32_SAFE_NORM ** 2 and squares >= vector.size * _FLOAT32_TINY:  # False for NaN too
        return math.sqrt(squares)
    vector64 = vector.astype(np.float64)
    squares = float(np.dot(vector64, vector64))
    if not math.isfinite(squares):
        bad = int(np.size(vector) - np.count_nonzero(np.isfinite(vector)))  # only on the rejection path
        raise _reject(REJECT_NON_FINITE, update, f"{bad} NaN/Inf value(s) in the decoded update")
    return math.sqrt(squares)


def validate_update(update: Update, *, topic_device: str, ctx: ValidationContext) -> ValidatedUpdate:
    """Decode and check ``update`` for the round in ``ctx``; raise UpdateRejected(reason, detail) if bad.

    Does not change ``ctx``: call ``ctx.mark_accepted(update)`` once the update is folded in.
    """
    _check_header(update, topic_device, ctx)
    vector = _decode(update, ctx)
    norm = _norm(update, vector)
    if ctx.max_norm is not None and norm > ctx.max_norm:
        raise _reject(REJECT_NORM_TOO_LARGE, update,
                      f"L2 norm {norm:.6g} exceeds the bound {ctx.max_norm:.6g}")
    clipped = ctx.clip_norm is not None and norm > ctx.clip_norm
    if clipped:
        vector = (vector.astype(np.float64) * (ctx.clip_norm / norm)).astype(np.float32)
    claimed = int(update.num_examples)
    cap = _example_cap(update, ctx)
    capped = cap is not None and claimed > cap[0]
    return ValidatedUpdate(
        device_id=update.device_id,
        update_id=update.update_id,
        vector=vector,
        num_examples=cap[0] if capped and cap is not None else claimed,
        claimed_examples=claimed,
        capped=capped,
        norm=float(ctx.clip_norm) if clipped and ctx.clip_norm is not None else norm,
        cap_reason=cap[1] if capped and cap is not None else "",
        clipped=clipped,
        claimed_norm=norm,
        staleness=0 if ctx.max_staleness is None else ctx.model_version - update.model_version,
    )
