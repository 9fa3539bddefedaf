"""The frame checksum: whichever implementation is installed, it is the standard CRC-32."""
from __future__ import annotations

import zlib

import numpy as np
import pytest

from edgetrain.sdk import wire
from edgetrain.sdk.wire.checksum import crc32


@pytest.mark.parametrize("size", [0, 1, 15, 16, 63, 64, 4095, 861_662])
def test_crc32_equals_zlib_for_every_length_and_seed(size: int) -> None:
    data = np.random.default_rng(size).integers(0, 256, size, dtype=np.uint8).tobytes()
    for seed in (0, 1, 0xFFFFFFFF, zlib.crc32(b"prefix")):
        assert crc32(data, seed) == zlib.crc32(data, seed)
    view = memoryview(data)[size // 3 :]
    assert crc32(view) == zlib.crc32(view)


def test_frame_checksum_is_readable_by_plain_zlib() -> None:
    """A peer without zlib-ng computes the same checksum: the last 4 bytes are zlib's CRC-32."""
    frame = wire.encode(wire.Ack(device_id="d", round_id=1, update_id="u", accepted=True))
    assert int.from_bytes(frame[-4:], "little") == zlib.crc32(frame[:-4])
