"""The codec seam: registry, spec parsing, and the dense (raw float32 little-endian) codec."""
from __future__ import annotations

import struct

import numpy as np
import pytest

import edgetrain.sdk.codecs as codecs
from edgetrain.sdk.codecs import (check_codec_spec, codec_names, format_codec_spec, get_codec, parse_codec_spec, register,
                        with_layout)
from edgetrain.sdk.errors import ConfigError, WireError


@pytest.fixture
def dense() -> codecs.Codec:
    return get_codec("dense")


def test_dense_round_trip_is_bit_exact_including_special_values(dense: codecs.Codec) -> None:
    rng = np.random.default_rng(0)
    special = np.array([np.nan, np.inf, -np.inf, -0.0, 0.0, np.float32(1e-45), np.finfo(np.float32).max],
                       dtype=np.float32)
    vector = np.concatenate([rng.standard_normal(1000).astype(np.float32), special])
    data, state = dense.encode(vector, None, {})
    decoded = dense.decode(data, vector.size, {})
    assert state is None
    assert decoded.dtype == np.float32 and decoded.shape == vector.shape
    assert np.array_equal(decoded.view(np.uint32), vector.view(np.uint32))  # bit for bit, NaN and -0.0 too
    assert dense.lossless is True and dense.name == "dense"


def test_dense_bytes_are_little_endian_float32(dense: codecs.Codec) -> None:
    vector = np.array([1.5, -2.25, 3e7], dtype=np.float32)
    data, _ = dense.encode(vector, None, {})
    assert len(data) == 12
    assert struct.unpack("<3f", data) == tuple(float(x) for x in vector)
    # A big-endian source array encodes to the same little-endian bytes.
    data_from_big_endian, _ = dense.encode(vector.astype(">f4"), None, {})
    assert data_from_big_endian == data


def test_dense_decode_returns_writable_copy(dense: codecs.Codec) -> None:
    data = bytes(struct.pack("<2f", 1.0, 2.0))
    decoded = dense.decode(data, 2, {})
    assert decoded.flags.writeable
    decoded[0] = 7.0
    assert struct.unpack("<2f", data) == (1.0, 2.0)
    assert decoded.tolist() == [7.0, 2.0]


def test_dense_empty_vector(dense: codecs.Codec) -> None:
    data, _ = dense.encode(np.zeros(0, dtype=np.float32), None, {})
    assert data == b""
    assert dense.decode(b"", 0, {}).shape == (0,)


def test_dense_state_passes_through_unchanged(dense: codecs.Codec) -> None:
    state = {"residual": np.ones(3, dtype=np.float32)}
    _, new_state = dense.encode(np.zeros(3, dtype=np.float32), state, {})
    assert new_state is state


@pytest.mark.parametrize("size_delta", [-1, 1])
def test_dense_wrong_length_raises_wire_error(dense: codecs.Codec, size_delta: int) -> None:
    data, _ = dense.encode(np.arange(10, dtype=np.float32), None, {})
    with pytest.raises(WireError, match=rf"40 bytes for {10 + size_delta} float32 values"):
        dense.decode(data, 10 + size_delta, {})
    with pytest.raises(WireError, match="dense codec"):
        dense.decode(data[:-1], 10, {})


@pytest.mark.parametrize("bad_size", [-1, 2.5, True])
def test_dense_bad_size_raises_wire_error(dense: codecs.Codec, bad_size: object) -> None:
    with pytest.raises(WireError, match="size"):
        dense.decode(b"", bad_size, {})  # type: ignore[arg-type]


@pytest.mark.parametrize("vector", [np.zeros(3, dtype=np.float64), np.zeros((2, 2), dtype=np.float32), [1.0, 2.0]])
def test_dense_encode_refuses_non_flat_float32(dense: codecs.Codec, vector: object) -> None:
    with pytest.raises(WireError, match="1-D float32"):
        dense.encode(vector, None, {})  # type: ignore[arg-type]


def test_registry_knows_dense_and_rejects_unknown_names() -> None:
    assert "dense" in codec_names()
    assert isinstance(get_codec("dense"), codecs.DenseCodec)
    with pytest.raises(WireError, match=r"unknown codec 'nope'.*dense"):
        get_codec("nope")


class _IdentityCodec:
    name = "identity-test"
    lossless = True

    def encode(self, vector, state, params):  # type: ignore[no-untyped-def]
        return vector.tobytes(), state

    def decode(self, data, size, params):  # type: ignore[no-untyped-def]
        return np.frombuffer(data, dtype=np.float32).copy()


