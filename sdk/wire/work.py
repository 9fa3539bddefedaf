"""The two messages between an aggregation coordinator and its workers (``aggregator.worker``).

``WorkOrder`` (coordinator -> workers, retained): the round the workers validate updates for, with
everything ``aggregator.validation.ValidationContext`` needs, so a worker needs no model and no runtime.
``closing`` asks each worker for its final partial sum of the round.

``PartialSum`` (worker -> coordinator): one worker's associative partial sums of a round (Σw·Δ in the
payload as float64 little-endian, Σw, counts, rejections and the ids of the updates it accepted), so the
coordinator reduces K partials instead of N updates (``WeightedMean.from_partial_sums``). Progress
reports (``final`` False) carry no payload: the coordinator uses their accepted devices to decide when a
round is complete.

Both arrive off the wire: every field is checked here, and every size is bounded before the receiver
allocates (``MAX_IDS_PER_PARTIAL``; the payload length must equal 8 x the round's parameter count).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Mapping

from ..errors import WireError
from .messages import _as_float, _check_bool, _check_bytes, _check_count, _check_run_id, _check_str, _fail, _set

MAX_IDS_PER_PARTIAL = 20_000  # accepted update ids in one partial: keeps the JSON header under its 1 MiB bound
MAX_WORKER_ID_CHARS = 64


def _check_optional_positive(owner: object, name: str, integer: bool) -> None:
    value = getattr(owner, name)
    if value is None:
        return
    number = value if integer else _as_float(owner, name, value)
    if integer:
        _check_count(owner, name)
    if not (math.isfinite(number) and number > 0):
        raise _fail(owner, name, f"must be > 0 and finite or absent, got {value!r}")
    _set(owner, name, number)


def _check_str_tuple(owner: object, name: str, limit: int) -> None:
    value = getattr(owner, name)
    if not isinstance(value, (list, tuple)):
        raise _fail(owner, name, f"expected a list of strings, got {type(value).__name__}")
    if len(value) > limit:
        raise _fail(owner, name, f"{len(value)} entries, at most {limit} allowed")
    if not all(isinstance(item, str) and item for item in value):
        raise _fail(owner, name, "every entry must be a non-empty string")
    _set(owner, name, tuple(value))


def _check_count_map(owner: object, name: str) -> None:
    value = getattr(owner, name)
    if not isinstance(value, Mapping):
        raise _fail(owner, name, f"expected a mapping, got {type(value).__name__}")
    if len(value) > 64:
        raise _fail(owner, name, f"{len(value)} reasons, at most 64 allowed")
    for key, count in value.items():
        if not isinstance(key, str) or not key or isinstance(count, bool) or not isinstance(count, int) or count < 0:
            raise _fail(owner, name, f"expected reason -> count >= 0, got {key!r}: {count!r}")
    _set(owner, name, dict(value))


@dataclass(frozen=True)
class WorkOrder:
    """Coordinator -> workers: validate updates for ``round_id`` of ``run_id`` (model ``model_version``,
    ``num_params`` parameters) from ``selected``; bounds as in ``ValidationContext``. ``example_caps``
    maps a device to its example cap. ``committed_through``: rounds a checkpoint covers (workers drop
    their journals of them). ``closing``: send the final ``PartialSum`` of the round now."""

    run_id: str
    round_id: int
    model_version: int
    num_params: int
    selected: tuple[str, ...]
    committed_through: int
    closing: bool
    max_norm: float | None = None
    max_examples: int | None = None
    clip_norm: float | None = None
    example_caps: Mapping[str, int] | None = None

    def __post_init__(self) -> None:
        _check_run_id(self)
        for name in ("round_id", "model_version", "num_params", "committed_through"):
            _check_count(self, name)
        if self.num_params < 1:
            raise _fail(self, "num_params", "must be >= 1")
        _check_str_tuple(self, "selected", MAX_IDS_PER_PARTIAL)
        _check_bool(self, "closing")
        _check_optional_positive(self, "max_norm", integer=False)
        _check_optional_positive(self, "max_examples", integer=True)
        _check_optional_positive(self, "clip_norm", integer=False)
        caps = {} if self.example_caps is None else self.example_caps
        if not isinstance(caps, Mapping) or len(caps) > MAX_IDS_PER_PARTIAL:
            raise _fail(self, "example_caps", f"expected a mapping of at most {MAX_IDS_PER_PARTIAL} devices")
        for device, cap in caps.items():
            if not isinstance(device, str) or isinstance(cap, bool) or not isinstance(cap, int) or cap < 1:
                raise _fail(self, "example_caps", f"expected device -> cap >= 1, got {device!r}: {cap!r}")
        _set(self, "example_caps", dict(caps))


@dataclass(frozen=True)
class PartialSum:
    """Worker -> coordinator: worker ``worker_id``'s partial sums of ``round_id`` (see the module docstring).
    ``payload``: Σ num_examples·Δ as float64 little-endian when ``final``, else empty. ``norms``: the L2
    norms of the accepted updates (the coordinator's adaptive clipping bound learns from them)."""

    run_id: str
    round_id: int
    worker_id: str
    final: bool
    total_weight: float
    num_updates: int
    accepted_update_ids: tuple[str, ...]
    accepted_devices: tuple[str, ...]
    rejected: Mapping[str, int]
    norms: tuple[float, ...]
    bytes_up: int
    accepted_payload_bytes: int
    device_cpu_s: float
    train_loss_sum: float
    train_loss_examples: int
    payload: bytes
    local_epsilon: float | None = None  # the largest ε a device with local DP reported (sdk.local_dp), final only
    local_dp_delta: float | None = None  # its δ
    claimed_examples: int = 0  # Σ the examples the accepted updates claimed (the round's examples processed), final only

    def __post_init__(self) -> None:
        _check_run_id(self)
        _check_count(self, "round_id")
        _check_str(self, "worker_id")
        self._check_local_epsilon()
        if len(self.worker_id) > MAX_WORKER_ID_CHARS:
            raise _fail(self, "worker_id", f"at most {MAX_WORKER_ID_CHARS} characters")
        _check_bool(self, "final")
        for name in ("num_updates", "bytes_up", "accepted_payload_bytes", "train_loss_examples", "claimed_examples"):
            _check_count(self, name)
        for name in ("total_weight", "device_cpu_s", "train_loss_sum"):
            number = _as_float(self, name, getattr(self, name))
            if not math.isfinite(number) or (name != "train_loss_sum" and number < 0):
                raise _fail(self, name, f"must be finite{'' if name == 'train_loss_sum' else ' and >= 0'}, "
                                        f"got {number!r}")
            _set(self, name, number)
        _check_str_tuple(self, "accepted_update_ids", MAX_IDS_PER_PARTIAL)
        _check_str_tuple(self, "accepted_devices", MAX_IDS_PER_PARTIAL)
        if not len(self.accepted_update_ids) == len(self.accepted_devices) == self.num_updates:
            raise _fail(self, "num_updates", f"{self.num_updates}, but {len(self.accepted_update_ids)} ids and "
                                             f"{len(self.accepted_devices)} devices")
        _check_count_map(self, "rejected")
        self._check_norms()
        _check_bytes(self, "payload")
        if not self.final and self.payload:
            raise _fail(self, "payload", "a progress report (final False) carries no sums")
        if self.payload and len(self.payload) % 8:
            raise _fail(self, "payload", f"{len(self.payload)} bytes is not a whole number of float64 values")

    def _check_local_epsilon(self) -> None:
        if self.local_epsilon is None and self.local_dp_delta is None:
            return
        if self.local_epsilon is None or self.local_dp_delta is None:
            raise _fail(self, "local_epsilon", "local_epsilon and local_dp_delta come together")
        epsilon = _as_float(self, "local_epsilon", self.local_epsilon)
        delta = _as_float(self, "local_dp_delta", self.local_dp_delta)
        if not (math.isfinite(epsilon) and epsilon >= 0 and 0 < delta < 1):
            raise _fail(self, "local_epsilon", f"expected epsilon >= 0 and delta in (0, 1), got {epsilon!r}, {delta!r}")
        _set(self, "local_epsilon", epsilon)
        _set(self, "local_dp_delta", delta)

    def _check_norms(self) -> None:
        norms = self.norms
        if not isinstance(norms, (list, tuple)) or len(norms) != self.num_updates:
            raise _fail(self, "norms", f"expected {self.num_updates} norms")
        values = tuple(_as_float(self, "norms", n) for n in norms)
        if not all(math.isfinite(n) and n >= 0 for n in values):
            raise WireError(f"{type(self).__name__}.norms: every norm must be finite and >= 0")
        _set(self, "norms", values)
