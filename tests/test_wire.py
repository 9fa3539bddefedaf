"""The wire format: message round trips, the frame layout, every malformed case, chunking, fuzzing."""
from __future__ import annotations

import json
import random
import struct
import zlib
from dataclasses import fields

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from edgetrain.sdk.codecs import CodecSpec, get_codec
from edgetrain.sdk.round_settings import RoundSettings
from edgetrain.sdk.errors import ConfigError, UnknownCodec, WireError
from edgetrain.sdk.wire import (
    MAGIC,
    WIRE_VERSION,
    Ack,
    Announcement,
    DeviceMetrics,
    MessageType,
    Reassembler,
    Status,
    Update,
    build_frame,
    decode,
    encode,
    read_frame,
    split,
)

FUZZ = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def _raw_frame(message_type: int, header: bytes, payload: bytes = b"", version: int = WIRE_VERSION,
               magic: bytes = MAGIC) -> bytes:
    """A frame built by hand from the documented layout, with a correct crc32."""
    body = magic + struct.pack("<BBIQ", version, message_type, len(header), len(payload)) + header + payload
    return body + struct.pack("<I", zlib.crc32(body))


def _vector_payload(size: int = 64) -> tuple[np.ndarray, bytes]:
    vector = np.random.default_rng(size).standard_normal(size).astype(np.float32)
    data, _ = get_codec("dense").encode(vector, None, {})
    return vector, data


def _update(payload: bytes | None = None, device_id: str = "jetson-ü-東京-01") -> Update:
    return Update(device_id=device_id, round_id=3, model_version=7, update_id="u-3-1", num_examples=600,
                  codec="dense", payload=_vector_payload()[1] if payload is None else payload,
                  metrics={"loss": 0.42, "train_s": 1.5, "examples": 600}, run_id="run-a")


def _announcement(**changes: object) -> Announcement:
    """A typed announcement; ``changes`` override fields (positionally-free, so tests name what they vary)."""
    base: dict[str, object] = dict(
        run_id="run-a", round_id=3, model_version=7, strategy="fedavg", task="train", selected=("pi-1", "jetson-ü"),
        deadline_unix_s=1_700_000_000.25, settings=RoundSettings(lr=0.1, momentum=0.9, local_steps=5),
        uplink_codec=CodecSpec.parse("dgc:sparsity=0.99"), payload_kind="params",
        downlink_codec=CodecSpec("dense"), base_version=None, payload=_vector_payload(10)[1])
    base.update(changes)
    return Announcement(**base)  # type: ignore[arg-type]


SAMPLE_MESSAGES = [
    _announcement(),
    _announcement(round_id=0, model_version=0, strategy="large-batch", task="gradient", selected=(), deadline_unix_s=0,
                  settings=RoundSettings(batch_size=8), payload_kind="none", payload=b""),
    _announcement(payload_kind="delta", base_version=6, downlink_codec=CodecSpec.parse("q8"), signature="ab" * 64),
    _update(),
    _update(payload=b"", device_id="デバイス"),
    Ack(device_id="pi-1", round_id=3, update_id="u-3-1", accepted=True),
    Ack(device_id="pi-1", round_id=3, update_id="u-3-1", accepted=False, reason="stale_round"),
    Status(device_id="pi-ñ", online=False, info={"runtime": "onnx", "ram_mb": 512, "tags": ["a", None]}),
    Status(device_id="pi-1", online=True, info={}, run_id="run-a", skip_reason="round 3: already answered"),
    DeviceMetrics(device_id="pi-1", round_id=3, values={"latency_s": 0.25, "bytes_up": 4096, "joules": 1.5}),
]


@pytest.mark.parametrize("message", SAMPLE_MESSAGES, ids=lambda m: type(m).__name__)
def test_round_trip_every_message_type(message: object) -> None:
    decoded = decode(encode(message))  # type: ignore[arg-type]
    assert type(decoded) is type(message)
    assert decoded == message


def test_float32_vector_survives_the_wire_via_dense() -> None:
    vector, data = _vector_payload(1000)
    decoded = decode(encode(_update(payload=data)))
    assert isinstance(decoded, Update)
    restored = get_codec(decoded.codec).decode(decoded.payload, vector.size, {})
    assert np.array_equal(restored, vector)


