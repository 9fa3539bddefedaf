"""Hostile values off the wire that must be refused or ignored, never raise (issue 12)."""
from __future__ import annotations

import pytest

from edgetrain.aggregator.device_metrics import DeviceMetricsCollector


@pytest.mark.parametrize("claimed", ["many", [1], {"a": 1}, 1e400, -5, 10**400])
def test_a_status_with_a_bad_example_count_is_ignored(claimed: object) -> None:
    collector = DeviceMetricsCollector()
    collector.note_status("dev-0", {"partition_digest": "abc", "num_examples": 10})
    collector.note_status("dev-1", {"partition_digest": "abc", "num_examples": claimed})  # reaches the twin check
    assert collector.shared_partitions() == {"abc": ["dev-0", "dev-1"]}
    assert collector.partition_size("dev-1") is None and collector.partition_size("dev-0") == 10


# -- decoders allocate in proportion to what they verified (defect 6) -----------------------------
import struct  # noqa: E402
import tracemalloc  # noqa: E402

import numpy as np  # noqa: E402

from edgetrain.sdk.codecs import get_codec  # noqa: E402
from edgetrain.sdk.codecs.bitio import _PARAMETER_BITS, RICE_BLOCK, pack_uint, packed_size  # noqa: E402
from edgetrain.sdk.errors import WireError  # noqa: E402

_SIZE = 200_000  # parameters of the model the payload claims to update
_TAIL = 1 << 20  # a megabyte of one bits after a short position header


def _crafted_positions(tag: int, count: int, parameter: int) -> bytes:
    runs = -(-count // RICE_BLOCK)
    return bytes([tag]) + struct.pack("<I", count) + pack_uint(np.full(runs, parameter), _PARAMETER_BITS)


def _peak_bytes(decode: object) -> int:
    tracemalloc.start()
    try:
        with pytest.raises(WireError):
            decode()  # type: ignore[operator]
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


@pytest.mark.parametrize("codec, tag", [("dgc", 0x44), ("stc", 0x54)])
@pytest.mark.parametrize("count", [10, _SIZE])
def test_position_decoder_peak_is_bounded_by_the_verified_count(codec: str, tag: int, count: int) -> None:
    payload = _crafted_positions(tag, count, 0) + b"\xff" * _TAIL  # every gap 0, then far too many one bits
    peak = _peak_bytes(lambda: get_codec(codec).decode(payload, _SIZE, {}))
    # O(count) work arrays (a handful of int64 per position, the decoded float32 vector) and never O(tail).
    assert peak <= 64 * count + 4 * _SIZE + 64 * 1024, f"{peak / len(payload):.1f}x the payload"


@pytest.mark.parametrize("count", [10, _SIZE])
def test_drive_sparse_positions_peak_is_bounded_by_the_verified_count(count: int) -> None:
    # drive's header (tag, flags=sparse, log2 block, seed) before the same position coding as dgc/stc
    header = struct.pack("<BBBQ", 0x56, 2, 16, 1)
    payload = header + _crafted_positions(0, count, 0)[1:] + b"\xff" * _TAIL
    peak = _peak_bytes(lambda: get_codec("drive").decode(payload, _SIZE, {}))
    assert peak <= 64 * count + 4 * _SIZE + 64 * 1024, f"{peak / len(payload):.1f}x the payload"


def test_wide_rice_remainders_do_not_expand_64x() -> None:
    count = _SIZE
    rem_bytes = packed_size(count, 40)
    payload = _crafted_positions(0x44, count, 40) + b"\x00" * rem_bytes + b"\xff" * (count // 8)
    peak = _peak_bytes(lambda: get_codec("dgc").decode(payload, _SIZE, {}))  # the gaps point past the vector
    assert peak <= 64 * count + 4 * _SIZE + 64 * 1024, f"{peak / len(payload):.1f}x the payload"


# -- memory bounds under flooding (defect 5) --------------------------------------------------------
from edgetrain.aggregator.inbox import Inbox  # noqa: E402
from edgetrain.sdk import wire  # noqa: E402
from edgetrain.sdk.wire.chunks import _chunk_header  # noqa: E402


def _chunk(message_id: str, index: int, count: int, total_bytes: int, data: bytes = b"x") -> bytes:
    return wire.build_frame(wire.MessageType.CHUNK, _chunk_header(message_id, index, count, total_bytes, 0), data)


def test_a_chunk_claiming_more_slices_than_bytes_is_refused_before_anything_is_held() -> None:
    reassembler = wire.Reassembler()
    with pytest.raises(WireError, match="count"):
        reassembler.feed(_chunk("m", 0, 2**40, 100))  # every slice carries a byte: 2**40 slices need 2**40 bytes
    assert reassembler.pending_message_ids == () and reassembler.expire(now_s=1e12) == []


def test_reassembly_state_is_bounded_per_source_and_in_total() -> None:
    reassembler = wire.Reassembler(max_pending_bytes=1000, max_pending_bytes_per_source=300)
    for i in range(3):
        reassembler.feed(_chunk(f"a{i}", 0, 2, 200, b"y" * 100), source="dev-a")
    # dev-a now holds 300 bytes: its next never-completing message is refused, dev-b's is not
    with pytest.raises(WireError, match="dev-a"):
        reassembler.feed(_chunk("a3", 0, 2, 200, b"y" * 100), source="dev-a")
    reassembler.feed(_chunk("b0", 0, 2, 200, b"z" * 100), source="dev-b")
    assert reassembler.pending_bytes == 400
    assert len(reassembler.expire(now_s=1e12)) == 4 and reassembler.pending_bytes == 0


def test_the_inbox_drops_and_counts_what_overflows() -> None:
    inbox = Inbox(max_messages=3, max_bytes=10_000)
    for i in range(5):
        inbox.put(f"t/{i}", b"p" * 10)
    inbox.put("t/big", b"p" * 20_000)
    assert inbox.dropped == 3 and inbox.dropped_bytes == 20 + 20_000
    assert [inbox.get(0.01)[0] for _ in range(3)] == ["t/0", "t/1", "t/2"] and inbox.get(0.01) is None
    inbox.put("t/again", b"p")  # room again once drained
    assert inbox.get(0.01) == ("t/again", b"p") and inbox.queued_bytes == 0
