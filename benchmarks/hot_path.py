"""Time the aggregator's hot path per update: wire decode -> validate -> accumulate.

For each codec an update of the cnn's size (215,370 parameters) is encoded once by a device-side
codec and framed; the benchmark then times, per repeat, the three stages the aggregator runs on
arrival (``sdk.wire.decode``, ``aggregator.validation.validate_update``, ``FedAvg.accumulate``)
with ``perf_counter_ns``, and numpy's ``acc += x`` on a float32 vector of the same size measured
in the same run. It prints the median per stage and two ratios: ``ratio`` = (float32 ``acc += x``) /
(whole path), and ``r64`` = (float64 ``acc64 += x``, the float32 update widened into a float64
accumulator) / (whole path). 1.0 would be the path running at the speed of that one numpy add.

Issue 14's goal (>= 0.5 for dense) uses ``ratio``, the float32 baseline: "numpy's ``acc += x`` on the
same vector" is an add of the float32 vector the device sent into an accumulator of its own dtype, the
cheapest pass that reads the update at all, so the goal is independent of how we choose to accumulate.
``r64`` is the ratio to ``acc64 += x`` (the update widened into a float64 accumulator), the cheapest pass
into float64 sums; the aggregator now sums float32 updates into float32 blocks flushed into float64 every
``aggregation.BLOCK_UPDATES`` updates, so its path can beat that pass (r64 > 1).

Then the ``sketch`` decode alone against the decoder issue 14 was filed against (9.6 ms per update then),
kept below as ``original_sketch_decode`` (commit 1e1d3aa: unpackbits + an integer matmul to unpack,
float64 dequantisation, ``np.stack`` butterflies): both timed in this run over the same payloads of one
vector (the original on format-1 payloads, the only format it reads), in alternating turns of
``--sketch-turn`` decodes each, their outputs compared, and the speed-up printed (issue 14's goal: >= 20x).

    python benchmarks/hot_path.py [--repeats 300] [--size 215370] [--codec SPEC ...] [--sketch-repeats 100]
                                  [--sketch-turn 5] [--sketch-payloads 8]
"""
from __future__ import annotations

import argparse
import math
import statistics
import struct
import sys
import time
from dataclasses import dataclass

import numpy as np
from scipy.linalg.blas import sdot, saxpy

from edgetrain.aggregator.aggregation import BLOCK_UPDATES
from edgetrain.aggregator.strategy import FedAvg
from edgetrain.aggregator.validation import ValidationContext, validate_update
from edgetrain.sdk import wire
from edgetrain.sdk.codecs import get_codec, parse_codec_spec
from edgetrain.sdk.codecs.hadamard import compiled_kernels
from edgetrain.sdk.codecs.params import read_params
from edgetrain.sdk.codecs.sketch import SketchCodec, encode_sketch
from edgetrain.sdk.wire.checksum import crc32

CNN_PARAMS = 215_370  # the default cnn's flat parameter count
DEFAULT_CODECS = ("dense", "q8", "fp16", "dgc:sparsity=0.99,momentum=0.0", "stc:sparsity=0.99", "sketch:bits=2")
DEVICE = "dev-0"
RUN_ID = "bench"


@dataclass(frozen=True)
class StageTimes:
    """Median nanoseconds per update of each stage, and of numpy's ``acc += x`` in the same run."""

    spec: str
    payload_bytes: int
    decode_ns: float
    validate_ns: float
    accumulate_ns: float
    numpy_add_ns: float
    numpy_add64_ns: float

    @property
    def total_ns(self) -> float:
        return self.decode_ns + self.validate_ns + self.accumulate_ns

    @property
    def ratio_to_numpy(self) -> float:
        return self.numpy_add_ns / self.total_ns

    @property
    def ratio_to_numpy64(self) -> float:
        return self.numpy_add64_ns / self.total_ns


@dataclass(frozen=True)
class PassTimes:
    """Median µs of the passes a dense update cannot skip, each alone on the same vector: the frame's CRC-32,
    the norm's ``sdot``, the accumulation's ``saxpy`` and the block flush (``acc64 += block``) per update."""

    crc_us: float
    sdot_us: float
    saxpy_us: float
    flush_per_update_us: float

    @property
    def total_us(self) -> float:
        return self.crc_us + self.sdot_us + self.saxpy_us + self.flush_per_update_us


