"""Every registered codec, hostile input: random or cut bytes become WireError (never another
exception, never a hang), bad parameters become ConfigError, and a valid payload decodes to the
right shape. Runs over ``codec_names()`` so a newly registered codec is covered automatically."""
from __future__ import annotations

import struct
import time

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from edgetrain.sdk.codecs import codec_names, get_codec
from edgetrain.sdk.errors import ConfigError, WireError

# Params that make each codec's payload small and exercise its interesting paths.
_PARAMS: dict[str, dict] = {
    "dgc": {"sparsity": 0.9},
    "stc": {"sparsity": 0.9},
    "sketch": {"bits": 3, "keep": 0.5, "block": 32},
    "random_mask": {"keep": 0.5},
    "q8": {"block": 16},
    "low_rank": {"rank": 1},
    "drive": {"sparsity": 0.5, "block": 64},
}
# A bad value per codec for one of its own parameters (wrong range or type).
_BAD_PARAMS: dict[str, list[dict]] = {
    "dgc": [{"sparsity": 1.0}, {"momentum": 1.5}, {"values": "int4"}, {"sparsity": "high"}, {"warmup_steps": -1}],
    "stc": [{"sparsity": 0.0}, {"sparsity": True}],
    "sketch": [{"bits": 0}, {"bits": 9}, {"keep": 0.0}, {"block": 100}, {"rotate": 1}],
    "random_mask": [{"keep": 1.5}, {"values": "fp8"}],
    "q8": [{"block": -1}, {"stochastic": "yes"}],
    "fp16": [],
    "drive": [{"sparsity": 1.0}, {"sparsity": -0.5}, {"block": 32}, {"block": 96}, {"unbiased": 1}, {"seed": -1}],
    "low_rank": [{}, {"rank": 0}, {"shapes": "8x"}, {"shapes": "8x0"}, {"shapes": "5"}, {"shapes": 2.5}],
}
_COMPRESSING = sorted(set(codec_names()) - {"dense"})  # dense predates checked params and ignores them
_SEEDED = ("sketch", "random_mask", "q8", "low_rank", "drive")


def _params_for(name: str, size: int, seed: int) -> dict:
    params = {**_PARAMS.get(name, {}), **({"seed": seed} if name in _SEEDED else {})}
    if name == "low_rank":  # a 3-row matrix plus a bias-like rest, so the rank-1 projection is used
        params["shapes"] = ";".join([f"3x{size // 3}"] * (size >= 3) + [str(size % 3)] * (size % 3 > 0))
    return params


def _valid_payload(name: str, size: int, seed: int) -> bytes:
    vector = np.random.default_rng(seed).standard_normal(size).astype(np.float32)
    data, _ = get_codec(name).encode(vector, None, _params_for(name, size, seed))
    return data


def _decode_or_wire_error(name: str, data: bytes, size: int) -> None:
    try:
        decoded = get_codec(name).decode(data, size, {})
    except WireError:
        return
    assert isinstance(decoded, np.ndarray) and decoded.dtype == np.float32 and decoded.shape == (size,)


def test_every_codec_is_covered() -> None:
    assert set(codec_names()) >= {"dense", "fp16", "q8", "dgc", "sketch", "random_mask", "low_rank", "stc", "drive"}
    assert set(_BAD_PARAMS) >= set(_COMPRESSING)  # a new codec must say which params it refuses


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.sampled_from(codec_names()), st.binary(max_size=300), st.integers(0, 400))
def test_random_bytes_decode_or_raise_wire_error(name: str, data: bytes, size: int) -> None:
    _decode_or_wire_error(name, data, size)


@settings(max_examples=150, deadline=None)
@given(st.sampled_from(codec_names()), st.integers(1, 300), st.integers(0, 2**16), st.data())
def test_mutated_valid_payloads_decode_or_raise_wire_error(name: str, size: int, seed: int,
                                                           data: st.DataObject) -> None:
    payload = bytearray(_valid_payload(name, size, seed))
    if payload:
        at = data.draw(st.integers(0, len(payload) - 1))
        payload[at] = data.draw(st.integers(0, 255))
    _decode_or_wire_error(name, bytes(payload), size)
    _decode_or_wire_error(name, bytes(payload), size + data.draw(st.integers(-size, 50)))