def test_frame_layout_matches_the_documented_format() -> None:
    message = _update()
    frame = encode(message)
    magic, version, message_type, header_len, payload_len = struct.unpack_from("<2sBBIQ", frame)
    assert (magic, version, message_type) == (b"ET", 2, MessageType.UPDATE)
    assert len(frame) == 16 + header_len + payload_len + 4
    header = json.loads(frame[16 : 16 + header_len].decode("utf-8"))
    assert set(header) == {f.name for f in fields(Update)} - {"payload"}
    assert header["device_id"] == message.device_id
    assert frame[16 + header_len : 16 + header_len + payload_len] == message.payload
    assert struct.unpack("<I", frame[-4:])[0] == zlib.crc32(frame[:-4])


def test_constructors_normalise_and_name_bad_fields() -> None:
    ann = _announcement(selected=["a", "b"], deadline_unix_s=5, settings={"lr": 1, "batch_size": 4},
                        uplink_codec="dgc:sparsity=0.99,momentum=0", payload_kind="delta", base_version=0,
                        payload=bytearray(b"xy"))
    assert ann.selected == ("a", "b") and ann.deadline_unix_s == 5.0 and isinstance(ann.deadline_unix_s, float)
    assert ann.settings == RoundSettings(lr=1.0, batch_size=4) and isinstance(ann.settings.lr, float)
    assert ann.uplink_codec == CodecSpec("dgc", {"sparsity": 0.99, "momentum": 0}) and ann.payload == b"xy"
    cases = [
        (lambda: _update_with(round_id=-1), "Update.round_id"),
        (lambda: _update_with(num_examples=True), "Update.num_examples"),
        (lambda: _update_with(device_id=""), "Update.device_id"),
        (lambda: _update_with(metrics={"loss": "low"}), "Update.metrics"),
        (lambda: _update_with(payload="text"), "Update.payload"),
        (lambda: Ack("d", 1, "u", accepted=1), "Ack.accepted"),  # type: ignore[arg-type]
        (lambda: Status("d", True, info={"x": object()}), "Status.info"),
        (lambda: _announcement(payload_kind="weights"), "Announcement.payload_kind"),
        (lambda: _announcement(payload_kind="none", payload=b"x"), "Announcement.payload"),
        (lambda: _announcement(deadline_unix_s=float("inf")), "deadline_unix_s"),
        (lambda: _announcement(task="dance"), "Announcement.task"),
        (lambda: _announcement(run_id=""), "Announcement.run_id"),
        (lambda: _announcement(run_id="x" * 65), "Announcement.run_id"),
        (lambda: _announcement(payload_kind="delta", base_version=None), "Announcement.base_version"),
        (lambda: _announcement(base_version=3), "Announcement.base_version"),
        (lambda: _announcement(signature="zz"), "Announcement.signature"),
        (lambda: _announcement(settings={"lr": "fast"}), "Announcement.settings.*lr"),
        (lambda: _announcement(settings={"batch_size": float("inf")}), "Announcement.settings.*batch_size"),
        (lambda: _announcement(settings={"learning_rate": 0.1}), "Announcement.settings.*learning_rate"),
        (lambda: _announcement(uplink_codec="dense:x=1"), "Announcement.uplink_codec"),
        (lambda: _announcement(uplink_codec="sketch:bits=9"), "Announcement.uplink_codec"),
        (lambda: _announcement(downlink_codec="nope"), "Announcement.downlink_codec"),
    ]
    for build, field_name in cases:
        with pytest.raises(WireError, match=field_name):
            build()


def test_a_version_1_peers_frame_is_refused_naming_both_versions() -> None:
    # What a v1 aggregator sent: its announcement header kept codec/task/base_version in hyperparams.
    v1_header = {"round_id": 1, "model_version": 0, "strategy": "fedavg", "selected": ["pi-1"],
                 "deadline_unix_s": 4e9, "hyperparams": {"lr": 0.05, "codec": "dense"}, "payload_kind": "none",
                 "codec": "dense"}
    frame = _raw_frame(MessageType.ANNOUNCEMENT, json.dumps(v1_header).encode(), version=1)
    with pytest.raises(WireError, match=r"wrong version.*wire version 1.*wire version 2"):
        decode(frame)


def test_a_version_1_peer_refuses_our_frames() -> None:
    """The v1 decoder's rule is ``version != WIRE_VERSION -> WireError``; with its WIRE_VERSION (1) in
    force, every frame we send (version byte 2) is refused, and nothing in it is read."""
    frame = encode(_announcement())
    assert frame[2] == WIRE_VERSION == 2
    v1_view = bytearray(frame)
    v1_view[2] = 1  # stand in for the peer: its WIRE_VERSION is 1, ours is 2, the frame says 2
    with pytest.raises(WireError, match="wrong version"):
        decode(bytes(v1_view))  # the v1 peer's check, mirrored: what it expects differs from what it reads


