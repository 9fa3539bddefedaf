"""The benchmark itself: step latency, throughput, memory, CPU time, codec cost and bytes, energy.

Runtime-generic (everything goes through ``sdk.runtime``'s seam), so it never imports torch itself.
Steps run inside one ``Runtime.train`` call fed by a generator that stamps each batch request:
the time between two requests is one step, with momentum kept across steps as in real training.
"""
from __future__ import annotations

import resource
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from itertools import pairwise
from pathlib import Path
from typing import Any

import numpy as np

from edgetrain.sdk import wire
from edgetrain.sdk.cli_args import limit_threads
from edgetrain.sdk.codecs import format_codec_spec, get_codec, parse_codec_spec
from edgetrain.sdk.data import load_split, to_model_input
from edgetrain.sdk.device_metrics import peak_rss_mb
from edgetrain.sdk.energy.meter import EnergyMeter
from edgetrain.sdk.errors import ConfigError
from edgetrain.sdk.runtime import TrainConfig, load_runtime


MAX_BATCH_POOL = 32  # distinct batches kept in memory; steps cycle over them
FALLBACK_LR = 0.01


@dataclass(frozen=True)
class BenchConfig:
    bundle: Path
    steps: int = 50
    warmup: int = 5
    batch_size: int | None = None
    mode: str = "train"  # train: SGD steps (FL); gradient: gradient only (large-batch workers)
    codec: str = "dense"
    codec_repeats: int = 5
    synthetic: bool = False
    data_dir: Path | None = None
    seed: int = 0
    idle_s: float = 2.0
    threads: int | None = None  # intra-op threads of the runtime's library

    def __post_init__(self) -> None:
        if self.steps < 1 or self.warmup < 0 or self.codec_repeats < 1:
            raise ConfigError(f"need steps >= 1, warmup >= 0, codec repeats >= 1 (got {self.steps}, "
                              f"{self.warmup}, {self.codec_repeats})")
        if self.mode not in ("train", "gradient"):
            raise ConfigError(f"--mode {self.mode!r}: expected train or gradient")
        if self.idle_s < 0:
            raise ConfigError(f"--idle-s must be >= 0, got {self.idle_s}")


@dataclass(frozen=True)
class LatencyStats:
    count: int
    mean_s: float
    p50_s: float
    p90_s: float
    p95_s: float
    p99_s: float
    max_s: float

    @classmethod
    def of(cls, samples_s: list[float]) -> LatencyStats:
        values = np.asarray(samples_s, dtype=np.float64)
        p50, p90, p95, p99 = np.percentile(values, [50, 90, 95, 99])
        return cls(len(values), float(values.mean()), float(p50), float(p90), float(p95), float(p99),
                   float(values.max()))


@dataclass(frozen=True)
class CodecStats:
    spec: str
    encode: LatencyStats
    decode: LatencyStats
    payload_bytes: int
    frame_bytes: int  # the whole wire frame of an Update carrying the payload
    dense_bytes: int  # 4 bytes per parameter: what the dense codec would send
    compression_ratio: float  # dense_bytes / payload_bytes


def rss_bytes() -> int | None:
    """Current resident set size (psutil where installed, else /proc/self/statm)."""
    try:
        import psutil

        return int(psutil.Process().memory_info().rss)
    except ImportError:
        try:
            pages = int(Path("/proc/self/statm").read_text().split()[1])
            return pages * resource.getpagesize()
        except (OSError, ValueError, IndexError):
            return None


def peak_rss_bytes() -> int:
    """The process's own lifetime peak RSS (see ``sdk.device_metrics.peak_rss_mb``)."""
    return int(peak_rss_mb() * 2**20)


