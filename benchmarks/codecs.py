"""Benchmark the update codecs on a real gradient and a real model delta.

A ~1.6M-parameter MLP (784-1024-768-10) is trained briefly on Fashion-MNIST (read with
``sdk.data``, nothing downloaded); the benchmark then takes one minibatch gradient and the delta
of a few further local SGD steps (what a federated device would send) and, per codec, prints bits
per parameter, compression ratio vs fp32, the excess over the entropy bound of the index set and
of the values (see ``sdk.codecs.entropy``), the relative error ``|x - x^| / |x|`` of one
encode/decode, and encode/decode throughput in MB/s of fp32 input.

    python benchmarks/codecs.py [--steps 100] [--local-steps 20] [--repeats 3] [--codec SPEC ...]
"""
from __future__ import annotations

import argparse
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np


from edgetrain.sdk.codecs import get_codec, parse_codec_spec
from edgetrain.sdk.codecs.entropy import PayloadBits, empirical_entropy_bits

HIDDEN = (1024, 768)
# torch Linear weights are (out, in); manifest order is weight, bias per layer.
MLP_SHAPES = f"{HIDDEN[0]}x784;{HIDDEN[0]};{HIDDEN[1]}x{HIDDEN[0]};{HIDDEN[1]};10x{HIDDEN[1]};10"
DEFAULT_CODECS = (
    "dense", "fp16", "q8", "q8:block=0",
    "dgc:sparsity=0.99,momentum=0.0", "dgc:sparsity=0.999,momentum=0.0",
    "stc:sparsity=0.99", "stc:sparsity=0.999",
    "sketch:bits=1", "sketch:bits=2", "sketch:bits=4,keep=0.25", "sketch:bits=2,rotate=false",
    "random_mask:keep=0.1", f"low_rank:rank=32,shapes={MLP_SHAPES}",
    "drive:feedback=false", "drive:feedback=false,unbiased=true", "drive:sparsity=0.99", "drive:sparsity=0.999",
)


@dataclass(frozen=True)
class CodecResult:
    """One codec on one vector."""

    spec: str
    bits_per_param: float
    ratio_vs_fp32: float
    payload_bytes: int
    index_bits_per_param: float
    index_bound_bits_per_param: float
    value_bits_per_param: float
    value_bound_bits_per_param: float
    relative_error: float
    encode_mb_per_s: float
    decode_mb_per_s: float


def real_vectors(steps: int, local_steps: int, batch: int, seed: int) -> dict[str, np.ndarray]:
    """(gradient, delta) of a 784-1024-768-10 MLP after ``steps`` SGD steps on Fashion-MNIST."""
    import torch

    from edgetrain.sdk.data import FASHION_MNIST_MEAN, FASHION_MNIST_STD, load_split, to_model_input

    torch.manual_seed(seed)
    data = load_split("train")
    images = torch.from_numpy(to_model_input(data.images, FASHION_MNIST_MEAN, FASHION_MNIST_STD)).flatten(1)
    labels = torch.from_numpy(data.labels)
    model = torch.nn.Sequential(torch.nn.Linear(784, HIDDEN[0]), torch.nn.ReLU(), torch.nn.Linear(*HIDDEN),
                                torch.nn.ReLU(), torch.nn.Linear(HIDDEN[1], 10))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    generator = torch.Generator().manual_seed(seed)

    def step(train: bool) -> None:
        index = torch.randint(0, len(labels), (batch,), generator=generator)
        optimizer.zero_grad()
        torch.nn.functional.cross_entropy(model(images[index]), labels[index]).backward()
        if train:
            optimizer.step()

    def flat(tensors: list[torch.Tensor]) -> np.ndarray:
        return torch.cat([t.detach().reshape(-1) for t in tensors]).numpy().astype(np.float32)

    for _ in range(steps):
        step(True)
    step(False)
    gradient = flat([p.grad for p in model.parameters()])
    start = flat(list(model.parameters()))
    for _ in range(local_steps):
        step(True)
    delta = flat(list(model.parameters())) - start
    print(f"MLP 784-{HIDDEN[0]}-{HIDDEN[1]}-10: {gradient.size:,} parameters; gradient after {steps} steps "
          f"(batch {batch}), delta of {local_steps} more local steps")
    return {"gradient": gradient, "delta": delta}