def time_passes(vector: np.ndarray, frame: bytes, repeats: int) -> PassTimes:
    block, acc64 = np.zeros_like(vector), np.zeros(vector.size)

    def median_us(run: object) -> float:
        samples = []
        for _ in range(repeats):
            start = time.perf_counter_ns()
            run()  # type: ignore[operator]
            samples.append(time.perf_counter_ns() - start)
        return statistics.median(samples) / 1e3

    return PassTimes(median_us(lambda: crc32(frame)), median_us(lambda: sdot(vector, vector)),
                     median_us(lambda: saxpy(vector, block, a=3.0)),
                     median_us(lambda: acc64.__iadd__(block)) / BLOCK_UPDATES)


def make_frame(spec: str, vector: np.ndarray, update_id: str) -> bytes:
    """One framed Update carrying ``vector`` encoded with ``spec``."""
    name, params = parse_codec_spec(spec)
    payload, _ = get_codec(name).encode(vector, None, params)
    update = wire.Update(device_id=DEVICE, round_id=1, model_version=1, update_id=update_id, num_examples=100,
                         codec=spec, payload=payload, metrics={"train_loss": 0.5, "cpu_s": 1.0}, run_id=RUN_ID)
    return wire.encode(update)


def numpy_add_ns(vector: np.ndarray, repeats: int, accumulator_dtype: type = np.float32) -> float:
    """Median ns of ``acc += x`` with ``x`` = ``vector`` (float32) and ``acc`` of ``accumulator_dtype``."""
    acc = np.zeros(vector.size, dtype=accumulator_dtype)
    samples = []
    for _ in range(repeats):
        start = time.perf_counter_ns()
        acc += vector
        samples.append(time.perf_counter_ns() - start)
    return statistics.median(samples)


def time_codec(spec: str, vector: np.ndarray, repeats: int) -> StageTimes:
    """Median per-stage ns of ``repeats`` updates through decode -> validate -> accumulate."""
    frame = make_frame(spec, vector, "u0")
    strategy = FedAvg(fraction=1.0, min_devices=1)
    strategy.begin_round(np.zeros(vector.size, dtype=np.float32))
    decode_ns, validate_ns, accumulate_ns = [], [], []
    for i in range(repeats):
        # A fresh context each time: the path is what one new update costs, not the duplicate check.
        ctx = ValidationContext(round_id=1, model_version=1, selected=frozenset({DEVICE}), num_params=vector.size,
                                run_id=RUN_ID)
        t0 = time.perf_counter_ns()
        update = wire.decode(frame)
        t1 = time.perf_counter_ns()
        valid = validate_update(update, topic_device=DEVICE, ctx=ctx)
        t2 = time.perf_counter_ns()
        strategy.accumulate(valid.accumulable(), valid.num_examples, f"d{i}")
        t3 = time.perf_counter_ns()
        decode_ns.append(t1 - t0)
        validate_ns.append(t2 - t1)
        accumulate_ns.append(t3 - t2)
    return StageTimes(spec, len(frame), statistics.median(decode_ns), statistics.median(validate_ns),
                      statistics.median(accumulate_ns), numpy_add_ns(vector, repeats),
                      numpy_add_ns(vector, repeats, np.float64))


# ---- the sketch decoder as it was when issue 14 was filed (commit 1e1d3aa), the speed-up's reference ----

def _original_unpack_uint(data: bytes | memoryview, width: int, count: int) -> np.ndarray:
    raw = np.frombuffer(data, dtype=np.uint8)
    if width == 8:
        return raw.astype(np.uint64)
    bits = np.unpackbits(raw)
    if bits[count * width :].any():
        raise ValueError("packed field: non-zero padding bits")
    bits = bits[: count * width].reshape(count, width).astype(np.uint64)
    return bits @ np.left_shift(np.uint64(1), np.arange(width - 1, -1, -1, dtype=np.uint64))