def _update_with(**changes: object) -> Update:
    base = {f.name: getattr(_update(), f.name) for f in fields(Update)}
    base.update(changes)
    return Update(**base)  # type: ignore[arg-type]


def _header_bytes(message: object) -> bytes:
    frame = encode(message)  # type: ignore[arg-type]
    header_len = struct.unpack_from("<I", frame, 4)[0]
    return frame[16 : 16 + header_len]


def _malformed_frames() -> list[tuple[str, bytes, str]]:
    good = encode(_update())
    header = json.loads(_header_bytes(_update()))
    payload = _update().payload
    flipped = bytearray(good)
    flipped[-10] ^= 0x01  # one payload byte
    without_field = {k: v for k, v in header.items() if k != "update_id"}
    return [
        ("empty", b"", "truncated"),
        ("truncated prefix", good[:10], "truncated"),
        ("truncated tail", good[:-1], "truncated"),
        ("bad magic", b"XX" + good[2:], "wrong magic"),
        ("wrong version", _raw_frame(MessageType.UPDATE, json.dumps(header).encode(), payload, version=3),
         "wrong version"),
        ("unknown type", _raw_frame(99, json.dumps(header).encode(), payload), "unknown message type"),
        ("trailing bytes", good + b"\x00", "bad length"),
        ("header not JSON", _raw_frame(MessageType.UPDATE, b"{not json", payload), "bad header"),
        ("header not UTF-8", _raw_frame(MessageType.UPDATE, b'{"a":"\xff"}', payload), "bad header"),
        ("header not object", _raw_frame(MessageType.UPDATE, b"[1, 2]", payload), "bad header"),
        ("header deeply nested", _raw_frame(MessageType.STATUS, b"[" * 100_000), "bad header"),
        ("header missing field", _raw_frame(MessageType.UPDATE, json.dumps(without_field).encode(), payload),
         "bad header.*update_id"),
        ("header mistyped field", _raw_frame(MessageType.UPDATE, json.dumps({**header, "round_id": "3"}).encode(),
                                             payload), "bad header.*round_id"),
        ("header extra field", _raw_frame(MessageType.UPDATE, json.dumps({**header, "x": 1}).encode(), payload),
         "bad header.*x"),
        ("header repeated key", _raw_frame(MessageType.ACK, b'{"device_id":"a","device_id":"b","round_id":1,'
                                           b'"update_id":"u","accepted":true}'), "bad header"),
        ("payload on Ack", _raw_frame(MessageType.ACK, _header_bytes(next(m for m in SAMPLE_MESSAGES if isinstance(m, Ack))), b"x"), "bad length"),
        ("unknown codec", _raw_frame(MessageType.UPDATE, json.dumps({**header, "codec": "zstd9"}).encode(), payload),
         "unknown codec 'zstd9'.*dense"),
        ("bad codec spec", _raw_frame(MessageType.UPDATE, json.dumps({**header, "codec": "dense:k"}).encode(),
                                      payload), "codec"),
        ("checksum mismatch", bytes(flipped), "checksum mismatch"),
        ("chunk frame", split(encode(_update(payload=bytes(5000))), 1000)[0], "chunk frame"),
        ("not bytes", "ET\x01", "not a frame"),  # type: ignore[list-item]
    ]


@pytest.mark.parametrize(("frame", "reason"), [(f, r) for _, f, r in _malformed_frames()],
                         ids=[name for name, _, _ in _malformed_frames()])
def test_malformed_frames_raise_wire_error_with_reason(frame: bytes, reason: str) -> None:
    with pytest.raises(WireError, match=reason) as info:
        decode(frame)
    # A codec this side lacks is its own subclass, so the aggregator can count it as unknown_codec.
    expected = UnknownCodec if "codec" in reason else WireError
    assert type(info.value) is expected


def test_header_length_over_cap_is_refused_without_reading_it() -> None:
    frame = MAGIC + struct.pack("<BBIQ", WIRE_VERSION, MessageType.ACK, 1 << 30, 0) + b"\x00" * 4
    with pytest.raises(WireError, match="header length"):
        decode(frame)


def test_encode_refuses_unknown_codec_before_sending() -> None:
    with pytest.raises(WireError, match="unknown codec 'nope'"):
        encode(_update_with(codec="nope"))
    assert isinstance(decode(encode(_update_with(codec="dense:note=x"))), Update)  # a spec with params is fine


