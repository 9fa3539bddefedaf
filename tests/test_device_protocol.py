"""The device's side of the round protocol: no announcement ends a device, a new run resets its
per-run state, and with the aggregator's key configured only signed announcements are obeyed.

The real ``sdk.device.Device`` loop runs on a thread with the in-memory transport (``MemoryBroker``, as
``test_device_state`` uses it) (no broker: these are the device's decisions, frame by frame); the broker
version of the run and signature checks is in ``test_fleet_runs.py``.
"""
from __future__ import annotations

import dataclasses
import json
import struct
import zlib
from pathlib import Path
from typing import Iterator

import numpy as np
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from edgetrain.sdk import topics, wire
from edgetrain.sdk.codecs import CodecSpec, get_codec
from edgetrain.sdk.data import PartitionSpec
from edgetrain.sdk.device import Device, DeviceConfig, LocalData
from edgetrain.sdk.round_settings import RoundSettings
from edgetrain.sdk.runtime import load_runtime
from tests.fleet import DeviceThread, FleetAssets, fleet_assets, wait_for  # noqa: F401
from edgetrain.sdk.transport import MemoryTransport
from tests.test_device_state import Wire

FLEET = "proto"
DEVICE = "dev-0"
ANNOUNCE = topics.announce_topic(FLEET)


def _announcement(assets: FleetAssets, run_id: str = "run-a", round_id: int = 1, version: int = 0,
                  params: np.ndarray | None = None, **changes: object) -> wire.Announcement:
    model = assets.initial_params if params is None else params
    fields: dict[str, object] = dict(
        run_id=run_id, round_id=round_id, model_version=version, strategy="fedavg", task="train", selected=(DEVICE,),
        deadline_unix_s=4e9, settings=RoundSettings(lr=0.05, batch_size=8, local_steps=1),
        uplink_codec=CodecSpec("dense"), payload_kind="params", downlink_codec=CodecSpec("dense"), base_version=None,
        payload=get_codec("dense").encode(model.astype(np.float32), None, {})[0])
    fields.update(changes)
    return wire.Announcement(**fields)  # type: ignore[arg-type]


def _frame_with_header_text(announcement: wire.Announcement, replace: tuple[str, str]) -> bytes:
    """The announcement's frame with one piece of its JSON header text replaced, as a hostile or
    broken aggregator could send it (checksum recomputed: it is well-formed on the wire)."""
    header = json.dumps(wire.messages.header_fields(announcement), separators=(",", ":"), sort_keys=True)
    assert replace[0] in header
    header_bytes = header.replace(*replace).encode("utf-8")
    payload = announcement.payload
    body = (wire.MAGIC + struct.pack("<BBIQ", wire.WIRE_VERSION, wire.MessageType.ANNOUNCEMENT, len(header_bytes),
                                     len(payload)) + header_bytes + payload)
    return body + struct.pack("<I", zlib.crc32(body))


class Harness:
    def __init__(self, assets: FleetAssets, state_dir: Path, key: Ed25519PrivateKey | None = None) -> None:
        config = DeviceConfig(fleet=FLEET, device_id=DEVICE, state_dir=state_dir, partition=PartitionSpec.parse("iid"))
        runtime = load_runtime(assets.bundle)
        self.transport = Wire()  # the test publishes as the aggregator; messages() decodes what the device sent
        device_transport = MemoryTransport(self.transport.broker, DEVICE)
        self.device = Device(config, device_transport, runtime, LocalData.load(config, runtime, assets.data_dir, limit=32),
                             aggregator_key=None if key is None else key.public_key())
        self.thread = DeviceThread(self.device).start()
        wait_for(lambda: device_transport.is_connected, "the device to connect")

    def deliver(self, frame: bytes) -> None:
        self.transport.deliver(ANNOUNCE, frame)

    def updates(self) -> list[wire.Update]:
        return self.transport.messages(wire.Update)

    def wait_skip(self, fragment: str) -> wire.Status:
        found: list[wire.Status] = []

        def seen() -> bool:
            found[:] = [s for s in self.transport.messages(wire.Status) if fragment in s.skip_reason]
            return bool(found)

        wait_for(seen, f"a status whose skip_reason mentions {fragment!r}")
        return found[-1]

    def wait_updates(self, count: int) -> list[wire.Update]:
        wait_for(lambda: len(self.updates()) >= count, f"{count} update(s)")
        return self.updates()


@pytest.fixture
def harness(fleet_assets: FleetAssets, tmp_path: Path) -> Iterator[Harness]:  # noqa: F811
    h = Harness(fleet_assets, tmp_path / "device")
    yield h
    h.thread.stop()


def _bad_frames(assets: FleetAssets) -> dict[str, tuple[bytes, str]]:
    good = _announcement(assets)
    return {
        # the codec refuses 10 floats for a 25,450-parameter model: WireError in the replica
        "wrong-size dense payload": (wire.encode(dataclasses.replace(good, payload=good.payload[:40])), "dense codec"),
        "lr fast": (_frame_with_header_text(good, ('"lr":0.05', '"lr":"fast"')), "lr"),
        "sketch bits=9": (_frame_with_header_text(good, ('"uplink_codec":"dense"', '"uplink_codec":"sketch:bits=9"')),
                          "bits=9"),
        "batch_size 1e400": (_frame_with_header_text(good, ('"batch_size":8', '"batch_size":1e400')), "batch_size"),
        "NaN model": (wire.encode(_announcement(assets, params=np.full(assets.num_params, np.nan, np.float32))),
                      "NaN or Inf"),
        "Inf model": (wire.encode(_announcement(assets, params=np.full(assets.num_params, np.inf, np.float32))),
                      "NaN or Inf"),
    }


