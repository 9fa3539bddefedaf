"""The fleet view: each device's own measurements (``edgetrain/<fleet>/metrics/<device>``) per round.

Devices publish one ``wire.DeviceMetrics`` per round (large-batch workers: per group of steps) just
before the update it describes, so it is in the aggregator's queue before the round can close. The
collector keeps what arrived for the open round and hands it over when the round's record is
written: ``extra["devices"] = {device: values}`` plus fleet sums (``device_energy_j``). A message
whose ``device_id`` is not the device in its topic is never attributed to anyone (the broker's ACL
fixes who may write each topic, so the topic is the trusted name). Malformed, spoofed, late or
oversized messages are counted under ``extra["metrics_rejected"]``; none of them can fail a round.
Round 0 is a device's retained bench result (``edgetrain device --bench-result``), kept for
``summary.json``.
"""
from __future__ import annotations

import logging
import math
from collections import Counter
from collections.abc import Mapping
from typing import Any

from edgetrain.sdk import wire
from edgetrain.sdk.errors import WireError

_log = logging.getLogger(__name__)
BENCH_ROUND_ID = 0  # the same constant as sdk.device_metrics; rounds count from 1
MAX_VALUES = 64  # a device's metrics are a few dozen figures; more is a bug or an attack
MAX_KEY_CHARS = 64
STATUS_KEYS = ("power_source", "energy_method", "energy_unavailable")  # strings devices say in their status
MAX_PARTITION_EXAMPLES = 10**9  # a status claiming more examples than this is not believed


def _example_count(value: Any) -> int | None:
    """A status's ``num_examples`` if it is a plausible positive int (it arrives off the wire), else None."""
    if isinstance(value, bool) or not isinstance(value, int) or not 0 < value <= MAX_PARTITION_EXAMPLES:
        return None
    return value


def _finite(values: Mapping[str, float]) -> dict[str, float | None]:
    # metrics.jsonl is strict JSON: a NaN figure is written as null rather than failing the round
    return {k: (float(v) if math.isfinite(v) else None) for k, v in values.items()}


