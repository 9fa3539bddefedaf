"""A device host: many device identities in one process (ARCHITECTURE: "Scale").

Each identity is a whole ``Device`` — its own MQTT connection (client id, last will, persistent session),
partition, outbox, codec state and progress on disk — so on the wire it is indistinguishable from a board
of its own. What the identities share is what makes a thousand fit on one machine: one runtime (each round
swaps the identity's parameters in with ``set_parameters`` and out with ``get_parameters``), one copy of
the training split (each identity's partition is cut from it once), and one ``SelectorLoop`` thread that
drives every socket (``sdk.transport.selector``). Training is serialised: every identity's messages land on
one queue, and one worker thread (the caller of ``run``) handles them in arrival order, so the rounds of
the selected identities run one after another on the single runtime.

Every identity receives its own copy of each announcement; ``sdk.host_share`` keeps one copy per host
(the loop thread swaps an identity's copy for the kept one before queueing), decodes and verifies it once,
and keeps one model vector per version for all replicas. An announcement still queued for an identity when
a newer one arrives for it only brings the model along: answering a round already replaced is wasted work.
"""
from __future__ import annotations

import logging
import queue
import re
import itertools
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from . import topics, wire
from .data import PartitionSpec, load_split, partition
from .device import Device, DeviceConfig, LocalData
from .errors import ConfigError
from .host_share import HostShare
from .runtime import Runtime
from .transport.selector import SelectorLoop, SelectorTransport
from .broker_config import BrokerConfig

_log = logging.getLogger(__name__)
_RANGE = re.compile(r"^(?P<prefix>[A-Za-z0-9_.-]*?)(?P<first>\d+)\.\.(?P=prefix)(?P<last>\d+)$")
MAX_IDENTITIES = 20_000  # per process; a typo such as dev-0..dev-9999999 fails here, not after minutes


@dataclass(frozen=True)
class Identity:
    """One device identity of a host: its id and its partition index."""

    device_id: str
    partition_index: int


def parse_id_range(text: str) -> list[Identity]:
    """``dev-000..dev-499`` -> dev-000 … dev-499 (partition indices 0 … 499): the number's digits give the
    zero padding; ``dev-7`` alone is one identity."""
    match = _RANGE.match(text)
    single = None if ".." in text else re.fullmatch(r"[A-Za-z0-9_.-]*?(?P<n>\d+)", text)
    if single:
        topics.validate_name(text, "device id")
        return [Identity(text, int(single["n"]))]
    if match is None:
        raise ConfigError(f"--ids {text!r}: expected PREFIX<first>..PREFIX<last>, e.g. dev-000..dev-499")
    first, last = int(match["first"]), int(match["last"])
    if last < first:
        raise ConfigError(f"--ids {text!r}: the last id comes before the first")
    if last - first + 1 > MAX_IDENTITIES:
        raise ConfigError(f"--ids {text!r}: {last - first + 1} identities; one process hosts at most {MAX_IDENTITIES}")
    width = len(match["first"])
    ids = [Identity(f"{match['prefix']}{n:0{width}d}", n) for n in range(first, last + 1)]
    for identity in ids:
        topics.validate_name(identity.device_id, "device id")
    return ids


@dataclass(frozen=True)
class HostConfig:
    """What every identity of a host shares; ``state_root/<device id>`` is each one's state directory."""

    fleet: str
    state_root: Path
    partition: PartitionSpec
    partition_count: int
    seed: int = 0
    limit_examples: int | None = None
    max_chunk_bytes: int | None = None

    def __post_init__(self) -> None:
        topics.validate_name(self.fleet, "fleet")
        if self.partition_count < 1:
            raise ConfigError(f"partition count must be >= 1, got {self.partition_count}")