def make_batches(config: BenchConfig, manifest: Any, batch_size: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """A small pool of model-ready batches: real Fashion-MNIST, or random with ``synthetic``."""
    rng = np.random.default_rng(config.seed)
    count = min(MAX_BATCH_POOL, config.warmup + config.steps)
    if config.synthetic:
        return [(rng.standard_normal((batch_size, *manifest.input_shape)).astype(np.float32),
                 rng.integers(0, manifest.num_classes, batch_size).astype(np.int64)) for _ in range(count)]
    train = load_split("train", data_dir=config.data_dir)
    count = min(count, len(train) // batch_size)
    if count < 1:
        raise ConfigError(f"the train split has {len(train)} examples, fewer than one batch of {batch_size}")
    order = rng.permutation(len(train))[: count * batch_size].reshape(count, batch_size)
    return [(to_model_input(train.images[idx], manifest.input_mean, manifest.input_std), train.labels[idx])
            for idx in order]


def _timed_steps(runtime: Any, batches: list[tuple[np.ndarray, np.ndarray]], config: BenchConfig,
                 meter: EnergyMeter, clock: Callable[[], float]) -> tuple[list[float], float, np.ndarray | None]:
    """Run warm-up + timed steps; the step latencies (timed ones only), CPU seconds, last gradient."""

    total = config.warmup + config.steps
    stamps: list[float] = []
    cpu_edges: list[float] = []  # process CPU seconds at the start and end of the timed steps

    def edge(k: int) -> None:
        # called when step k starts (k == total: after the last step)
        if k > config.warmup:
            meter.end_window("step")
        if k == config.warmup:
            if k > 0:
                meter.end_window("warmup")
            cpu_edges.append(time.process_time())
            meter.begin_window("train")
        if k == total:
            meter.end_window("train")
            cpu_edges.append(time.process_time())
        elif k >= config.warmup:
            meter.begin_window("step")
        stamps.append(clock())

    def stream() -> Iterator[tuple[np.ndarray, np.ndarray]]:
        for k in range(total):
            edge(k)
            yield batches[k % len(batches)]

    opt = runtime.manifest.optimizer
    gradient = None
    if config.warmup > 0:  # from here: the runtime's first-call setup (optimiser, lazy imports) is warm-up
        meter.begin_window("warmup")
    if config.mode == "train":
        runtime.train(stream(), TrainConfig(lr=float(opt.get("lr", FALLBACK_LR)),
                                            momentum=float(opt.get("momentum", 0.0))))
    else:
        for x, y in stream():
            gradient = runtime.gradient(x, y).gradient
    edge(total)
    cpu_s = cpu_edges[1] - cpu_edges[0]
    steps_s = [b - a for a, b in pairwise(stamps)][config.warmup:]
    return steps_s, cpu_s, gradient


def measure_codec(spec: str, update: np.ndarray, repeats: int, meter: EnergyMeter) -> tuple[CodecStats, bytes]:
    """Encode/decode ``update`` ``repeats`` times (codec state threaded through, as on a device);
    the stats and the wire frame of an Update carrying the last payload."""

    name, params = parse_codec_spec(spec)
    codec = get_codec(name)
    encode_s, decode_s = [], []
    state = None
    payload = b""
    for _ in range(repeats):
        meter.begin_window("encode")
        started = time.perf_counter()
        payload, state = codec.encode(update, state, params)
        encode_s.append(time.perf_counter() - started)
        meter.end_window("encode")
        started = time.perf_counter()
        codec.decode(payload, update.size, params)
        decode_s.append(time.perf_counter() - started)
    frame = wire.encode(wire.Update(device_id="bench", round_id=0, model_version=0, update_id="bench-0",
                                    num_examples=0, codec=format_codec_spec(name, params), payload=payload,
                                    metrics={}, run_id="bench"))
    stats = CodecStats(format_codec_spec(name, params), LatencyStats.of(encode_s), LatencyStats.of(decode_s),
                       len(payload), len(frame), 4 * update.size, 4 * update.size / max(len(payload), 1))
    return stats, frame


def run_benchmark(config: BenchConfig, meter: EnergyMeter,
                  broker_probe: Callable[[bytes, EnergyMeter], dict[str, Any]] | None = None,
                  clock: Callable[[], float] = time.monotonic, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Everything but the context and the power figures, as plain JSON-able values."""

    rss_start = rss_bytes()
    started = time.perf_counter()
    runtime = load_runtime(config.bundle)
    load_s = time.perf_counter() - started
    limit_threads(runtime, config.threads)
    manifest = runtime.manifest
    fixed = manifest.fixed_batch_size
    if fixed is not None and config.batch_size not in (None, fixed):
        raise ConfigError(f"--batch {config.batch_size}: this bundle was exported for batch size {fixed} only")
    batch_size = fixed or config.batch_size or 32
    batches = make_batches(config, manifest, batch_size)
    rss_loaded = rss_bytes()
    log(f"bundle {config.bundle}: {manifest.model} on {manifest.runtime}, {manifest.num_params:,} parameters; "
        f"{config.mode} x {config.steps} steps after {config.warmup} warm-up, batch {batch_size}, "
        f"{'synthetic' if config.synthetic else 'Fashion-MNIST'} data")

    meter.start()
    if config.idle_s > 0 and meter.source is not None:
        meter.measure_idle(config.idle_s)
    before = runtime.get_parameters()
    steps_s, cpu_s, gradient = _timed_steps(runtime, batches, config, meter, clock)
    update = gradient if gradient is not None else runtime.get_parameters() - before
    codec, frame = measure_codec(config.codec, update.astype(np.float32), config.codec_repeats, meter)
    broker = broker_probe(frame, meter) if broker_probe is not None else None
    meter.stop()

    latency = LatencyStats.of(steps_s)
    train_s = sum(steps_s)
    return {
        "model": {"name": manifest.model, "runtime": manifest.runtime, "num_params": manifest.num_params,
                  "bundle": str(config.bundle)},
        "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(config).items()} | {
            "batch_size": batch_size},
        "load_s": load_s,
        "step_latency": asdict(latency),
        "step_latencies_s": steps_s,
        "samples_per_s": config.steps * batch_size / train_s if train_s > 0 else None,
        "cpu_s": cpu_s,
        "cpu_utilisation": cpu_s / train_s if train_s > 0 else None,  # >1: several cores busy
        "memory": {"rss_start_bytes": rss_start, "rss_after_load_bytes": rss_loaded,
                   "rss_end_bytes": rss_bytes(), "peak_rss_bytes": peak_rss_bytes()},
        "codec": asdict(codec),
        "broker": broker,
    }