class DeviceMetricsCollector:
    """Per-device values for the open round; rejection counts since the last ``take``."""

    def __init__(self) -> None:
        self._values: dict[int, dict[str, dict[str, float | None]]] = {}
        self._status: dict[str, dict[str, str]] = {}
        self._partition: dict[str, str] = {}  # device -> the digest of the training examples it holds
        self._partition_size: dict[str, int] = {}  # device -> the example count its status reported
        self._platform: dict[str, dict[str, str]] = {}  # device -> what it runs on (summary.json "devices")
        self.bench: dict[str, dict[str, float | None]] = {}
        self.rejected: Counter[str] = Counter()
        self.bytes_received = 0

    def note_status(self, device: str, info: Mapping[str, Any]) -> None:
        """Remember what a device says about its energy measurement (once, in its retained status)."""
        said = {k: str(info[k]) for k in STATUS_KEYS if isinstance(info.get(k), str)}
        if said:
            unavailable = said.get("energy_unavailable")
            if unavailable and self._status.get(device, {}).get("energy_unavailable") != unavailable:
                # once per device (every status repeats it: the retained status is the device's whole state)
                _log.info("%s: energy not measured: %s", device, unavailable)
            self._status[device] = said
        size = _example_count(info.get("num_examples"))
        if size is not None:
            self._partition_size[device] = size
        digest = info.get("partition_digest")
        if isinstance(digest, str) and digest and self._partition.get(device) != digest:
            self._partition[device] = digest
            twins = sorted(d for d, other in self._partition.items() if other == digest and d != device)
            if twins and size is not None:
                # Two devices on the same examples (a repeated --index, say) are not two devices' data:
                # the run still works, but it is not the experiment the fleet was meant to be.
                _log.warning("devices %s and %s train on the same examples (partition digest %s): check their "
                             "--index/--count/--seed", device, ", ".join(twins), digest)

    def note_platform(self, device: str, status: wire.Status) -> None:
        """Remember what ``device`` runs on; a status without it (the last will, an older device) keeps
        what an earlier one said."""
        said = {"machine": status.machine, "python": status.python_version, "runtime": status.runtime,
                "edgetrain": status.edgetrain_version}
        if any(said.values()):
            self._platform[device] = said

    def partition_size(self, device: str) -> int | None:
        """The example count ``device`` last reported in its status (a plausible positive int), or None."""
        return self._partition_size.get(device)

    def shared_partitions(self) -> dict[str, list[str]]:
        """Digest -> devices, for every partition that more than one device reports holding."""
        groups: dict[str, list[str]] = {}
        for device, digest in sorted(self._partition.items()):
            groups.setdefault(digest, []).append(device)
        return {digest: devices for digest, devices in groups.items() if len(devices) > 1}

    def _reject(self, reason: str, detail: str) -> None:
        _log.warning("device metrics rejected (%s): %s", reason, detail)
        self.rejected[reason] += 1

    def receive(self, device: str, payload: bytes, open_round: int) -> None:
        """One message from ``device``'s metrics topic while ``open_round`` is open (or about to)."""
        if not payload:
            return  # a cleared retained bench result
        self.bytes_received += len(payload)
        try:
            message = wire.decode(payload)
        except WireError as exc:
            self._reject("malformed", f"frame from {device}: {exc}")
            return
        if not isinstance(message, wire.DeviceMetrics):
            self._reject("malformed", f"{type(message).__name__} on {device}'s metrics topic")
            return
        if message.device_id != device:
            self._reject("spoofed", f"metrics on {device}'s topic name {message.device_id!r}")
            return
        if len(message.values) > MAX_VALUES or any(len(k) > MAX_KEY_CHARS for k in message.values):
            self._reject("oversized", f"{device}: {len(message.values)} values (at most {MAX_VALUES}, "
                                      f"keys up to {MAX_KEY_CHARS} characters)")
            return
        if message.round_id == BENCH_ROUND_ID:
            self.bench[device] = _finite(message.values)
            return
        if message.round_id != open_round:
            self._reject("late" if message.round_id < open_round else "wrong_round",
                         f"{device}: metrics for round {message.round_id} while round {open_round} is open")
            return
        # a QoS 1 redelivery replaces the same figures: idempotent
        self._values.setdefault(message.round_id, {})[device] = _finite(message.values)

    def take(self, round_id: int, selected: frozenset[str] | set[str]) -> dict[str, Any]:
        """The round's ``extra`` entries; forgets this round and counts from zero again."""
        received = self._values.pop(round_id, {})
        for stale in [r for r in self._values if r < round_id]:
            del self._values[stale]
        devices: dict[str, dict[str, Any]] = {}
        for device, values in sorted(received.items()):
            if device not in selected:  # not asked to work this round: its figures describe nothing here
                self._reject("not_selected", f"{device}: metrics for round {round_id}, which did not select it")
                continue
            entry: dict[str, Any] = dict(values)
            if values.get("energy_j") is not None and "energy_method" in self._status.get(device, {}):
                entry["energy_method"] = self._status[device]["energy_method"]
            devices[device] = entry
        extra: dict[str, Any] = {"devices": devices, "metrics_bytes": self.bytes_received,
                                 "metrics_rejected": dict(self.rejected)}
        energies = [v["energy_j"] for v in devices.values() if v.get("energy_j") is not None]
        if energies:
            extra["device_energy_j"] = float(sum(energies))
        self.rejected = Counter()
        self.bytes_received = 0
        return extra

    def summary(self) -> dict[str, Any]:
        """For ``summary.json``: each device's bench result and, under ``devices``, what it runs on and
        its energy measurement in one line."""
        devices: dict[str, dict[str, str]] = {}
        for device in sorted(set(self._platform) | set(self._status)):
            entry = dict(self._platform.get(device, {}))
            energy = self._energy_line(device)
            if energy:
                entry["energy"] = energy
            devices[device] = entry
        return {"device_bench": dict(self.bench), "shared_partitions": self.shared_partitions(), "devices": devices}

    def _energy_line(self, device: str) -> str:
        """"rapl (counter)", "not measured: why", or "" where the device said nothing about energy."""
        said = self._status.get(device, {})
        if said.get("energy_unavailable"):
            return f"not measured: {said['energy_unavailable']}"
        source = said.get("power_source", "")
        return f"{source} ({said['energy_method']})" if source and said.get("energy_method") else source
