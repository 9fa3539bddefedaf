"""``edgetrain export``: build a reference model and write it as a training bundle.

torch is imported only when the command runs, so ``edgetrain --help`` works on a board without it.
"""
from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from edgetrain.sdk.bundle import RUNTIMES, Manifest
from edgetrain.sdk.errors import ConfigError

# Mirrors edgetrain.sdk.models.MODELS (a test keeps them equal); listed here so --help needs no torch.
MODEL_NAMES: tuple[str, ...] = ("mlp", "cnn")
NORM_CHOICES: tuple[str, ...] = ("none", "batch", "group")


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "export",
        help="write a training bundle (model + initial weights + manifest)",
        description="Build a reference Fashion-MNIST model with seeded weights and write it as a bundle.",
    )
    parser.add_argument("--model", required=True, choices=MODEL_NAMES)
    parser.add_argument("--runtime", default="torch", choices=(*RUNTIMES, "all"),
                        help="on-device runtime (default torch); 'all' writes one sub-bundle per runtime "
                             "that accepts the model")
    parser.add_argument("--out", required=True, type=Path, help="bundle directory to create")
    parser.add_argument("--norm", choices=NORM_CHOICES, default=None,
                        help="cnn only: normalisation after each conv (default none)")
    parser.add_argument("--seed", type=int, default=0, help="initial-weights seed (default 0)")
    parser.add_argument("--optimizer", choices=("sgd", "adamw"), default="sgd",
                        help="sgd (default), or adamw baked into an onnx bundle's optimizer model")
    parser.add_argument("--batch-size", type=int, default=None,
                        help="executorch only: the fixed training batch size (default 32)")
    parser.add_argument("--lr", type=float, default=None, help="learning rate stored in the manifest")
    parser.add_argument("--momentum", type=float, default=None, help="SGD momentum stored in the manifest")
    parser.add_argument("--weight-decay", type=float, default=None, help="SGD weight decay stored in the manifest")
    parser.add_argument("--nesterov", action="store_true", help="Nesterov momentum")
    parser.set_defaults(func=run)


def _model_config(args: argparse.Namespace) -> dict[str, Any]:
    if args.norm is None:
        return {}
    if args.model != "cnn":
        raise ConfigError(f"--norm applies to the cnn model only, not {args.model}")
    return {"norm": args.norm}


def _optimizer(args: argparse.Namespace) -> dict[str, Any]:
    settings: dict[str, Any] = {"lr": args.lr, "momentum": args.momentum, "weight_decay": args.weight_decay}
    optimizer = {k: v for k, v in settings.items() if v is not None}
    optimizer["name"] = args.optimizer
    if args.nesterov:
        optimizer["nesterov"] = True
    if args.optimizer == "adamw" and ("momentum" in optimizer or args.nesterov):
        raise ConfigError("--momentum/--nesterov apply to sgd, not adamw")
    return optimizer


def _print_bundle(manifest: Manifest, out: Path) -> None:
    config = ", ".join(f"{k}={v}" for k, v in sorted(manifest.model_config.items()))
    fixed = f", fixed batch {manifest.fixed_batch_size}" if manifest.fixed_batch_size else ""
    print(f"wrote {manifest.runtime} bundle {out}: model {manifest.model} ({config}), "
          f"{manifest.num_params:,} parameters in {len(manifest.params)} tensors{fixed}")
    settings = " ".join(f"{k}={v}" for k, v in sorted(manifest.optimizer.items()) if k != "name")
    print(f"  optimizer {manifest.optimizer['name']} {settings}")
    for rel in [*manifest.files, "manifest.json"]:
        print(f"  {rel}  {(out / rel).stat().st_size:,} bytes")


def run(args: argparse.Namespace) -> int:
    from .bundle_writer import export_all_runtimes, export_bundle  # imports torch

    if args.runtime == "all":
        written, refused = export_all_runtimes(args.model, _model_config(args), out_dir=args.out, seed=args.seed,
                                               optimizer=_optimizer(args), batch_size=args.batch_size)
        for runtime, manifest in written.items():
            _print_bundle(manifest, args.out / runtime)
        for runtime, reason in refused.items():
            print(f"skipped {runtime}: {reason}")
        return 0
    manifest = export_bundle(args.model, _model_config(args), out_dir=args.out, runtime=args.runtime,
                             seed=args.seed, optimizer=_optimizer(args), batch_size=args.batch_size)
    _print_bundle(manifest, args.out)
    return 0