@pytest.mark.parametrize("case", ["wrong-size dense payload", "lr fast", "sketch bits=9", "batch_size 1e400",
                                  "NaN model", "Inf model"])
def test_a_bad_announcement_is_refused_with_a_reason_and_the_device_serves_the_next(
        harness: Harness, fleet_assets: FleetAssets, case: str) -> None:  # noqa: F811
    frame, reason = _bad_frames(fleet_assets)[case]
    harness.deliver(frame)
    status = harness.wait_skip(reason)
    assert status.online and harness.thread.thread.is_alive()
    assert harness.updates() == [] and harness.device.replica.params is None  # nothing applied, nothing sent
    harness.deliver(wire.encode(_announcement(fleet_assets)))
    (update,) = harness.wait_updates(1)
    assert (update.run_id, update.round_id) == ("run-a", 1)
    assert harness.thread.error is None


def test_a_new_run_resets_progress_so_its_round_1_is_answered(harness: Harness, fleet_assets: FleetAssets) -> None:  # noqa: F811
    harness.deliver(wire.encode(_announcement(fleet_assets, run_id="run-a")))
    harness.wait_updates(1)
    harness.deliver(wire.encode(_announcement(fleet_assets, run_id="run-a")))  # retained, seen again: skipped
    assert harness.wait_skip("already answered").skip_reason.startswith("run run-a round 1:")
    harness.deliver(wire.encode(_announcement(fleet_assets, run_id="run-b")))  # same round 1, version 0
    updates = harness.wait_updates(2)
    assert [(u.run_id, u.round_id) for u in updates] == [("run-a", 1), ("run-b", 1)]
    assert harness.device.run_id == "run-b" and harness.device.state.run_id() == "run-b"
    # run-a's unacknowledged update left the outbox with its run: nobody would aggregate it
    assert {e.key.split("#")[0] for e in harness.device.outbox.pending()} == {updates[1].update_id}


def test_progress_is_kept_per_run_across_a_restart(fleet_assets: FleetAssets, tmp_path: Path) -> None:  # noqa: F811
    first = Harness(fleet_assets, tmp_path / "device")
    first.deliver(wire.encode(_announcement(fleet_assets, run_id="run-a", round_id=999, version=999)))
    first.wait_updates(1)
    first.thread.stop()
    again = Harness(fleet_assets, tmp_path / "device")  # a restarted process, same state dir
    try:
        again.deliver(wire.encode(_announcement(fleet_assets, run_id="run-b")))
        # (the restarted device's outbox re-sends run-a's unacknowledged update on connect, as it should)
        wait_for(lambda: any(u.run_id == "run-b" for u in again.updates()), "an update for run-b")
        # round 999 of run-a does not block round 1 of run-b
        assert [u.round_id for u in again.updates() if u.run_id == "run-b"] == [1]
    finally:
        again.thread.stop()


def test_with_a_key_only_signed_announcements_are_obeyed(fleet_assets: FleetAssets, tmp_path: Path) -> None:  # noqa: F811
    key, forger = Ed25519PrivateKey.generate(), Ed25519PrivateKey.generate()
    h = Harness(fleet_assets, tmp_path / "device", key=key)
    try:
        h.deliver(wire.encode(_announcement(fleet_assets, run_id="run-x", round_id=999)))
        h.wait_skip("unsigned")
        h.deliver(wire.encode(wire.signing.sign(_announcement(fleet_assets, run_id="run-x", round_id=999), forger)))
        h.wait_skip("does not verify")
        signed = wire.signing.sign(_announcement(fleet_assets), key)
        tampered = dataclasses.replace(signed, settings=RoundSettings(lr=50.0, batch_size=8, local_steps=1))
        h.deliver(wire.encode(tampered))  # a real signature over other settings
        wait_for(lambda: sum("does not verify" in s.skip_reason for s in h.transport.messages(wire.Status)) >= 2,
                 "the tampered announcement's refusal")
        assert h.updates() == [] and h.device.run_id == "" and h.device.replica.params is None
        h.deliver(wire.encode(signed))
        (update,) = h.wait_updates(1)
        assert (update.run_id, update.round_id) == ("run-a", 1)
    finally:
        h.thread.stop()


def test_signature_round_trips_through_the_wire_and_covers_every_field(fleet_assets: FleetAssets) -> None:  # noqa: F811
    key = Ed25519PrivateKey.generate()
    signed = wire.signing.sign(_announcement(fleet_assets), key)
    decoded = wire.decode(wire.encode(signed))
    assert isinstance(decoded, wire.Announcement)
    wire.signing.verify(decoded, key.public_key())
    for change in (dict(run_id="run-z"), dict(round_id=2), dict(model_version=1), dict(task="gradient"),
                   dict(selected=("dev-0", "dev-1")), dict(deadline_unix_s=4e9 + 1),
                   dict(settings=RoundSettings(lr=0.06, batch_size=8, local_steps=1)),
                   dict(uplink_codec=CodecSpec("q8")), dict(payload=bytes(decoded.payload)[:-4] + b"\0\0\0\0")):
        with pytest.raises(wire.signing.BadSignature):
            wire.signing.verify(dataclasses.replace(decoded, **change), key.public_key())  # type: ignore[arg-type]