def test_every_truncation_of_a_valid_frame_is_refused() -> None:
    frame = encode(SAMPLE_MESSAGES[4])
    for cut in range(len(frame)):
        with pytest.raises(WireError):
            decode(frame[:cut])


# --- chunking -------------------------------------------------------------------------------------

def test_small_frame_is_not_chunked_and_passes_through_reassembler() -> None:
    frame = encode(SAMPLE_MESSAGES[4])
    assert split(frame, len(frame)) == [frame]
    assert Reassembler().feed(frame) == SAMPLE_MESSAGES[4]


def test_5mb_payload_chunked_shuffled_with_duplicates_reassembles() -> None:
    payload = np.random.default_rng(1).bytes(5_000_000)
    message = _update(payload=payload)
    frame = encode(message)
    max_chunk = 256 * 1024
    chunks = split(frame, max_chunk, message_id="m-5mb")
    assert len(chunks) > len(frame) // max_chunk  # 20 full-size chunks would not be enough
    assert all(len(c) <= max_chunk for c in chunks)
    assert all(read_frame(c).message_type == MessageType.CHUNK for c in chunks)
    rng = random.Random(2)
    deliveries = chunks + rng.sample(chunks, 6)  # QoS 1 redeliveries
    rng.shuffle(deliveries)
    reassembler = Reassembler()
    results = [reassembler.feed(c, now_s=0.0) for c in deliveries]
    completed = [r for r in results if r is not None]
    assert completed == [message]
    assert reassembler.pending_bytes == 0 and reassembler.pending_message_ids == ()
    assert reassembler.expire(now_s=1e9) == []


def test_split_refuses_a_chunk_size_with_no_room_for_data() -> None:
    with pytest.raises(ConfigError, match="max_chunk_bytes"):
        split(encode(_update()), 50)
    with pytest.raises(ConfigError, match="max_chunk_bytes"):
        split(b"x", 0)


def _chunks(size: int = 4000, max_chunk: int = 400, message_id: str = "m1") -> tuple[Update, list[bytes]]:
    message = _update(payload=np.random.default_rng(size).bytes(size))
    return message, split(encode(message), max_chunk, message_id=message_id)


def test_missing_chunk_expires_with_error_naming_message_and_index() -> None:
    _, chunks = _chunks()
    reassembler = Reassembler(timeout_s=10)
    for i, chunk in enumerate(chunks):
        if i != 3:
            assert reassembler.feed(chunk, now_s=100.0) is None
    assert reassembler.expire(now_s=105.0) == []  # still within the timeout
    errors = reassembler.expire(now_s=111.0)
    assert len(errors) == 1 and type(errors[0]) is WireError
    assert "'m1'" in str(errors[0])
    assert f"missing chunk index(es) 3 of {len(chunks)}" in str(errors[0])
    assert reassembler.pending_bytes == 0 and reassembler.expire(now_s=1e6) == []


def test_timeout_counts_from_the_latest_chunk() -> None:
    message, chunks = _chunks()
    reassembler = Reassembler(timeout_s=10)
    for i, chunk in enumerate(chunks[:-1]):
        reassembler.feed(chunk, now_s=8.0 * i)  # a slow upload: total time far beyond timeout_s
        assert reassembler.expire(now_s=8.0 * i + 1) == []
    assert reassembler.feed(chunks[-1], now_s=8.0 * len(chunks)) == message


def _rechunk(chunk: bytes, **changes: object) -> bytes:
    raw = read_frame(chunk)
    return build_frame(MessageType.CHUNK, {**raw.header, **changes}, raw.payload)


@pytest.mark.parametrize(
    ("changes", "reason"),
    [({"count": 99}, "inconsistent chunk.*count=99"), ({"total_bytes": 123}, "inconsistent chunk"),
     ({"total_crc32": 5}, "inconsistent chunk"), ({"index": 10**6}, "out of range")],
)
def test_inconsistent_chunk_raises_and_drops_the_message(changes: dict, reason: str) -> None:
    _, chunks = _chunks()
    reassembler = Reassembler()
    reassembler.feed(chunks[0])
    with pytest.raises(WireError, match=reason):
        reassembler.feed(_rechunk(chunks[1], **changes))
    if "index" not in changes:  # a chunk inconsistent with earlier ones poisons its message id
        assert reassembler.pending_message_ids == ()


def test_same_index_with_different_contents_is_inconsistent() -> None:
    _, chunks = _chunks()
    raw = read_frame(chunks[1])
    altered = build_frame(MessageType.CHUNK, raw.header, bytes(b ^ 0xFF for b in raw.payload))
    reassembler = Reassembler()
    reassembler.feed(chunks[1])
    with pytest.raises(WireError, match="different contents"):
        reassembler.feed(altered)


