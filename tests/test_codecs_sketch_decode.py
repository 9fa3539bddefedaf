"""The sketch decoder against a float64 reference written straight from the format (Konečný et al. 2016):
the fast decoder (integer codes transformed exactly, one rounding per value) must stay within float32
rounding of it, for every bit width, mask, block and rotation setting, in both formats (1: one sign per
generator byte, tag 0x53; 2: one per generator bit, tag 0x73) and on both paths (compiled kernels where
numba is installed, numpy)."""
from __future__ import annotations

import math
import struct
import subprocess
import sys

import numpy as np
import pytest

from edgetrain.sdk.codecs import get_codec, sketch
from edgetrain.sdk.codecs.hadamard import random_signs
from edgetrain.sdk.codecs.bitio import pack_uint
from edgetrain.sdk.codecs.params import read_params
from edgetrain.sdk.codecs.sketch import SketchCodec, encode_sketch, seeded_mask
from edgetrain.sdk.errors import WireError

_HEADER = struct.Struct("<BBBBdQ")  # tag, bits, log2(block), rotate, keep, seed (sdk/codecs/sketch.py)
_F32_EPS = float(np.finfo(np.float32).eps)


def _fwht64(rows: np.ndarray) -> np.ndarray:
    """Orthonormal Walsh-Hadamard transform of each row, float64, textbook butterflies."""
    x = rows.astype(np.float64).copy()
    count, n = x.shape
    half = 1
    while half < n:
        pairs = x.reshape(count, n // (2 * half), 2, half)
        first, second = pairs[:, :, 0, :].copy(), pairs[:, :, 1, :].copy()
        pairs[:, :, 0, :], pairs[:, :, 1, :] = first + second, first - second
        half *= 2
    return x / math.sqrt(n)


def _reference_signs(tag: int, seed: int, total: int) -> np.ndarray:
    """D's diagonal as each format defines it, from numpy's documented generator calls."""
    if tag == 0x53:  # format 1: 2 * integers(0, 2, int8) - 1
        return (2 * np.random.default_rng([seed, 2]).integers(0, 2, total, dtype=np.int8) - 1).astype(np.float64)
    assert tag == 0x73  # format 2: bit i % 64 of SplitMix64 word i // 64 from mix(seed) ^ stream, set = +1
    words = _splitmix64(_mix(seed) ^ 2, -(-total // 64))
    bits = [(words[i // 64] >> (i % 64)) & 1 for i in range(total)]
    return 2.0 * np.array(bits, dtype=np.float64) - 1.0


def _mix(z: int) -> int:
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) % 2**64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) % 2**64
    return z ^ (z >> 31)


def _splitmix64(state: int, count: int) -> list[int]:
    out = []
    for _ in range(count):
        state = (state + 0x9E3779B97F4A7C15) % 2**64
        out.append(_mix(state))
    return out


def _reference_decode(payload: bytes, size: int) -> np.ndarray:
    """The sketch payload decoded in float64 from the format's definition (rounded to float32 once)."""
    tag, bits, log_block, rotate_on, keep, seed = _HEADER.unpack_from(payload)
    block = 1 << log_block
    kept_at = seeded_mask(seed, size, keep)
    full, tail = divmod(kept_at.size, block)
    widths = [block] * full + ([1 << (tail - 1).bit_length() if tail > 1 else 1] if tail else [])
    ranges = np.frombuffer(payload, "<f4", 2 * len(widths), _HEADER.size).reshape(-1, 2).astype(np.float64)
    bitstream = np.unpackbits(np.frombuffer(payload, np.uint8, offset=_HEADER.size + 8 * len(widths)))
    total = sum(widths)
    codes = bitstream[: total * bits].reshape(total, bits) @ (1 << np.arange(bits - 1, -1, -1))
    signs = _reference_signs(tag, seed, total) if rotate_on else None
    values, start = [], 0
    for (lo, step), width in zip(ranges, widths):
        part = lo + codes[start : start + width] * step
        if signs is not None:
            part = _fwht64(part[None, :])[0] * signs[start : start + width]
        values.append(part)
        start += width
    out = np.zeros(size)
    out[kept_at] = np.concatenate(values)[: kept_at.size] / keep
    return out


_SHAPES = [
    (1.0, 1 << 16, True, 215_370),  # the default: three full blocks and a padded tail
    (0.3, 1 << 10, True, 20_011),
    (1.0, 1 << 12, True, 4_096 + 100),  # a kernel-sized block and a tail too short for the kernels (128)
    (1.0, 1 << 17, True, 150_000),  # wider than 2**16: more row stages than one pass, code sums past 2**24
    (1.0, 16, True, 1),
    (0.7, 64, False, 1_000),
]


@pytest.mark.parametrize("byte_signs", [False, True], ids=["format2", "format1"])
@pytest.mark.parametrize("bits", range(1, 9))
@pytest.mark.parametrize("keep,block,rotate,size", _SHAPES)
def test_decode_is_within_float32_rounding_of_the_float64_reference(bits: int, keep: float, block: int,
                                                                   rotate: bool, size: int, byte_signs: bool) -> None:
    rng = np.random.default_rng(bits)
    vector = (rng.standard_normal(size) * rng.uniform(1e-4, 1e-1, size)).astype(np.float32)
    params = {"bits": bits, "keep": keep, "block": block, "rotate": rotate, "seed": 1234 + bits}
    codec = get_codec("sketch")
    payload = encode_sketch(vector, read_params("sketch", params, SketchCodec._knobs), byte_signs=byte_signs)
    assert payload[0] == (0x53 if byte_signs else 0x73)
    got = codec.decode(payload, size, params)
    expected = _reference_decode(payload, size)
    assert got.dtype == np.float32 and got.shape == (size,)
    # A few float32 roundings per value; the floor covers values that cancel to ~0 in float64.
    np.testing.assert_allclose(got, expected, rtol=4 * _F32_EPS, atol=4 * _F32_EPS * 1e-3 * np.abs(expected).max())


@pytest.mark.parametrize("n", [1, 7, 8, 9, 63, 1000, 229_376])
@pytest.mark.parametrize("seed", [0, 1, 2**62 + 12345])
def test_random_signs_are_the_int8_integer_stream_both_ends_agree_on(seed: int, n: int) -> None:
    """The wire's sign convention: 2 * default_rng([seed, stream]).integers(0, 2, n, int8) - 1. An encoder
    on another version draws them that way; a faster derivation must give exactly the same signs."""
    expected = 2 * np.random.default_rng([seed, 2]).integers(0, 2, size=n, dtype=np.int8) - 1
    np.testing.assert_array_equal(random_signs(seed, 2, n), expected.astype(np.float32))


@pytest.mark.parametrize("bits", [1, 2, 3, 8])
@pytest.mark.parametrize("keep,block,rotate,size", _SHAPES)
def test_the_numpy_path_gives_the_same_bits_as_the_compiled_kernels(bits: int, keep: float, block: int, rotate: bool,
                                                                  size: int, monkeypatch: pytest.MonkeyPatch) -> None:
    """A board without numba decodes exactly what the aggregator does: the kernels repeat numpy's float
    operations (exact integer transform, one float32 multiply, the first entry in float64, sign flips)."""
    pytest.importorskip("numba")
    vector = (np.random.default_rng(bits).standard_normal(size) * 1e-2).astype(np.float32)
    params = {"bits": bits, "keep": keep, "block": block, "rotate": rotate, "seed": 99}
    codec = get_codec("sketch")
    payload, _ = codec.encode(vector, None, params)
    assert sketch.compiled_kernels() is not None
    compiled = codec.decode(payload, size, params)
    monkeypatch.setattr(sketch, "compiled_kernels", lambda: None)
    numpy_only = codec.decode(payload, size, params)
    np.testing.assert_array_equal(compiled.view(np.uint32), numpy_only.view(np.uint32))


def test_a_failing_kernel_falls_back_to_numpy_for_good(monkeypatch: pytest.MonkeyPatch) -> None:
    """numba failing on some platform costs speed, never an update or the aggregator."""
    pytest.importorskip("numba")
    from edgetrain.sdk.codecs import hadamard

    switch = hadamard._CompiledKernels()
    monkeypatch.setattr(hadamard, "_KERNELS", switch)
    module = switch.get()
    assert module is not None

    def broken(*args: object) -> None:
        raise RuntimeError("cannot compile here")

    monkeypatch.setattr(module, "unrotate", broken)
    vector = (np.random.default_rng(5).standard_normal(5_000) * 1e-2).astype(np.float32)
    codec = get_codec("sketch")
    payload, _ = codec.encode(vector, None, {"bits": 2, "block": 1024})
    decoded = codec.decode(payload, vector.size, {})
    assert switch.get() is None  # off for good
    monkeypatch.setattr(sketch, "compiled_kernels", lambda: None)
    np.testing.assert_array_equal(decoded, codec.decode(payload, vector.size, {}))


_WARM_UP_CHECK = """
import numpy as np
from edgetrain.sdk.codecs import get_codec, sketch, warm_up_decoder
warm_up_decoder("sketch:bits={bits}")
kernels = sketch.compiled_kernels()
count = len(kernels.unrotate.signatures)
vector = np.random.default_rng(0).standard_normal(215_370).astype(np.float32)
codec = get_codec("sketch")
codec.decode(codec.encode(vector, None, {{"bits": {bits}}})[0], vector.size, {{}})
print(count, len(kernels.unrotate.signatures))
"""


@pytest.mark.parametrize("bits", [2, 3])
def test_warm_up_compiles_exactly_what_a_real_update_then_uses(bits: int) -> None:
    """In a fresh process: after ``warm_up_decoder``, decoding a real update compiles nothing more (the
    warm-up hit the same kernel and argument types), so round 1 pays no compile."""
    pytest.importorskip("numba")
    result = subprocess.run([sys.executable, "-c", _WARM_UP_CHECK.format(bits=bits)], capture_output=True,
                            text=True, timeout=300, check=True)
    assert result.stdout.split() == ["1", "1"]


def test_warm_up_accepts_every_valid_spec() -> None:
    for params in ({"bits": 2}, {"bits": 3, "keep": 0.1}, {"rotate": False}, {"bits": 2, "block": 16}):
        get_codec("sketch").warm_up(params)


@pytest.mark.parametrize("bits", [1, 3, 5, 7])
def test_padding_bits_are_refused_when_kernels_decode_the_blocks(bits: int) -> None:
    """One valid encoding per payload: set padding bits make it undecodable. A 256-value block (the kernels')
    and a 3-value tail padded to 4: 260 odd-width codes leave 4 spare bits in the last byte."""
    vector = np.random.default_rng(bits).standard_normal(259).astype(np.float32)
    codec = get_codec("sketch")
    params = {"bits": bits, "block": 256}
    payload, _ = codec.encode(vector, None, params)
    codec.decode(payload, vector.size, params)
    corrupt = payload[:-1] + bytes([payload[-1] | 1])
    with pytest.raises(WireError, match="padding"):
        codec.decode(corrupt, vector.size, params)


def test_rows_whose_code_sum_passes_2_to_24_count_it_exactly_on_both_paths(monkeypatch: pytest.MonkeyPatch) -> None:
    """A 2**18-value 8-bit block: its code sum passes 2**24, where float32 sums round. Both paths count it in
    integers (the kernels from the packed bytes, numpy from the codes), so they still agree bit for bit, and
    the first value is the float64 formula's."""
    pytest.importorskip("numba")
    size = 1 << 18
    vector = np.random.default_rng(18).standard_normal(size).astype(np.float32)
    params = {"bits": 8, "block": size, "seed": 5}
    codec = get_codec("sketch")
    payload, _ = codec.encode(vector, None, params)
    compiled = codec.decode(payload, size, params)
    monkeypatch.setattr(sketch, "compiled_kernels", lambda: None)
    numpy_only = codec.decode(payload, size, params)
    np.testing.assert_array_equal(compiled.view(np.uint32), numpy_only.view(np.uint32))
    parsed = codec._parse(payload, size)
    code_sum = int(parsed.codes().sum(dtype=np.int64))
    assert code_sum >= 1 << 24
    lo, step = (float(v) for v in parsed.ranges[0])
    first = np.float32((lo * size + step * code_sum) / np.sqrt(size)) * np.float32(_reference_signs(0x73, 5, 1)[0])
    assert compiled[0] == first


@pytest.mark.parametrize("bits", [2, 3, 8])
def test_the_kernels_code_sum_counts_every_code(bits: int) -> None:
    """The kernels' integer code sum (used for rows whose sum may pass 2**24) against numpy's unpack."""
    numba = pytest.importorskip("numba")
    kernels = sketch.compiled_kernels()
    assert kernels is not None
    code_sum = numba.njit(lambda packed, width, start, count: kernels._code_sum(packed, width, start, count))
    codes = np.random.default_rng(bits).integers(0, 1 << bits, 4096)
    packed = np.frombuffer(pack_uint(codes, bits), dtype=np.uint8)
    assert code_sum(packed, bits, 0, 4096) == int(codes.sum())
    assert code_sum(packed, bits, 256, 1024) == int(codes[256:1280].sum())