def _original_walsh_hadamard(rows: np.ndarray) -> np.ndarray:
    """The original orthonormal FWHT: a dense H_32 matmul, then one ``np.stack`` butterfly per doubling."""
    count, n = rows.shape
    small = min(n, 32)
    h = np.ones((1, 1), dtype=np.float32)
    while h.shape[0] < small:
        h = np.block([[h, h], [h, -h]])
    x = (rows.astype(np.float32).reshape(-1, small) @ h).reshape(count, n)
    half = small
    while half < n:
        pairs = x.reshape(count, n // (2 * half), 2, half)
        first, second = pairs[:, :, 0, :], pairs[:, :, 1, :]
        x = np.stack([first + second, first - second], axis=2).reshape(count, n)
        half *= 2
    return x * np.float32(1.0 / math.sqrt(n))


def original_sketch_decode(data: bytes, size: int) -> np.ndarray:
    """``SketchCodec.decode`` of commit 1e1d3aa (same wire format), for the speed-up's baseline."""
    _, bits, log_block, rotate_on, keep, seed = struct.unpack_from("<BBBBdQ", data)
    block = 1 << log_block
    kept_at = np.arange(size) if keep >= 1.0 else np.flatnonzero(np.random.default_rng([seed, 1]).random(size) < keep)
    full, tail = divmod(kept_at.size, block)
    padded = (1 if tail <= 1 else 1 << (tail - 1).bit_length()) if tail else 0
    segments = full + (1 if tail else 0)
    ranges = np.frombuffer(data, dtype="<f4", count=2 * segments, offset=struct.calcsize("<BBBBdQ")).reshape(-1, 2)
    codes = _original_unpack_uint(memoryview(data)[struct.calcsize("<BBBBdQ") + 8 * segments :], bits,
                                  full * block + padded)
    signs = None
    if rotate_on:
        draws = np.random.default_rng([seed, 2]).integers(0, 2, size=full * block + padded, dtype=np.int8)
        signs = (2 * draws - 1).astype(np.float32)
    kept = np.empty(full * block + padded, dtype=np.float32)
    for start, r0, rows, width in [(0, 0, full, block)] + ([(full * block, full, 1, padded)] if tail else []):
        if rows == 0:
            continue
        part = (ranges[r0 : r0 + rows, 0:1].astype(np.float64) + codes[start : start + rows * width].reshape(rows, width)
                * ranges[r0 : r0 + rows, 1:2].astype(np.float64)).astype(np.float32)
        if signs is not None:
            part = _original_walsh_hadamard(part) * signs[start : start + rows * width].reshape(rows, width)
        kept[start : start + rows * width] = part.reshape(-1)
    out = np.zeros(size, dtype=np.float32)
    out[kept_at] = (kept[: kept_at.size].astype(np.float64) / keep).astype(np.float32)
    return out


@dataclass(frozen=True)
class SketchSpeedup:
    """Median ms of one decode: the original decoder on a format-1 payload (the only format it reads), the
    current decoder on the format-2 payload every encoder now sends and on the format-1 one; the current
    decode of the format-1 payload against the original's (max |difference| / max |value|); and each
    decode's error against the vector (relative L2), the two formats' rotations being different draws."""

    original_ms: float
    current_ms: float
    current_format1_ms: float
    format1_difference: float
    original_error: float
    current_error: float


def sketch_speedup(spec: str, vector: np.ndarray, repeats: int, payloads: int = 8, block: int = 5) -> SketchSpeedup:
    """Time the original and the current sketch decoder on ``payloads`` different payloads of ``vector``
    (seeds 0, 1, …), as an aggregator meets them: one decoder at a time over ``block`` consecutive
    payloads, the decoders alternating block by block (``repeats`` decodes each in all) so that both see
    the same load on a shared machine; medians."""
    name, params = parse_codec_spec(spec)
    codec = get_codec(name)
    current, format1 = [], []
    for seed in range(payloads):
        knobs = read_params(name, {**params, "seed": seed}, SketchCodec._knobs)
        current.append(encode_sketch(vector, knobs))
        format1.append(encode_sketch(vector, knobs, byte_signs=True))
    theirs = original_sketch_decode(format1[0], vector.size)
    ours, ours_format1 = codec.decode(current[0], vector.size, params), codec.decode(format1[0], vector.size, params)
    difference = float(np.max(np.abs(ours_format1.astype(np.float64) - theirs)) / np.max(np.abs(theirs)))
    decoders = {"original": (lambda data: original_sketch_decode(data, vector.size), format1),
                "current": (lambda data: codec.decode(data, vector.size, params), current),
                "format1": (lambda data: codec.decode(data, vector.size, params), format1)}
    samples: dict[str, list[int]] = {key: [] for key in decoders}
    for turn in range(-(-repeats // block)):
        for key, (decode, datas) in decoders.items():
            for i in range(block):
                data = datas[(turn * block + i) % payloads]
                start = time.perf_counter_ns()
                decode(data)
                samples[key].append(time.perf_counter_ns() - start)
    ms = {key: statistics.median(values) / 1e6 for key, values in samples.items()}
    norm = float(np.linalg.norm(vector))
    return SketchSpeedup(ms["original"], ms["current"], ms["format1"], difference,
                         float(np.linalg.norm(theirs - vector)) / norm, float(np.linalg.norm(ours - vector)) / norm)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=300, help="updates per codec (medians are reported)")
    parser.add_argument("--size", type=int, default=CNN_PARAMS, help="parameters per update")
    parser.add_argument("--codec", action="append", help="codec spec to time (repeatable; default: a set)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--sketch-repeats", type=int, default=100, help="decodes per sketch decoder (0: skip)")
    parser.add_argument("--sketch-turn", type=int, default=5,
                        help="consecutive decodes per decoder before the other's turn (1: alternate update by update)")
    parser.add_argument("--sketch-payloads", type=int, default=8, help="different payloads the decoders cycle through")
    args = parser.parse_args(argv)
    vector = (np.random.default_rng(args.seed).standard_normal(args.size) * 1e-2).astype(np.float32)
    print(f"hot path per update, {args.size} parameters, median of {args.repeats} (times in microseconds)")
    print(f"{'codec':34s} {'frame_B':>9s} {'decode':>8s} {'validate':>9s} {'accum':>8s} {'total':>8s} "
          f"{'np_add':>7s} {'np_add64':>8s} {'ratio':>6s} {'r64':>6s}")
    for spec in args.codec or DEFAULT_CODECS:
        t = time_codec(spec, vector, args.repeats)
        print(f"{spec:34s} {t.payload_bytes:9d} {t.decode_ns / 1e3:8.1f} {t.validate_ns / 1e3:9.1f} "
              f"{t.accumulate_ns / 1e3:8.1f} {t.total_ns / 1e3:8.1f} {t.numpy_add_ns / 1e3:7.1f} "
              f"{t.numpy_add64_ns / 1e3:8.1f} {t.ratio_to_numpy:6.3f} {t.ratio_to_numpy64:6.3f}")
    if "dense" in (args.codec or DEFAULT_CODECS):
        p = time_passes(vector, make_frame("dense", vector, "u0"), args.repeats)
        add_us = numpy_add_ns(vector, args.repeats) / 1e3
        print(f"dense passes alone: crc32 {p.crc_us:.1f}, sdot {p.sdot_us:.1f}, saxpy {p.saxpy_us:.1f}, block flush "
              f"per update {p.flush_per_update_us:.1f}; sum {p.total_us:.1f} us = {p.total_us / add_us:.2f}x the "
              f"numpy add ({add_us:.1f} us)")
    if args.sketch_repeats > 0:
        spec = "sketch:bits=2"
        kernels = "numba kernels" if compiled_kernels() is not None else "numpy only (numba not installed)"
        r = sketch_speedup(spec, vector, args.sketch_repeats, args.sketch_payloads, args.sketch_turn)
        print(f"{spec} decode alone, median of {args.sketch_repeats}, {kernels}, turns of {args.sketch_turn} over "
              f"{args.sketch_payloads} payload(s): original (1e1d3aa) "
              f"{r.original_ms:.2f} ms, now {r.current_ms:.3f} ms, speed-up {r.original_ms / r.current_ms:.1f}x; "
              f"now on a format-1 payload {r.current_format1_ms:.3f} ms ({r.original_ms / r.current_format1_ms:.1f}x, "
              f"max |difference| from the original {r.format1_difference:.1e} of max |value|); "
              f"relative L2 error original {r.original_error:.4f}, now {r.current_error:.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