def test_bad_chunk_headers_are_refused() -> None:
    _, chunks = _chunks()
    for changes in ({"index": -1}, {"count": 0}, {"message_id": ""}, {"total_crc32": 2**32}, {"index": True}):
        with pytest.raises(WireError, match="bad header|out of range"):
            Reassembler().feed(_rechunk(chunks[0], **changes))


def test_reassembled_frame_must_match_total_crc() -> None:
    message = _update()
    frame = encode(message)
    chunks = split(frame, 200, message_id="m-crc")
    forged = [_rechunk(c, total_crc32=(zlib.crc32(frame) + 1) & 0xFFFFFFFF) for c in chunks]
    reassembler = Reassembler()
    with pytest.raises(WireError, match="checksum mismatch.*m-crc"):
        for chunk in forged:
            reassembler.feed(chunk)


def test_redelivery_after_completion_is_ignored() -> None:
    message, chunks = _chunks()
    reassembler = Reassembler()
    results = [reassembler.feed(c) for c in chunks]
    assert results[-1] == message
    assert reassembler.feed(chunks[0]) is None and reassembler.pending_message_ids == ()


def test_max_pending_bytes_is_enforced() -> None:
    _, big = _chunks(size=4000, message_id="big")
    with pytest.raises(WireError, match="max_pending_bytes"):
        Reassembler(max_pending_bytes=1000).feed(big[0])  # can never fit: refused at once
    _, first = _chunks(size=3000, message_id="a")
    _, second = _chunks(size=3000, message_id="b")
    reassembler = Reassembler(max_pending_bytes=5000)
    for chunk in first[:-1]:
        reassembler.feed(chunk)
    with pytest.raises(WireError, match="max_pending_bytes.*'b'"):
        for chunk in second[:-1]:
            reassembler.feed(chunk)
    assert reassembler.pending_message_ids == ("a",)
    assert reassembler.pending_bytes <= 5000


def test_reassembler_refuses_bad_settings() -> None:
    with pytest.raises(ConfigError):
        Reassembler(timeout_s=0)
    with pytest.raises(ConfigError):
        Reassembler(max_pending_bytes=0)


# --- fuzzing: anything malformed is a WireError, never another exception -----------------------------

VALID_FRAME = encode(_update(payload=_vector_payload(16)[1]))
VALID_CHUNKS = split(encode(_update(payload=bytes(range(256)) * 4)), 300, message_id="fz")


@FUZZ
@given(st.binary(max_size=512))
def test_fuzz_random_bytes(data: bytes) -> None:
    with pytest.raises(WireError):
        decode(data)
    with pytest.raises(WireError):
        Reassembler().feed(data)


@FUZZ
@given(st.sampled_from([int(t) for t in MessageType] + [0, 255]), st.binary(max_size=256), st.binary(max_size=64))
def test_fuzz_random_header_bytes_with_valid_checksum(message_type: int, header: bytes, payload: bytes) -> None:
    with pytest.raises(WireError):
        decode(_raw_frame(message_type, header, payload))


_json = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12,
)


@FUZZ
@given(st.sampled_from([int(t) for t in MessageType]), st.dictionaries(st.text(max_size=12), _json, max_size=8))
def test_fuzz_random_json_headers_give_a_message_or_wire_error(message_type: int, header: dict) -> None:
    frame = _raw_frame(message_type, json.dumps(header).encode())
    try:
        decode(frame)
    except WireError:
        pass


@FUZZ
@given(st.integers(0, len(VALID_FRAME) - 1))
def test_fuzz_truncations(cut: int) -> None:
    with pytest.raises(WireError):
        decode(VALID_FRAME[:cut])


@FUZZ
@given(st.integers(0, len(VALID_FRAME) * 8 - 1))
def test_fuzz_bit_flips(bit: int) -> None:
    frame = bytearray(VALID_FRAME)
    frame[bit // 8] ^= 1 << (bit % 8)
    with pytest.raises(WireError):
        decode(bytes(frame))


@FUZZ
@given(st.integers(0, len(VALID_CHUNKS) - 1), st.data())
def test_fuzz_bit_flips_in_chunks(which: int, data: st.DataObject) -> None:
    chunk = bytearray(VALID_CHUNKS[which])
    bit = data.draw(st.integers(0, len(chunk) * 8 - 1))
    chunk[bit // 8] ^= 1 << (bit % 8)
    with pytest.raises(WireError):
        Reassembler().feed(bytes(chunk))
