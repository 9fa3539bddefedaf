"""Frames put their payload at a 16-byte offset (the header padded with JSON whitespace), so the aggregator
reads float32 payloads in place at aligned-speed; unpadded frames still read, and an unaligned buffer is
copied once by the dense codec rather than read by numpy's slow unaligned loops."""
from __future__ import annotations

import json
import struct

import numpy as np
import pytest

from edgetrain.sdk import wire
from edgetrain.sdk.codecs import get_codec, parse_codec_spec
from edgetrain.sdk.wire.checksum import crc32
from edgetrain.sdk.wire.frame import PAYLOAD_ALIGNMENT, WIRE_VERSION, MessageType


def _update(size: int, device: str = "dev-1", update_id: str = "u-1") -> wire.Update:
    payload, _ = get_codec("dense").encode(np.arange(size, dtype=np.float32), None, {})
    return wire.Update(device_id=device, round_id=1, model_version=1, update_id=update_id, num_examples=10,
                       codec="dense", payload=payload, metrics={"train_loss": 0.5}, run_id="run")


@pytest.mark.parametrize("device", ["d", "dev-12", "a-much-longer-device-name-0001", "dévice-ü"])
def test_payload_starts_at_an_aligned_offset_and_decodes_in_place(device: str) -> None:
    frame = wire.encode(_update(1000, device=device))
    header_len = struct.unpack_from("<I", frame, 4)[0]
    assert (16 + header_len) % PAYLOAD_ALIGNMENT == 0
    header = json.loads(frame[16 : 16 + header_len].decode("utf-8"))  # plain JSON: the pad is whitespace
    assert header["device_id"] == device
    decoded = wire.decode(frame)
    vector = get_codec("dense").decode_view(decoded.payload, 1000, {})
    assert vector.flags.aligned and np.shares_memory(vector, np.frombuffer(frame, np.uint8))
    np.testing.assert_array_equal(vector, np.arange(1000, dtype=np.float32))


def test_a_frame_without_payload_is_not_padded() -> None:
    ack = wire.Ack(device_id="dev-1", round_id=1, update_id="u-1", accepted=True, reason="")
    frame = wire.encode(ack)
    header_len = struct.unpack_from("<I", frame, 4)[0]
    assert not frame[16 : 16 + header_len].endswith(b" ")


def test_an_unpadded_frame_from_an_older_peer_still_decodes() -> None:
    update = _update(33)
    header = json.dumps(wire.messages.header_fields(update), ensure_ascii=False, separators=(",", ":"),
                        sort_keys=True).encode("utf-8")
    prefix = struct.pack("<2sBBIQ", b"ET", WIRE_VERSION, int(MessageType.UPDATE), len(header), len(update.payload))
    body = prefix + header + update.payload
    frame = body + struct.pack("<I", crc32(body))
    decoded = wire.decode(frame)
    assert decoded == wire.decode(wire.encode(update))
    np.testing.assert_array_equal(get_codec("dense").decode_view(decoded.payload, 33, {}), np.arange(33, dtype=np.float32))


def test_dense_view_of_an_unaligned_buffer_is_an_aligned_read_only_copy() -> None:
    data = b"\x00" + np.arange(100, dtype="<f4").tobytes()
    vector = get_codec("dense").decode_view(memoryview(data)[1:], 100, {})
    assert vector.flags.aligned and not vector.flags.writeable
    np.testing.assert_array_equal(vector, np.arange(100, dtype=np.float32))


def test_parsed_codec_specs_are_fresh_dicts_though_the_parse_is_cached() -> None:
    name, first = parse_codec_spec("sketch:bits=2,keep=0.5")
    first["bits"] = 99
    assert parse_codec_spec("sketch:bits=2,keep=0.5") == ("sketch", {"bits": 2, "keep": 0.5})