@pytest.mark.parametrize("name", codec_names())
def test_every_cut_or_extended_payload_is_a_wire_error(name: str) -> None:
    size = 157
    payload = _valid_payload(name, size, 11)
    assert get_codec(name).decode(payload, size, {}).shape == (size,)
    for cut in range(len(payload)):
        with pytest.raises(WireError):
            get_codec(name).decode(payload[:cut], size, {})
    with pytest.raises(WireError):
        get_codec(name).decode(payload + b"\x00", size, {})


@pytest.mark.parametrize("name", sorted(set(codec_names()) - {"low_rank"}))  # no tensor has 0 entries
def test_empty_vector_round_trips(name: str) -> None:
    codec = get_codec(name)
    data, _ = codec.encode(np.zeros(0, np.float32), None, _PARAMS.get(name, {}))
    assert codec.decode(data, 0, {}).shape == (0,)


@pytest.mark.parametrize("name", _COMPRESSING)
def test_wrong_params_are_config_errors(name: str) -> None:
    codec = get_codec(name)
    vector = np.ones(64, np.float32)
    for bad in [{"no_such_knob": 1}, *_BAD_PARAMS[name]]:
        with pytest.raises(ConfigError, match=name):
            codec.encode(vector, None, bad)
    with pytest.raises(ConfigError, match="no_such_knob"):
        codec.decode(_valid_payload(name, 64, 0), 64, {"no_such_knob": 1})


@pytest.mark.parametrize("name", _COMPRESSING)
def test_non_finite_or_non_float32_input_is_refused(name: str) -> None:
    codec = get_codec(name)
    with pytest.raises(WireError, match="float32"):
        codec.encode(np.ones(8, np.float64), None, {})
    if name != "fp16":  # fp16 carries NaN/Inf through; the others would poison residuals or ranges
        with pytest.raises(WireError, match="NaN or Inf"):
            codec.encode(np.array([1.0, np.nan], np.float32), None, {})


@pytest.mark.parametrize("name", _COMPRESSING)
def test_payloads_decode_without_the_encoder_params(name: str) -> None:
    # Updates may name only the codec: everything decoding needs must travel in the payload.
    size = 300
    vector = np.random.default_rng(2).standard_normal(size).astype(np.float32)
    params = _params_for(name, size, 5)
    data, _ = get_codec(name).encode(vector, None, params)
    assert np.array_equal(get_codec(name).decode(data, size, {}), get_codec(name).decode(data, size, params))


@pytest.mark.parametrize(
    ("name", "payload"),
    [
        ("q8", struct.pack("<BI", 0x51, 2**32 - 1) + struct.pack("<ff", 0.0, 1.0) + bytes(10)),  # block >> size
        ("sketch", struct.pack("<BBBBdQ", 0x53, 8, 24, 1, 1.0, 5) + bytes(8) + bytes(16)),  # 2**24 block
        ("sketch", struct.pack("<BBBBdQ", 0x73, 2, 24, 1, 1.0, 5) + bytes(8) + bytes(16)),  # the same, format 2
        ("dgc", bytes([0x44]) + struct.pack("<I", 10) + bytes([0xFF]) + bytes(100)),  # Rice parameter 63
        ("dgc", bytes([0x44]) + struct.pack("<I", 2**32 - 1) + bytes(100)),  # more positions than entries
        ("drive", struct.pack("<BBBQ", 0x56, 0, 6, 1) + bytes(40)),  # smallest block, wrong length
        ("drive", struct.pack("<BBBQ", 0x56, 2, 16, 1) + struct.pack("<I", 10) + bytes([0xFF]) + bytes(100)),  # Rice 63
        ("low_rank", struct.pack("<BHQH", 0x4C, 65535, 1, 2) + struct.pack("<B2I", 2, 2**31, 2**31)),
    ],
)
def test_forged_headers_fail_fast_without_huge_allocations(name: str, payload: bytes) -> None:
    started = time.perf_counter()
    _decode_or_wire_error(name, payload, 10)
    assert time.perf_counter() - started < 1.0