def build_devices(host: HostConfig, identities: Sequence[Identity], broker: BrokerConfig, loop: SelectorLoop,
                  runtime: Runtime, data_dir: Path | None, aggregator_key: object = None) -> list[Device]:
    """One ``Device`` per identity, on one runtime and one loaded training split."""
    for identity in identities:
        if not 0 <= identity.partition_index < host.partition_count:
            raise ConfigError(f"device {identity.device_id}: partition index {identity.partition_index} is out of "
                              f"range for --count {host.partition_count}")
    train = load_split("train", data_dir)
    parts = partition(train.labels, host.partition, host.partition_count, host.seed)  # once, not per identity
    share = HostShare()
    devices = []
    for identity in identities:
        config = DeviceConfig(fleet=host.fleet, device_id=identity.device_id,
                              state_dir=host.state_root / identity.device_id, partition=host.partition,
                              partition_index=identity.partition_index, partition_count=host.partition_count,
                              seed=host.seed, max_chunk_bytes=host.max_chunk_bytes)
        idx = np.asarray(parts[identity.partition_index])[:host.limit_examples]
        data = LocalData.from_indices(train.images, train.labels, idx, runtime)
        offline = wire.encode(wire.Status(device_id=identity.device_id, online=False,
                                          info={"reason": "connection lost"}))
        transport = SelectorTransport(broker, identity.device_id, loop,
                                      will=(topics.status_topic(host.fleet, identity.device_id), offline, True))
        devices.append(Device(config, transport, runtime, data, energy_unavailable="device host: identities "
                              "share one processor, so no per-device energy", aggregator_key=aggregator_key,  # type: ignore[arg-type]
                              share=share))
    return devices


class DeviceHost:
    """Runs ``devices`` (sharing ``loop``) until ``stop`` is set; see the module docstring."""

    def __init__(self, devices: Sequence[Device], loop: SelectorLoop) -> None:
        if not devices:
            raise ConfigError("a device host needs at least one device identity")
        ids = [d.config.device_id for d in devices]
        if len(set(ids)) != len(ids):
            raise ConfigError("device ids of a host must be distinct: two connections with one client id "
                              "take each other's session over")
        self.devices = list(devices)
        self.loop = loop
        self._inbox: queue.Queue[tuple[Device, str, bytes, int]] = queue.Queue()
        self._arrivals = itertools.count(1)  # numbers announcements as they arrive (the loop's thread)
        self._latest_announcement: dict[str, int] = {}  # device id -> number of its newest announcement
        self.joined: list[Device] = []

    @property
    def rounds_trained(self) -> int:
        return sum(d.rounds_trained for d in self.devices)

    def run(self, stop: threading.Event) -> None:
        """Join every identity (one after another: each waits for its CONNACK, which paces the connects),
        then handle their messages one at a time on this thread; leave them all at the end."""
        self.loop.start()
        try:
            for device in self.devices:
                if stop.is_set():
                    break
                device.join(stop, deliver=self._deliverer(device))
                self.joined.append(device)
            _log.info("%d device identities joined", len(self.joined))
            while not stop.is_set():
                busy = [d for d in self.joined if d.has_continuous_work() and d.transport.failure is None]
                try:  # identities in a continuous (FedBuff) round train whenever no message is waiting
                    device, topic, payload, arrival = (self._inbox.get_nowait() if busy
                                                       else self._inbox.get(timeout=0.2))
                except queue.Empty:
                    if busy:  # one update each, in turn
                        min(busy, key=lambda d: d.rounds_trained).continue_work()
                    continue
                if device.transport.failure is None:  # an identity taken over elsewhere stays silent
                    superseded = 0 < arrival < self._latest_announcement.get(device.config.device_id, 0)
                    device.handle(topic, payload, superseded)
        finally:
            for device in self.joined:
                device.leave()
            self.loop.stop()

    def _deliverer(self, device: Device):  # noqa: ANN202 (a Handler)
        announce = topics.announce_topic(device.config.fleet)

        def deliver(topic: str, payload: bytes) -> None:  # the loop's thread: only queue
            arrival = 0  # not an announcement
            if topic == announce:
                if device.share is not None:
                    payload = device.share.frames.intern(payload)  # this identity's copy is freed now
                arrival = next(self._arrivals)
                self._latest_announcement[device.config.device_id] = arrival
            self._inbox.put((device, topic, payload, arrival))
        return deliver
