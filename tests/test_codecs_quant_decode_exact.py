"""The vectorised q8 and fp16 decoders give bit for bit what the straightforward decoders they
replaced gave (kept here as references), on every fp16 bit pattern and on random q8 payloads,
hostile headers (block lengths beyond the vector, blocks of 1) and non-finite ranges included."""
from __future__ import annotations

import struct

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from edgetrain.sdk.codecs import get_codec
from edgetrain.sdk.codecs.quant import decode_values, fp16_bytes_to_float32
from edgetrain.sdk.errors import WireError


def reference_fp16_decode(data: bytes) -> np.ndarray:
    return np.frombuffer(data, dtype="<f2").astype(np.float32)


def reference_q8_decode(data: bytes, size: int) -> np.ndarray:
    """The per-value gather decoder q8 had before it was vectorised (ranges already checked)."""
    block = struct.unpack_from("<BI", data)[1]
    rows = -(-size // block)
    ranges = np.frombuffer(data, dtype="<f4", count=2 * rows, offset=5).reshape(rows, 2)
    codes = np.frombuffer(data, dtype=np.uint8, offset=5 + 8 * rows)
    lo, step = ranges[:, 0].astype(np.float32), ranges[:, 1].astype(np.float32)
    row = np.arange(size, dtype=np.int64) // block
    return (lo[row].astype(np.float64) + codes * step[row].astype(np.float64)).astype(np.float32)


def q8_payload(block: int, lo: np.ndarray, step: np.ndarray, codes: np.ndarray) -> bytes:
    ranges = np.stack([lo, step], axis=1).astype("<f4").tobytes()
    return struct.pack("<BI", 0x51, block) + ranges + codes.astype(np.uint8).tobytes()


def test_fp16_decode_matches_astype_on_every_bit_pattern() -> None:
    every_half = np.arange(1 << 16, dtype=np.uint16)
    data = every_half.astype("<u2").tobytes()
    expected = reference_fp16_decode(data)
    assert np.array_equal(fp16_bytes_to_float32(data).view(np.uint32), expected.view(np.uint32))
    decoded = get_codec("fp16").decode(data, every_half.size, {})
    assert decoded.dtype == np.float32
    assert np.array_equal(decoded.view(np.uint32), expected.view(np.uint32))


@pytest.mark.parametrize("special", [0x7C00, 0xFC00, 0x7E00, 0x7C01, 0xFFFF, 0x7BFF, 0x0001, 0x8000])
def test_fp16_decode_of_a_special_half_among_ordinary_ones(special: int) -> None:
    halves = (np.random.default_rng(special).standard_normal(1000) * 1e-2).astype(np.float16).view(np.uint16)
    halves[[0, 517, 999]] = special
    data = halves.astype("<u2").tobytes()
    got = get_codec("fp16").decode(data, halves.size, {})
    assert np.array_equal(got.view(np.uint32), reference_fp16_decode(data).view(np.uint32))


def test_fp16_decode_of_nothing() -> None:
    assert get_codec("fp16").decode(b"", 0, {}).shape == (0,)


def test_decode_values_fp16_field_matches_astype() -> None:
    halves = np.arange(0, 1 << 16, 7, dtype=np.uint16)
    data = b"\x01" + halves.astype("<u2").tobytes()
    values, end = decode_values(data, 0, halves.size)
    assert end == len(data)
    assert np.array_equal(values.view(np.uint32), reference_fp16_decode(data[1:]).view(np.uint32))


@settings(max_examples=80, deadline=None)
@given(size=st.integers(1, 3000), block=st.sampled_from([1, 2, 3, 7, 64, 255, 256, 1000, 4096, 5000]),
       seed=st.integers(0, 2**32 - 1), stochastic=st.booleans())
def test_q8_decode_matches_reference_on_encoder_payloads(size: int, block: int, seed: int, stochastic: bool) -> None:
    rng = np.random.default_rng(seed)
    vector = (rng.standard_normal(size) * 10.0 ** rng.uniform(-6, 3)).astype(np.float32)
    params = {"block": block, "stochastic": stochastic, "seed": seed}
    codec = get_codec("q8")
    data, _ = codec.encode(vector, None, params)
    got = codec.decode(data, size, params)
    assert got.dtype == np.float32 and got.shape == (size,)
    assert np.array_equal(got.view(np.uint32), reference_q8_decode(data, size).view(np.uint32))


@settings(max_examples=80, deadline=None)
@given(size=st.integers(1, 2000), block=st.integers(1, 5000), seed=st.integers(0, 2**32 - 1))
def test_q8_decode_matches_reference_on_arbitrary_ranges(size: int, block: int, seed: int) -> None:
    """Ranges no encoder would write (huge offsets, tiny steps, denormals), so every rounding case
    of ``lo + code * step`` is compared, not only those of well-behaved blocks."""
    rng = np.random.default_rng(seed)
    rows = -(-size // block)
    raw = rng.integers(0, 1 << 32, size=2 * rows, dtype=np.uint64).astype(np.uint32).view(np.float32)
    lo = np.where(np.isfinite(raw[:rows]), raw[:rows], 1.0).astype(np.float32)
    step = np.abs(np.where(np.isfinite(raw[rows:]), raw[rows:], 0.5)).astype(np.float32)
    codes = rng.integers(0, 256, size=size)
    data = q8_payload(block, lo, step, codes)
    with np.errstate(over="ignore", invalid="ignore"):
        expected = reference_q8_decode(data, size)
        got = get_codec("q8").decode(data, size, {})
    assert np.array_equal(got.view(np.uint32), expected.view(np.uint32))


def test_q8_decode_of_a_block_length_far_beyond_the_vector() -> None:
    """A hostile header's block length (2**32 - 1) allocates nothing beyond the vector's values."""
    codes = np.arange(10) * 25
    data = q8_payload(2**32 - 1, np.array([-1.5], np.float32), np.array([0.01], np.float32), codes)
    got = get_codec("q8").decode(data, 10, {})
    assert np.array_equal(got.view(np.uint32), reference_q8_decode(data, 10).view(np.uint32))


def test_q8_decode_still_refuses_non_finite_ranges() -> None:
    data = q8_payload(4, np.array([0.0, np.nan], np.float32), np.array([1.0, 1.0], np.float32), np.zeros(6))
    with pytest.raises(WireError, match="corrupt quantisation range"):
        get_codec("q8").decode(data, 6, {})