def test_register_adds_codec_and_refuses_conflicts(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(codecs, "_REGISTRY", dict(codecs._REGISTRY))  # keep the global registry clean
    codec = _IdentityCodec()
    register(codec)
    register(codec)  # same object again: harmless
    assert get_codec("identity-test") is codec
    assert codec_names() == tuple(sorted(codec_names())) and "identity-test" in codec_names()
    with pytest.raises(ConfigError, match="already registered"):
        register(_IdentityCodec())
    with pytest.raises(ConfigError, match="not a codec"):
        register(object())  # type: ignore[arg-type]
    bad_name = _IdentityCodec()
    bad_name.name = "has:colon"
    with pytest.raises(ConfigError, match="invalid"):
        register(bad_name)


@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        ("dense", ("dense", {})),
        ("  dense  ", ("dense", {})),
        ("topk:ratio=0.01", ("topk", {"ratio": 0.01})),
        ("dgc:ratio=0.001, momentum=0.9,warmup=4,ef=true,mode=abs",
         ("dgc", {"ratio": 0.001, "momentum": 0.9, "warmup": 4, "ef": True, "mode": "abs"})),
        ("q8:stochastic=False", ("q8", {"stochastic": False})),
    ],
)
def test_parse_codec_spec(spec: str, expected: tuple[str, dict]) -> None:
    name, params = parse_codec_spec(spec)
    assert (name, params) == expected
    assert all(type(params[k]) is type(v) for k, v in expected[1].items())  # 4 stays int, True stays bool


@pytest.mark.parametrize(
    "spec", ["", ":k=1", "dense:", "dense:k", "dense:k=", "dense:=1", "dense:k=1,k=2", "dense:1k=2",
             "dense:k=1,", "bad name:k=1", "a,b"]
)
def test_parse_codec_spec_rejects_bad_syntax(spec: str) -> None:
    with pytest.raises(ConfigError, match="codec spec"):
        parse_codec_spec(spec)


@pytest.mark.parametrize("params", [{}, {"ratio": 0.01, "k": 5, "ef": True, "mode": "abs"}, {"tiny": 1e-300}])
def test_format_codec_spec_round_trips(params: dict) -> None:
    assert parse_codec_spec(format_codec_spec("topk", params)) == ("topk", params)


def test_format_codec_spec_refuses_unwritable_values() -> None:
    with pytest.raises(ConfigError):
        format_codec_spec("topk", {"mode": "a,b"})
    with pytest.raises(ConfigError):
        format_codec_spec("bad:name")


# -- specs checked before any data is encoded ------------------------------------------------------
@pytest.mark.parametrize(("spec", "message"), [
    ("dgc:sparsity=2", "sparsity=2.0 must be in \\(0, 1\\)"),
    ("dgc:sparsty=0.9", "unknown parameter\\(s\\) sparsty"),
    ("q8:bits=x", "bits"),
    ("dense:level=3", "unknown parameter\\(s\\) level"),
    ("zstd", "unknown codec 'zstd'"),
    ("dgc:", "must be followed by key=value"),
])
def test_check_codec_spec_refuses_a_bad_spec_with_config_error(spec: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        check_codec_spec(spec)


def test_check_codec_spec_accepts_good_specs_and_low_rank_without_shapes() -> None:
    assert check_codec_spec("dgc:sparsity=0.99,momentum=0") == ("dgc", {"sparsity": 0.99, "momentum": 0})
    assert check_codec_spec("low_rank:rank=4") == ("low_rank", {"rank": 4})  # shapes come from the model


def test_with_layout_gives_low_rank_the_model_shapes_and_leaves_others_alone() -> None:
    shapes = [(8, 1, 3, 3), (8,), (10, 72), ()]
    filled = with_layout("low_rank", {"rank": 2}, shapes)
    assert filled == {"rank": 2, "shapes": "8x1x3x3;8;10x72;1"}
    assert with_layout("low_rank", {"shapes": "4x4"}, shapes) == {"shapes": "4x4"}  # the spec's own wins
    assert with_layout("dgc", {"sparsity": 0.9}, shapes) == {"sparsity": 0.9}
    vector = np.random.default_rng(0).normal(size=8 * 9 + 8 + 720 + 1).astype(np.float32)
    payload, _ = get_codec("low_rank").encode(vector, None, filled)
    assert get_codec("low_rank").decode(payload, vector.size, filled).shape == vector.shape


def test_codec_spec_is_parsed_once_into_a_checked_canonical_value() -> None:
    from edgetrain.sdk.codecs import CodecSpec
    from edgetrain.sdk.errors import UnknownCodec

    spec = CodecSpec.parse("dgc: sparsity=0.99 , momentum=0")
    assert (spec.name, spec.params) == ("dgc", {"sparsity": 0.99, "momentum": 0})
    assert str(spec) == "dgc:momentum=0,sparsity=0.99" and CodecSpec.parse(str(spec)) == spec
    assert CodecSpec.parse(spec) is spec
    with pytest.raises(ConfigError, match="unknown parameter.*x"):
        CodecSpec.parse("dense:x=1")
    with pytest.raises(ConfigError, match="bits=9"):
        CodecSpec.parse("sketch:bits=9")
    with pytest.raises(UnknownCodec, match="unknown codec 'zstd'"):
        CodecSpec.parse("zstd")
