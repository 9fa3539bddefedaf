"""A device's codec state on disk (``sdk.device_state``): it survives a restart, it is dropped when
the codec spec changes, and it starts afresh when the device had to resync its model.

The device under test is the real ``sdk.device.Device`` loop on a thread, fed announcements built by
the aggregator's real ``Downlink`` through the in-memory transport (``MemoryBroker``, whose delivery is
synchronous: what is tested here is the device's state, and this keeps every step deterministic). The raw gradients
are recomputed with the device's own batch stream (``gradient_batches``), so DGC's error feedback
(Lin et al., ICLR 2018) can be checked for conservation: with momentum 0, every gradient a device
computed is either on the wire already or still in its residual ``v``.
"""
from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from edgetrain.aggregator.downlink import Downlink
from edgetrain.sdk import topics, wire
from edgetrain.sdk.codecs import format_codec_spec, get_codec, parse_codec_spec
from edgetrain.sdk.data import PartitionSpec
from edgetrain.sdk.device import Device, DeviceConfig, LocalData, gradient_batches
from edgetrain.sdk.device_state import DeviceState
from edgetrain.sdk.round_settings import RoundSettings
from edgetrain.sdk.runtime import load_runtime
from edgetrain.sdk.transport import MemoryBroker, MemoryTransport
from tests.fleet import DeviceThread, FleetAssets, fleet_assets, wait_for  # noqa: F401

FLEET = "state"
DEVICE = "dev-0"
BATCH = 16
LIMIT = 64
# momentum 0: the residual v then holds exactly what was computed and not yet sent.
SPEC = format_codec_spec(*parse_codec_spec("dgc:momentum=0,sparsity=0.99"))
OTHER_SPEC = format_codec_spec(*parse_codec_spec("dgc:momentum=0,sparsity=0.98"))


# -- DeviceState on its own ---------------------------------------------------------------------
def test_codec_state_round_trips_through_a_new_instance(tmp_path: Path) -> None:
    state = {"u": np.arange(5, dtype=np.float32), "v": -np.arange(5, dtype=np.float32),
             "step": np.array([7], dtype=np.int64)}
    DeviceState(tmp_path).save_codec_state(SPEC, state)
    loaded = DeviceState(tmp_path).codec_state(SPEC)  # a new instance: what a restarted device reads
    assert loaded is not None and sorted(loaded) == sorted(state)
    for key, array in state.items():
        assert loaded[key].dtype == array.dtype and np.array_equal(loaded[key], array)
    assert DeviceState(tmp_path).codec_state(OTHER_SPEC) is None  # tagged with its spec
    fresh = DeviceState(tmp_path)
    fresh.reset_codec_state()
    assert fresh.codec_state(SPEC) is None and DeviceState(tmp_path).codec_state(SPEC) is None


