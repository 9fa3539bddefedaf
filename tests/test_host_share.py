"""What a device host's identities share (``sdk.host_share``): one kept copy of each announcement frame,
decoded and verified once; one read-only model vector per (run, version), which replicas refer to while each
replica still decides from its own version whether it may move (no shortcut past a resync)."""
from __future__ import annotations

import gc

import numpy as np
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from edgetrain.sdk import wire
from edgetrain.sdk.codecs import CodecSpec, get_codec
from edgetrain.sdk.errors import BadSignature, WireError
from edgetrain.sdk.host_share import AnnouncementFrames, HostShare, SharedModels
from edgetrain.sdk.model_sync import ModelReplica
from edgetrain.sdk.round_settings import RoundSettings

N = 64


def _announcement(version: int = 0, vector: np.ndarray | None = None, kind: str = "params",
                  base: int | None = None, run_id: str = "run-a") -> wire.Announcement:
    vector = np.arange(N, dtype=np.float32) if vector is None else vector.astype(np.float32)
    return wire.Announcement(
        run_id=run_id, round_id=version + 1, model_version=version, strategy="fedavg", task="train",
        selected=("dev-0",), deadline_unix_s=4e9, settings=RoundSettings(lr=0.05, batch_size=8, local_steps=1),
        uplink_codec=CodecSpec("dense"), payload_kind=kind, downlink_codec=CodecSpec("dense"), base_version=base,
        payload=get_codec("dense").encode(vector, None, {})[0])


def _copy(frame: bytes) -> bytes:
    """What one more identity's socket hands over: equal bytes, another object."""
    return bytes(bytearray(frame))


def test_identities_copies_of_one_frame_become_one_object_and_other_frames_stay_apart() -> None:
    frames = AnnouncementFrames(capacity=2)
    first, second, third = (wire.encode(_announcement(v)) for v in (0, 1, 2))
    kept = frames.intern(first)
    assert frames.intern(_copy(first)) is kept
    assert frames.intern(_copy(second)) is not kept
    frames.intern(third)  # capacity 2: the oldest frame is no longer kept
    again = _copy(first)
    assert frames.intern(again) is again


def test_a_kept_frame_is_decoded_once_for_every_identity_and_an_error_reaches_them_all() -> None:
    frames = AnnouncementFrames()
    frame = wire.encode(_announcement())
    feeds: list[bytes] = []

    def feed(payload: bytes) -> wire.Message | None:
        feeds.append(payload)
        return wire.decode(payload)

    messages = [frames.decode(frames.intern(_copy(frame)), feed) for _ in range(5)]
    assert len(feeds) == 1 and frames.decoded == 1
    assert all(m is messages[0] for m in messages)
    assert isinstance(messages[0], wire.Announcement) and messages[0].model_version == 0

    broken = bytearray(frame)
    broken[-1] ^= 0xFF  # the crc
    for _ in range(3):
        with pytest.raises(WireError, match="checksum mismatch"):
            frames.decode(frames.intern(_copy(bytes(broken))), feed)
    assert len(feeds) == 2


def test_a_frame_that_was_not_interned_is_decoded_as_before() -> None:
    frames = AnnouncementFrames()
    frame = wire.encode(_announcement())
    assert isinstance(frames.decode(frame, wire.decode), wire.Announcement)
    assert frames.decoded == 0


def test_a_signature_is_checked_once_per_frame_and_a_forgery_is_refused_for_every_identity(
        monkeypatch: pytest.MonkeyPatch) -> None:
    key = Ed25519PrivateKey.generate()
    checks: list[int] = []
    real_verify = wire.signing.verify
    monkeypatch.setattr(wire.signing, "verify", lambda a, k: (checks.append(1), real_verify(a, k))[1])
    frames = AnnouncementFrames()
    signed = wire.encode(wire.signing.sign(_announcement(), key))
    for _ in range(4):
        message = frames.decode(frames.intern(_copy(signed)), wire.decode)
        assert isinstance(message, wire.Announcement)
        frames.verify(message, key.public_key())
    assert len(checks) == 1

    forged = wire.encode(wire.signing.sign(_announcement(1), Ed25519PrivateKey.generate()))
    for _ in range(3):
        message = frames.decode(frames.intern(_copy(forged)), wire.decode)
        assert isinstance(message, wire.Announcement)
        with pytest.raises(BadSignature):
            frames.verify(message, key.public_key())
    assert len(checks) == 2


def test_replicas_of_a_host_refer_to_one_read_only_vector_per_version() -> None:
    share = HostShare()
    replicas = [ModelReplica(N, share.models) for _ in range(3)]
    full = _announcement(0)
    for replica in replicas:
        assert replica.apply(full)
    assert all(r.params is replicas[0].params for r in replicas)
    assert replicas[0].params is not None and not replicas[0].params.flags.writeable
    with pytest.raises(ValueError):
        replicas[0].params[0] = 1.0  # copy on write: nobody changes every identity's model in place

    delta = _announcement(1, np.full(N, 0.5, np.float32), kind="delta", base=0)
    for replica in replicas:
        assert replica.apply(delta)
    assert all(r.params is replicas[0].params and r.version == 1 for r in replicas)
    np.testing.assert_array_equal(replicas[0].params, np.arange(N, dtype=np.float32) + 0.5)


def test_a_replica_on_another_base_still_needs_a_resync_though_the_host_holds_the_version() -> None:
    share = HostShare()
    ahead, behind, fresh = (ModelReplica(N, share.models) for _ in range(3))
    ahead.apply(_announcement(0))
    ahead.apply(_announcement(1, np.ones(N), kind="delta", base=0))
    delta_2 = _announcement(2, np.ones(N), kind="delta", base=1)
    assert ahead.apply(delta_2)
    assert not fresh.apply(delta_2)  # no model at all: as a board of its own, it must ask for a full model
    behind.apply(_announcement(0))
    assert not behind.apply(delta_2)  # version 0, the delta is on version 1
    assert (fresh.version, behind.version) == (None, 0)


def test_a_version_no_replica_refers_to_is_freed_and_runs_do_not_mix() -> None:
    models = SharedModels()
    replica = ModelReplica(N, models)
    replica.apply(_announcement(0))
    other_run = ModelReplica(N, models)
    other_run.apply(_announcement(0, np.zeros(N), run_id="run-b"))
    assert other_run.params is not replica.params and float(other_run.params.sum()) == 0.0  # type: ignore[union-attr]
    replica.apply(_announcement(1, np.ones(N), kind="delta", base=0))
    gc.collect()
    assert models.get("run-a", 0) is None and models.get("run-a", 1) is replica.params
