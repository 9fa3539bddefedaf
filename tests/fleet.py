"""Shared harness for the end-to-end fleet tests: a tiny data set, a tiny bundle, devices and an
aggregator talking through a real private Mosquitto.

Devices run either as real ``edgetrain device`` subprocesses (when a test must signal or SIGKILL
one) or as ``Device`` objects on threads of the test process (cheap: torch is imported once); the
aggregator runs on a thread (built like ``edgetrain aggregate`` does) or as a subprocess when it
must be SIGKILLed. Every wait is event-driven with a timeout; nothing sleeps a fixed time.
"""
from __future__ import annotations

import argparse
import os
import queue
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Mapping, Sequence

import numpy as np
import pytest

from edgetrain.sdk import topics, wire
from edgetrain.sdk.transport import BrokerConfig, MqttTransport

REPO_ROOT = Path(__file__).resolve().parents[1]
WAIT_S = 20.0  # upper bound for any event-driven wait; passing runs take a fraction of it
NUM_TRAIN, NUM_TEST = 600, 200
HIDDEN = 32  # MLP 784-32-10: 25,450 parameters, ~100 KB per update


@dataclass(frozen=True)
class FleetAssets:
    data_dir: Path
    bundle: Path
    initial_params: np.ndarray  # the bundle's flat float32 start point
    num_params: int


def write_tiny_dataset(directory: Path, seed: int = 0) -> Path:
    """600 train / 200 test 28x28 uint8 images in Fashion-MNIST's IDX layout; each class is a fixed
    random prototype plus noise, so a small MLP learns it in a round or two."""
    from edgetrain.sdk.data import write_idx

    directory.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    prototypes = rng.uniform(0, 255, size=(10, 28, 28))
    for prefix, count in (("train", NUM_TRAIN), ("t10k", NUM_TEST)):
        labels = np.arange(count) % 10
        rng.shuffle(labels)
        noise = rng.normal(0, 60, size=(count, 28, 28))
        images = np.clip(0.6 * prototypes[labels] + noise + 40, 0, 255).astype(np.uint8)
        write_idx(directory / f"{prefix}-images-idx3-ubyte", images, gzip=False)
        write_idx(directory / f"{prefix}-labels-idx1-ubyte", labels.astype(np.uint8), gzip=False)
    return directory


@pytest.fixture(scope="session")
def fleet_assets(tmp_path_factory: pytest.TempPathFactory) -> FleetAssets:
    """The tiny data set and an ``mlp`` torch bundle, made once per test session."""
    from edgetrain.export.bundle_writer import export_bundle
    from edgetrain.sdk.bundle import load_manifest, read_initial_parameters

    root = tmp_path_factory.mktemp("fleet-assets")
    data_dir = write_tiny_dataset(root / "data")
    bundle = root / "bundle"
    export_bundle("mlp", {"hidden": [HIDDEN]}, out_dir=bundle, runtime="torch", seed=0, optimizer={"name": "sgd"})
    manifest = load_manifest(bundle)
    return FleetAssets(data_dir, bundle, read_initial_parameters(bundle, manifest), manifest.num_params)


