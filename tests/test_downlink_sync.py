"""Downlink sync: the aggregator's announcements keep device replicas bit-identical to its model."""
from __future__ import annotations

import numpy as np

from edgetrain.aggregator.downlink import Downlink
from edgetrain.sdk.model_sync import ModelReplica
from edgetrain.sdk.wire import Announcement
from edgetrain.sdk.codecs import CodecSpec
from edgetrain.sdk.round_settings import RoundSettings


def _announcement(version: int, payload) -> Announcement:
    return Announcement(run_id="r", round_id=version + 1, model_version=version, strategy="large-batch",
                        task="gradient", selected=("d",), deadline_unix_s=1e12, settings=RoundSettings(),
                        uplink_codec=CodecSpec("dense"), payload_kind=payload.payload_kind,
                        downlink_codec=payload.codec, base_version=payload.base_version, payload=payload.payload)


def test_deltas_keep_replicas_bit_identical_and_resync_every_k() -> None:
    rng = np.random.default_rng(0)
    downlink = Downlink(resync_every=4)
    params = rng.normal(size=1000).astype(np.float32)
    replica = ModelReplica(1000)
    kinds = []
    for version in range(9):
        payload, params = downlink.announce(params, version)
        kinds.append(payload.payload_kind)
        assert replica.apply(_announcement(version, payload))
        assert replica.version == version and np.array_equal(replica.params, params)
        params = params - np.float32(0.01) * rng.normal(size=1000).astype(np.float32)  # a server step
    assert kinds == ["params", "delta", "delta", "delta", "params", "delta", "delta", "delta", "params"]


def test_a_device_that_missed_a_delta_is_out_of_sync_until_a_full_model() -> None:
    downlink = Downlink(resync_every=100)
    params = np.zeros(10, np.float32)
    late = ModelReplica(10)
    first, params = downlink.announce(params, 0)
    assert late.apply(_announcement(0, first))
    second, params = downlink.announce(params + 1, 1)  # the late device misses this one
    third, params = downlink.announce(params + 1, 2)
    assert third.payload_kind == "delta" and not late.apply(_announcement(2, third))
    assert late.version == 0  # unchanged, not corrupted
    downlink.request_resync()
    fourth, params = downlink.announce(params + 1, 3)
    assert fourth.payload_kind == "params" and late.apply(_announcement(3, fourth))
    assert np.array_equal(late.params, params)


def test_a_retried_round_resends_the_same_payload() -> None:
    downlink = Downlink(resync_every=100)
    params = np.ones(5, np.float32)
    downlink.announce(params, 0)
    a, p1 = downlink.announce(params * 2, 1)
    b, p2 = downlink.announce(p1, 1)
    assert a == b and np.array_equal(p1, p2)