def measure(spec: str, vector: np.ndarray, repeats: int) -> CodecResult:
    name, params = parse_codec_spec(spec)
    codec = get_codec(name)
    encode_s, decode_s = [], []
    for _ in range(repeats):
        started = time.perf_counter()
        data, _ = codec.encode(vector, None, params)
        encode_s.append(time.perf_counter() - started)
        started = time.perf_counter()
        decoded = codec.decode(data, vector.size, params)
        decode_s.append(time.perf_counter() - started)
    if hasattr(codec, "account"):
        account = codec.account(data, vector.size)
    else:  # dense: raw float32 words
        account = PayloadBits(8 * len(data), 0, 0, 0.0, 8 * len(data),
                              empirical_entropy_bits(np.frombuffer(data, dtype="<u4")))
    n, megabytes = vector.size, vector.nbytes / 1e6
    error = float(np.linalg.norm((decoded - vector).astype(np.float64)) / np.linalg.norm(vector.astype(np.float64)))
    return CodecResult(spec, 8 * len(data) / n, 32 * n / (8 * len(data)), len(data), account.index_bits / n,
                       account.index_bound_bits / n, account.value_bits / n, account.value_bound_bits / n,
                       error, megabytes / min(encode_s), megabytes / min(decode_s))


def _excess(bits: float, bound: float) -> str:
    if bits == 0:
        return "-"
    if bound == 0:
        return "n/a"
    return f"{100 * (bits / bound - 1):+.1f}%"


def print_table(title: str, results: list[CodecResult]) -> None:
    print(f"\n{title}")
    header = (f"{'codec':34} {'bits/p':>8} {'x fp32':>8} {'idx b/p':>8} {'idx>H':>8} {'val b/p':>8} {'val>H':>8} "
              f"{'rel.err':>8} {'enc MB/s':>9} {'dec MB/s':>9}")
    print(header)
    print("-" * len(header))
    for r in results:
        print(f"{r.spec:34} {r.bits_per_param:8.4f} {r.ratio_vs_fp32:8.1f} {r.index_bits_per_param:8.4f} "
              f"{_excess(r.index_bits_per_param, r.index_bound_bits_per_param):>8} {r.value_bits_per_param:8.4f} "
              f"{_excess(r.value_bits_per_param, r.value_bound_bits_per_param):>8} {r.relative_error:8.4f} "
              f"{r.encode_mb_per_s:9.1f} {r.decode_mb_per_s:9.1f}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=100, help="SGD steps before the gradient is taken")
    parser.add_argument("--local-steps", type=int, default=20, help="local steps whose delta is measured")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3, help="timing: best of this many encodes/decodes")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--codec", action="append", help="codec spec (repeatable); default: a representative set")
    args = parser.parse_args(argv)
    vectors = real_vectors(args.steps, args.local_steps, args.batch, args.seed)
    for label, vector in vectors.items():
        results = [measure(spec, vector, args.repeats) for spec in (args.codec or DEFAULT_CODECS)]
        results = [replace(r, spec=r.spec.split(",shapes=")[0]) for r in results]  # keep the table narrow
        print_table(f"{label}: {vector.size:,} float32 ({vector.nbytes / 1e6:.2f} MB), one encode (no residual yet)",
                    results)
    print("\nidx>H / val>H: bits over the entropy bound (index set: log2 C(n,k); values: empirical entropy of "
          "the symbols sent). n/a: the mask travels as a 64-bit seed, no index bound applies.")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
