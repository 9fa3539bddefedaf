"""``edgetrain train``: train a bundle locally on one device's share of Fashion-MNIST.

Runtime-generic: everything goes through the ``edgetrain.sdk.runtime.Runtime`` seam, so the same command
trains a torch, ONNX Runtime or ExecuTorch bundle. The baseline it gives (one device, the full
train split) is the reference that federated and large-batch runs are compared against.
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any, Iterator, Mapping

import numpy as np

from edgetrain.sdk.data import (PartitionSpec, batch_indices, device_indices, load_split,
                                 to_model_input)
from edgetrain.sdk.errors import ConfigError
from edgetrain.sdk.runtime import TrainConfig, load_runtime

from .results import MetricsLog, RoundRecord, write_summary

DEFAULT_EPOCHS = 3
DEFAULT_BATCH_SIZE = 32
EVAL_BATCH_SIZE = 1000
# Used only when a bundle's manifest names no lr/momentum; export.bundle_writer's defaults.
FALLBACK_LR = 0.01
FALLBACK_MOMENTUM = 0.9


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "train",
        help="train a bundle locally on one device's partition and report test accuracy per epoch",
        description="Train a bundle on one device's partition of the Fashion-MNIST train split; "
                    "evaluate on the test split after every epoch.",
    )
    parser.add_argument("--bundle", required=True, type=Path, help="bundle directory (from 'edgetrain export')")
    parser.add_argument("--data-dir", type=Path, default=None,
                        help="Fashion-MNIST IDX directory (default $EDGETRAIN_DATA_DIR or the Debian path)")
    parser.add_argument("--partition", default="iid", help="iid | dirichlet:ALPHA | shards[:K] (default iid)")
    parser.add_argument("--seed", type=int, default=0, help="partition and shuffling seed (default 0)")
    parser.add_argument("--index", type=int, default=0, help="this device's index, 0-based (default 0)")
    parser.add_argument("--count", type=int, default=1, help="number of devices sharing the data (default 1)")
    parser.add_argument("--epochs", type=int, default=DEFAULT_EPOCHS, help=f"default {DEFAULT_EPOCHS}")
    parser.add_argument("--batch-size", type=int, default=None,
                        help=f"default {DEFAULT_BATCH_SIZE}, or the bundle's fixed batch size")
    parser.add_argument("--lr", type=float, default=None, help="default: the bundle's optimizer lr")
    parser.add_argument("--momentum", type=float, default=None, help="default: the bundle's optimizer momentum")
    parser.add_argument("--threads", type=int, default=None,
                        help="intra-op threads for the runtime (default: leave the library's choice)")
    parser.add_argument("--out", type=Path, default=None,
                        help="also write a run directory (metrics.jsonl, summary.json: one 'round' per epoch), "
                             "the centralized baseline 'edgetrain report' compares fleets with")
    parser.add_argument("--label", help="run name shown by 'edgetrain report'")
    parser.set_defaults(func=run)


def _positive(value: int, flag: str) -> int:
    if value < 1:
        raise ConfigError(f"{flag} must be >= 1, got {value}")
    return value


def _batch_size(requested: int | None, fixed: int | None) -> int:
    if fixed is None:
        return _positive(requested if requested is not None else DEFAULT_BATCH_SIZE, "--batch-size")
    if requested is not None and requested != fixed:
        raise ConfigError(f"--batch-size {requested}: this bundle's runtime was exported for batch size {fixed} only")
    return fixed


def _batches(images: np.ndarray, labels: np.ndarray, batch_size: int, rng: np.random.Generator,
             drop_last: bool, mean: float, std: float) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    # normalise per batch: a float32 copy of the whole train split would cost ~190 MB on a board
    for idx in batch_indices(len(labels), batch_size, rng, shuffle=True, drop_last=drop_last):
        yield to_model_input(images[idx], mean, std), labels[idx]


def _train_config(args: argparse.Namespace, opt: Mapping[str, Any]) -> TrainConfig:
    """The flags, else the bundle's optimizer settings (``opt``: the manifest's), else the fallbacks."""
    return TrainConfig(
        lr=args.lr if args.lr is not None else float(opt.get("lr", FALLBACK_LR)),
        # AdamW bundles have no SGD momentum to fall back on.
        momentum=args.momentum if args.momentum is not None else float(
            opt.get("momentum", 0.0 if opt.get("name") == "adamw" else FALLBACK_MOMENTUM)),
        weight_decay=float(opt.get("weight_decay", 0.0)),
        nesterov=bool(opt.get("nesterov", False)) and (args.momentum is None or args.momentum > 0),
    )


def run(args: argparse.Namespace) -> int:
    epochs = _positive(args.epochs, "--epochs")
    _positive(args.count, "--count")
    if not 0 <= args.index < args.count:
        raise ConfigError(f"--index {args.index}: must be in [0, {args.count}) for --count {args.count}")
    spec = PartitionSpec.parse(args.partition)
    runtime = load_runtime(args.bundle)
    manifest = runtime.manifest
    if args.threads is not None:
        runtime.set_threads(_positive(args.threads, "--threads"))
    threads = args.threads or "library default"
    batch_size = _batch_size(args.batch_size, manifest.fixed_batch_size)
    config = _train_config(args, manifest.optimizer)

    train = load_split("train", data_dir=args.data_dir)
    test = load_split("test", data_dir=args.data_dir)
    mine = device_indices(train.labels, spec, args.seed, args.index, args.count)
    images, labels = train.images[mine], train.labels[mine]
    if len(labels) == 0:
        raise ConfigError(f"device {args.index} of {args.count} got no training examples under {spec}")
    test_x = to_model_input(test.images, manifest.input_mean, manifest.input_std)
    rng = np.random.default_rng([args.seed, args.index])

    print(f"bundle {args.bundle}: {manifest.model} on {manifest.runtime}, {manifest.num_params:,} parameters; "
          f"device {args.index}/{args.count} ({spec}): {len(labels)} train examples, {len(test.labels)} test; "
          f"batch {batch_size}, sgd lr {config.lr} momentum {config.momentum}, threads {threads}", flush=True)
    log = _RunLog(args.out) if args.out is not None else None
    for epoch in range(1, epochs + 1):
        started = time.perf_counter()
        # keep the last partial batch for every runtime: a fixed-batch (executorch) backend pads it
        # with weight-0 rows, which leaves the gradient mean exact
        result = runtime.train(_batches(images, labels, batch_size, rng, False,
                                        manifest.input_mean, manifest.input_std), config)
        trained = time.perf_counter()
        evaluation = runtime.evaluate(test_x, test.labels, batch_size=EVAL_BATCH_SIZE)
        finished = time.perf_counter()
        print(f"epoch {epoch}/{epochs}  train_loss {result.mean_loss:.4f}  test_loss {evaluation.loss:.4f}  "
              f"test_acc {evaluation.accuracy:.4f}  train_s {trained - started:.1f}  "
              f"eval_s {finished - trained:.1f}", flush=True)
        if log is not None:
            log.epoch(epoch, evaluation.accuracy, evaluation.loss, trained - started, result.examples)
    if log is not None:
        log.finish({"strategy": "centralized", "codec": "-", "partition": str(spec), "model": manifest.model,
                    "runtime": manifest.runtime, **({"label": args.label} if args.label else {})})
    return 0


class _RunLog:
    """The aggregator's run-directory format, so ``edgetrain report`` can put the centralized baseline
    beside fleet runs: one record per epoch, nothing sent over a network (0 bytes)."""

    def __init__(self, out: Path) -> None:
        out.mkdir(parents=True, exist_ok=True)
        self.out, self.metrics, self.records = out, MetricsLog(out), []
        self.metrics.truncate_after(0)

    def epoch(self, epoch: int, accuracy: float, loss: float, wall_s: float, examples: int) -> None:
        record = RoundRecord(round_id=epoch, model_version=epoch, accuracy=accuracy, loss=loss, devices_chosen=1,
                             devices_reported=1, devices_rejected={}, rejected_detail=(), bytes_up=0, bytes_down=0,
                             round_wall_s=wall_s, total_examples=examples)
        self.metrics.append(record)
        self.records.append(record)

    def finish(self, settings: dict) -> None:
        write_summary(self.out, self.records, settings)