def test_a_torn_codec_state_file_starts_afresh(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    DeviceState(tmp_path).save_codec_state(SPEC, {"v": np.ones(3, np.float32)})
    path = tmp_path / "codec_state.safetensors"
    path.write_bytes(path.read_bytes()[:-5])
    assert DeviceState(tmp_path).codec_state(SPEC) is None
    assert "codec state starts afresh" in caplog.text


def test_stateless_codecs_write_nothing(tmp_path: Path) -> None:
    state = DeviceState(tmp_path)
    state.save_codec_state("dense", None)
    state.save_codec_state("dense", {})
    assert not (tmp_path / "codec_state.safetensors").exists()


def test_a_stateless_codec_in_between_still_discards_the_old_state(tmp_path: Path) -> None:
    """dgc, then q8 for a while, then dgc again: the residual from before q8 is stale, not resumed."""
    state = DeviceState(tmp_path)
    state.save_codec_state(SPEC, {"v": np.ones(3, np.float32)})
    assert state.codec_state("q8") is None  # what the device hands the stateless codec...
    state.save_codec_state("q8", None)  # ...and saves after it
    assert state.codec_state(SPEC) is None and DeviceState(tmp_path).codec_state(SPEC) is None


# -- the device loop ----------------------------------------------------------------------------
class Wire:
    """The in-memory broker a device talks to here: the test publishes as the aggregator; ``messages`` decodes
    what the device published."""

    def __init__(self) -> None:
        self.broker = MemoryBroker()
        self.aggregator = MemoryTransport(self.broker, "aggregator")
        self.aggregator.connect()

    def deliver(self, topic: str, payload: bytes) -> None:
        self.aggregator.publish(topic, payload)  # synchronous: the device's handler has queued it on return

    def messages(self, kind: type) -> list:
        frames = [m.payload for m in list(self.broker.messages) if m.sender == DEVICE]
        return [m for m in map(wire.decode, frames) if isinstance(m, kind)]


class DeviceHarness:
    """One device on a thread, its stand-in transport, and a replay of the batches it draws."""

    def __init__(self, assets: FleetAssets, state_dir: Path) -> None:
        self.config = DeviceConfig(fleet=FLEET, device_id=DEVICE, state_dir=state_dir,
                                   partition=PartitionSpec.parse("iid"))
        self.runtime = load_runtime(assets.bundle)
        self.data = LocalData.load(self.config, self.runtime, assets.data_dir, limit=LIMIT)
        self.num_params = assets.num_params
        self.transport = Wire()
        device_transport = MemoryTransport(self.transport.broker, DEVICE)
        self.device = Device(self.config, device_transport, load_runtime(assets.bundle), self.data)
        self.thread = DeviceThread(self.device).start()
        wait_for(lambda: device_transport.is_connected, "the device to connect")
        # A new device process starts its batch stream afresh; so does this replay.
        self._batches = gradient_batches(self.data, BATCH, (self.config.seed, self.config.partition_index))
        self.raw: list[np.ndarray] = []  # the gradients the device computed, recomputed here
        self.sent: list[np.ndarray] = []  # what reached the wire, decoded

    def announce(self, downlink: Downlink, params: np.ndarray, version: int, spec: str,
                 deliver: bool = True) -> np.ndarray:
        """Announce ``params`` as ``version`` (a gradient task) and wait for the device's answer."""
        down, params = downlink.announce(params, version)
        if not deliver:  # the device never hears of this version (a lost message)
            return params
        announcement = wire.Announcement(
            run_id="run-1", round_id=version + 1, model_version=version, strategy="large-batch", task="gradient",
            selected=(DEVICE,), deadline_unix_s=4e9, settings=RoundSettings(batch_size=BATCH), uplink_codec=spec,
            payload_kind=down.payload_kind, downlink_codec=down.codec, base_version=down.base_version,
            payload=down.payload)
        answered = len(self.updates())
        # The device's loop is idle between announcements, so its replica can be read here.
        stale = down.payload_kind == "delta" and self.device.replica.version != down.base_version
        self.transport.deliver(topics.announce_topic(FLEET), wire.encode(announcement))
        if stale:
            wait_for(lambda: any(s.info.get("needs_resync") for s in self.transport.messages(wire.Status)),
                     "the device to ask for a resync")
            return params
        # The update for *this* version: a restarted device also re-sends its outbox's unacked updates
        # (nothing acks here), which may land before or after this one.
        def answers() -> list[wire.Update]:
            return [u for u in self.updates()[answered:] if u.model_version == version]
        wait_for(lambda: bool(answers()), f"the device's update for version {version}")
        x, y = next(self._batches)
        self.runtime.set_parameters(downlink.shadow)
        self.raw.append(self.runtime.gradient(x, y).gradient.astype(np.float64))
        (update,) = answers()
        name, codec_params = parse_codec_spec(update.codec)
        self.sent.append(get_codec(name).decode(update.payload, self.num_params, codec_params).astype(np.float64))
        return params

    def updates(self) -> list[wire.Update]:
        return self.transport.messages(wire.Update)

    def stop(self) -> None:
        self.thread.stop()


@pytest.fixture
def harnesses() -> Iterator[list[DeviceHarness]]:
    started: list[DeviceHarness] = []
    yield started
    for harness in started:
        if harness.thread.thread.is_alive():
            harness.stop()


def _residual(state_dir: Path, spec: str) -> tuple[np.ndarray, int]:
    state = DeviceState(state_dir).codec_state(spec)
    assert state is not None, f"no codec state for {spec} in {state_dir}"
    return state["v"].astype(np.float64), int(state["step"][0])


def _assert_conserved(raw: list[np.ndarray], sent: list[np.ndarray], residual: np.ndarray) -> None:
    np.testing.assert_allclose(sum(raw), sum(sent) + residual, rtol=0, atol=1e-6)


def _start_params(assets: FleetAssets) -> np.ndarray:
    return assets.initial_params.astype(np.float32, copy=True)


def _step(params: np.ndarray, gradient: np.ndarray) -> np.ndarray:
    return (params - np.float32(0.1) * gradient.astype(np.float32)).astype(np.float32)


def test_dgc_residual_survives_a_restart_and_a_new_spec_starts_afresh(
        fleet_assets: FleetAssets, tmp_path: Path, harnesses: list[DeviceHarness]) -> None:  # noqa: F811
    downlink = Downlink(resync_every=1)  # whole models, as FedAvg announces by default
    params = _start_params(fleet_assets)
    first = DeviceHarness(fleet_assets, tmp_path / DEVICE)
    harnesses.append(first)
    for version in (0, 1):
        params = _step(first.announce(downlink, params, version, SPEC), first.sent[-1])
    first.stop()
    residual, steps = _residual(tmp_path / DEVICE, SPEC)
    assert steps == 2
    _assert_conserved(first.raw, first.sent, residual)
    assert np.linalg.norm(residual) > 1e-3  # a residual worth keeping: losing it breaks the sum below

    second = DeviceHarness(fleet_assets, tmp_path / DEVICE)  # the device restarts on the same state dir
    harnesses.append(second)
    params = second.announce(downlink, params, 2, SPEC)
    residual, steps = _residual(tmp_path / DEVICE, SPEC)
    assert steps == 3  # the same residual arrays went on
    _assert_conserved(first.raw + second.raw, first.sent + second.sent, residual)

    # The aggregator now asks for another codec spec: the old state does not fit it and is dropped.
    second.announce(downlink, params, 3, OTHER_SPEC)
    residual, steps = _residual(tmp_path / DEVICE, OTHER_SPEC)
    assert steps == 1
    _assert_conserved(second.raw[-1:], second.sent[-1:], residual)
    assert DeviceState(tmp_path / DEVICE).codec_state(SPEC) is None


def test_a_resync_resets_the_codec_state(fleet_assets: FleetAssets, tmp_path: Path,  # noqa: F811
                                         harnesses: list[DeviceHarness]) -> None:
    downlink = Downlink(resync_every=100)  # deltas between whole models, as in large batch
    params = _start_params(fleet_assets)
    device = DeviceHarness(fleet_assets, tmp_path / DEVICE)
    harnesses.append(device)
    params = _step(device.announce(downlink, params, 0, SPEC), np.ones_like(params))
    params = _step(device.announce(downlink, params, 1, SPEC), np.ones_like(params))
    assert device.device.replica.version == 1
    before, steps = _residual(tmp_path / DEVICE, SPEC)
    assert steps == 2 and np.linalg.norm(before) > 1e-3

    params = _step(device.announce(downlink, params, 2, SPEC, deliver=False), np.ones_like(params))  # lost
    params = _step(device.announce(downlink, params, 3, SPEC), np.ones_like(params))  # a delta from 2
    assert device.device.replica.version == 1 and len(device.updates()) == 2  # no update from a stale model
    statuses = device.transport.messages(wire.Status)
    assert statuses[-1].info["needs_resync"] and statuses[-1].info["model_version"] == 1
    # Asking is not yet resyncing: the state stays until a whole model arrives.
    assert np.array_equal(_residual(tmp_path / DEVICE, SPEC)[0], before)

    downlink.request_resync()  # what the aggregator does on that status
    device.announce(downlink, params, 4, SPEC)
    assert device.device.replica.version == 4 and np.array_equal(device.device.replica.params, downlink.shadow)
    residual, steps = _residual(tmp_path / DEVICE, SPEC)
    assert steps == 1  # started afresh on the new model...
    _assert_conserved(device.raw[-1:], device.sent[-1:], residual)  # ...holding only this gradient's rest
