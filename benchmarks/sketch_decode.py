"""Where a sketch decode's time goes: header and range checks, the sign key, the compiled kernel, the rest.

Decodes ``--payloads`` different 2-bit sketch payloads (seeds 0, 1, …) of one vector of the cnn's size in a
loop, as an aggregator does, and prints the median µs of each step of ``SketchCodec.decode`` timed apart in
one loop, and of the whole decode in a second loop. Needs numba (the server extra) for the kernel line.

    python benchmarks/sketch_decode.py [--repeats 400] [--size 215370] [--payloads 8] [--bits 2]
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable

import numpy as np

from edgetrain.sdk.codecs import get_codec
from edgetrain.sdk.codecs.hadamard import compiled_kernels, sign_key
from edgetrain.sdk.codecs.params import check_size, read_params
from edgetrain.sdk.codecs.quant import check_ranges
from edgetrain.sdk.codecs.sketch import SketchCodec, encode_sketch

CNN_PARAMS = 215_370


def median_us(samples: list[int]) -> float:
    return statistics.median(samples) / 1e3


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=400)
    parser.add_argument("--size", type=int, default=CNN_PARAMS)
    parser.add_argument("--payloads", type=int, default=8)
    parser.add_argument("--bits", type=int, default=2)
    args = parser.parse_args(argv)
    kernels = compiled_kernels()
    if kernels is None:
        print("numba is not installed: nothing compiled to time")
        return 1
    codec = get_codec("sketch")
    vector = (np.random.default_rng(0).standard_normal(args.size) * 1e-2).astype(np.float32)
    payloads = [encode_sketch(vector, read_params("sketch", {"bits": args.bits, "seed": seed}, SketchCodec._knobs))
                for seed in range(args.payloads)]
    codec.decode(payloads[0], args.size, {})  # compile, or load the cached kernels
    samples: dict[str, list[int]] = {}

    def timed(step: str, run: Callable[[], object]) -> object:
        start = time.perf_counter_ns()
        result = run()
        samples.setdefault(step, []).append(time.perf_counter_ns() - start)
        return result

    for i in range(args.repeats):
        data = payloads[i % args.payloads]
        payload = timed("header, layout, ranges", lambda: (
            read_params("sketch", {}, SketchCodec._knobs), check_size("sketch", args.size),
            codec._parse(data, args.size))[-1])
        timed("range check", lambda: check_ranges("sketch", payload.ranges[:, 0], payload.ranges[:, 1]))
        kept = np.empty(payload.values, dtype=np.float32)
        key = timed("sign key", lambda: np.uint64(sign_key(payload.seed, 2)))  # the kernel derives the words
        layout = payload.layout
        timed("kernel (unpack, transform, scale, signs)", lambda: kernels.unrotate(
            payload.packed, args.bits, kernels.two_bit_table_cached(), kept, layout.kernel_table,
            payload.ranges.astype(np.float64), payload.keep, key))
    for i in range(args.repeats):  # apart: with the steps' arrays beside it the working set would be twice a decode's
        data = payloads[i % args.payloads]
        timed("whole decode", lambda: codec.decode(data, args.size, {}))
    print(f"sketch:bits={args.bits} decode of {args.size} values, {args.payloads} payloads in a loop, "
          f"median of {args.repeats} (µs)")
    for step, values in samples.items():
        print(f"{step:42s} {median_us(values):8.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