def wait_for(predicate: Callable[[], bool], what: str, timeout_s: float = WAIT_S, poll_s: float = 0.02) -> None:
    """Poll ``predicate`` until true; fail the test naming ``what`` after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout_s} s waiting for {what}")
        time.sleep(poll_s)


# -- a raw client on the broker -------------------------------------------------------------
class Sniffer:
    """A plain Transport that records every message on the filters it subscribes to."""

    def __init__(self, broker: BrokerConfig, client_id: str = "sniffer") -> None:
        self.transport = MqttTransport(broker, client_id, clean_start=True, reconnect_min_s=0.1, reconnect_max_s=1.0)
        self.messages: queue.Queue[tuple[str, bytes]] = queue.Queue()
        self.seen: list[tuple[str, bytes]] = []
        self._lock = threading.Lock()

    def subscribe(self, *filters: str) -> "Sniffer":
        for topic_filter in filters:
            self.transport.subscribe(topic_filter, self._record)
        return self

    def connect(self) -> "Sniffer":
        self.transport.connect()
        return self

    def _record(self, topic: str, payload: bytes) -> None:  # network thread
        with self._lock:
            self.seen.append((topic, payload))
        self.messages.put((topic, payload))

    def snapshot(self) -> list[tuple[str, bytes]]:
        with self._lock:
            return list(self.seen)

    def decoded(self, kind: type, topic_prefix: str = "") -> list[tuple[str, object]]:
        """Every whole frame of message class ``kind`` seen so far, with its topic."""
        out = []
        for topic, payload in self.snapshot():
            if payload and topic.startswith(topic_prefix):
                try:
                    message = wire.decode(payload)
                except Exception:  # garbage a test sent on purpose
                    continue
                if isinstance(message, kind):
                    out.append((topic, message))
        return out

    def wait_for_message(self, kind: type, match: Callable[[str, object], bool] = lambda t, m: True,
                         what: str = "", timeout_s: float = WAIT_S) -> tuple[str, object]:
        """The first recorded message of ``kind`` that ``match`` accepts (already seen or arriving)."""
        found: list[tuple[str, object]] = []

        def check() -> bool:
            found[:] = [(t, m) for t, m in self.decoded(kind) if match(t, m)]
            return bool(found)

        wait_for(check, what or f"a {kind.__name__}", timeout_s)
        return found[0]

    def latest_status(self, fleet: str, device: str) -> wire.Status | None:
        statuses = [m for t, m in self.decoded(wire.Status) if t == topics.status_topic(fleet, device)]
        return statuses[-1] if statuses else None  # type: ignore[return-value]

    def wait_online(self, fleet: str, devices: Sequence[str], online: bool = True) -> None:
        def ok() -> bool:
            return all((s := self.latest_status(fleet, d)) is not None and s.online == online for d in devices)

        wait_for(ok, f"devices {list(devices)} to be {'online' if online else 'offline'}")

    def close(self) -> None:
        self.transport.close()


def publish_update(transport: Transport, fleet: str, topic_device: str, update: wire.Update) -> None:
    """Publish ``update`` on ``topic_device``'s update topic, bypassing the wire encoder's checks
    (so a test can send a codec the encoder would refuse)."""
    frame = wire.build_frame(wire.MessageType.UPDATE, wire.messages.header_fields(update), update.payload)
    transport.publish(topics.update_topic(fleet, topic_device), frame)


# -- devices ---------------------------------------------------------------------------------
class Gate:
    """Holds devices at the start of training (in chosen rounds) until the test opens it, so a test
    can act while a round is provably open: ``wait_arrived(n)`` returns once n devices wait."""

    def __init__(self, rounds: frozenset[int] | None = None) -> None:
        self.rounds = rounds  # None: every round
        self.opened = threading.Event()
        self._arrived: list[tuple[str, int]] = []
        self._lock = threading.Lock()

    def __call__(self, device_id: str, announcement: wire.Announcement) -> None:  # device loop thread
        if self.rounds is not None and announcement.round_id not in self.rounds:
            return
        with self._lock:
            self._arrived.append((device_id, announcement.round_id))
        if not self.opened.wait(WAIT_S):
            raise TimeoutError(f"{device_id}: the test never opened the gate")

    def arrived(self) -> list[tuple[str, int]]:
        with self._lock:
            return list(self._arrived)

    def wait_arrived(self, count: int) -> None:
        wait_for(lambda: len(self.arrived()) >= count, f"{count} device(s) at the gate (have {self.arrived()})")

    def open(self) -> None:
        self.opened.set()


def make_device(broker: BrokerConfig, assets: FleetAssets, fleet: str, device_id: str, state_dir: Path, *,
                index: int, count: int, limit: int | None = None,
                gate: Gate | None = None, aggregator_key: object = None,
                attack: object = None, slowdown: float = 1.0):  # -> sdk.device.Device
    """A ``Device`` with a real Transport and torch runtime; ``gate`` (if given) holds training;
    ``aggregator_key`` (an Ed25519 public key) makes it obey only announcements signed by its pair;
    ``attack`` (an ``sdk.attack.Attack``) makes it an adversary; ``slowdown`` F > 1 a straggler."""
    from edgetrain.sdk.data import PartitionSpec
    from edgetrain.sdk.device import Device, DeviceConfig, LocalData
    from edgetrain.sdk.runtime import load_runtime

    config = DeviceConfig(fleet=fleet, device_id=device_id, state_dir=state_dir, partition=PartitionSpec.parse("iid"),
                          partition_index=index, partition_count=count, attack=attack, slowdown=slowdown)
    runtime = load_runtime(assets.bundle)
    data = LocalData.load(config, runtime, assets.data_dir, limit=limit)
    offline = wire.encode(wire.Status(device_id=device_id, online=False, info={"reason": "connection lost"}))
    transport = MqttTransport(broker, client_id=device_id, will=(topics.status_topic(fleet, device_id), offline, True),
                          reconnect_min_s=0.2, reconnect_max_s=1.0)

    class _Gated(Device):
        def train_round(self, a: wire.Announcement) -> wire.Update:
            if gate is not None:
                gate(device_id, a)
            return super().train_round(a)

    return _Gated(config, transport, runtime, data, aggregator_key=aggregator_key)


class DeviceThread:
    """``Device.run`` on a thread of the test process; ``stop()`` ends it cleanly."""

    def __init__(self, device) -> None:  # device: sdk.device.Device
        self.device = device
        self.stop_event = threading.Event()
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._main, name=f"device-{device.config.device_id}", daemon=True)

    def _main(self) -> None:
        try:
            self.device.run(self.stop_event)
        except BaseException as exc:  # surfaced by stop()
            self.error = exc

    def start(self) -> "DeviceThread":
        self.thread.start()
        return self

    def stop(self) -> None:
        self.stop_event.set()
        self.thread.join(WAIT_S)
        assert not self.thread.is_alive(), f"device {self.device.config.device_id} did not stop"
        if self.error is not None:
            raise self.error


def start_device_threads(broker: BrokerConfig, assets: FleetAssets, fleet: str, root: Path,
                         limits: Sequence[int | None], gate: Gate | None = None,
                         prefix: str = "dev", aggregator_key: object = None,
                         attacks: Mapping[int, object] | None = None,
                         slowdowns: Mapping[int, float] | None = None) -> list[DeviceThread]:
    """One device thread per entry of ``limits`` (its example cap), named ``<prefix>-<i>``; ``attacks``:
    device index -> ``sdk.attack.Attack`` for the adversaries among them; ``slowdowns``: device index ->
    slowdown factor for the stragglers."""
    return [DeviceThread(make_device(broker, assets, fleet, f"{prefix}-{i}", root / f"{prefix}-{i}", index=i,
                                     count=len(limits), limit=limit, gate=gate, aggregator_key=aggregator_key,
                                     attack=(attacks or {}).get(i),
                                     slowdown=(slowdowns or {}).get(i, 1.0))).start()
            for i, limit in enumerate(limits)]


def _subprocess_env() -> dict[str, str]:
    return dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1",
                PYTHONPATH=os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")])))


@dataclass
class ProcessHandle:
    """A subprocess with its combined log file."""

    process: subprocess.Popen
    log_path: Path
    argv: list[str] = field(default_factory=list)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def signal(self, sig: int) -> None:
        if self.process.poll() is None:
            self.process.send_signal(sig)

    def wait(self, timeout_s: float = WAIT_S) -> int:
        try:
            return self.process.wait(timeout_s)
        except subprocess.TimeoutExpired:
            pytest.fail(f"{self.argv[3:5]} still running after {timeout_s} s; log:\n{self.log()[-3000:]}")

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait()


def spawn_cli(args: Sequence[str], log_path: Path) -> ProcessHandle:
    """``python -m edgetrain ARGS`` with one intra-op thread, stdout+stderr to ``log_path``."""
    argv = [sys.executable, "-m", "edgetrain", *map(str, args)]
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "ab") as log:
        process = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, env=_subprocess_env(), cwd=REPO_ROOT)
    return ProcessHandle(process, log_path, argv)


def spawn_device(broker_url: str, assets: FleetAssets, fleet: str, device_id: str, root: Path, *, index: int,
                 count: int, limit: int | None = None, extra: Sequence[str] = ()) -> ProcessHandle:
    args = ["device", "--broker", broker_url, "--fleet", fleet, "--device-id", device_id, "--bundle", assets.bundle,
            "--data-dir", assets.data_dir, "--index", index, "--count", count, "--state-dir", root / device_id,
            "--threads", 1, *extra]
    if limit is not None:
        args += ["--limit-examples", limit]
    return spawn_cli(args, root / f"{device_id}.log")


# -- the aggregator --------------------------------------------------------------------------
def round_args(*flags: str) -> argparse.Namespace:
    """The flags of ``edgetrain aggregate`` (rounds group) parsed as its CLI would."""
    from edgetrain.aggregator.cli import add_round_args

    parser = argparse.ArgumentParser()
    add_round_args(parser)
    return parser.parse_args(list(flags))


class AggregatorThread:
    """``Aggregator.run`` on a thread, built by ``aggregator.cli.build_aggregator``."""

    def __init__(self, broker: BrokerConfig, assets: FleetAssets, fleet: str, out_dir: Path, *flags: str,
                 resume: bool = False, settings: dict | None = None) -> None:
        """``settings``: AggregatorConfig fields that have no CLI flag (e.g. ``chunk_timeout_s``)."""
        import dataclasses

        from edgetrain.aggregator.cli import build_aggregator
        from edgetrain.aggregator.service import Aggregator

        args = round_args("--data-dir", str(assets.data_dir), *flags)
        built = build_aggregator(args, broker, out_dir, assets.bundle, fleet, resume)
        if settings:  # the same pieces, another config: nothing has connected yet
            built = Aggregator(dataclasses.replace(built.config, **settings), built.strategy, built.transport,
                               built.runtime, built.params, (built.test_x, built.test_y))
        self.aggregator = built
        self.out_dir = out_dir
        self.stop_event = threading.Event()
        self.records: list | None = None
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._main, name="aggregator", daemon=True)

    def _main(self) -> None:
        try:
            self.records = self.aggregator.run(self.stop_event)
        except BaseException as exc:
            self.error = exc

    def start(self) -> "AggregatorThread":
        self.thread.start()
        return self

    def join(self, timeout_s: float = WAIT_S) -> list:
        """The run's records; re-raises what the run raised; fails the test on a timeout."""
        self.thread.join(timeout_s)
        if self.thread.is_alive():
            self.stop_event.set()
            self.thread.join(5)
            pytest.fail(f"aggregator still running after {timeout_s} s")
        if self.error is not None:
            raise self.error
        assert self.records is not None
        return self.records

    def stop(self) -> None:
        self.stop_event.set()
        self.thread.join(WAIT_S)


def metrics(out_dir: Path) -> list:
    """The run's training rounds in ``metrics.jsonl`` as RoundRecords (as ``Aggregator.run`` returns them:
    without round 0, the initial model's evaluation; tests/test_round_zero.py checks that line)."""
    from edgetrain.aggregator.results import MetricsLog, training_rounds

    return training_rounds(MetricsLog(out_dir).read())


def broker_config(url: str, **kwargs: object) -> BrokerConfig:
    return BrokerConfig.parse(url, **kwargs)


@pytest.fixture
def cleanup() -> Iterator[list[Callable[[], None]]]:
    """Callbacks run after the test, last first (stop devices, kill processes) even when it fails."""
    callbacks: list[Callable[[], None]] = []
    yield callbacks
    for callback in reversed(callbacks):
        try:
            callback()
        except BaseException:  # noqa: BLE001 (cleanup must go on)
            pass
