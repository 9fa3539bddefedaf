"""``edgetrain export``: build a reference model and write it as a training bundle.

torch is imported only when the command runs, so ``edgetrain --help`` works on a board without it.
"""
from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from sdk.bundle import RUNTIMES
from sdk.errors import ConfigError

# Mirrors export.models.MODELS (a test keeps them equal); listed here so --help needs no torch.
MODEL_NAMES: tuple[str, ...] = ("mlp", "cnn")
NORM_CHOICES: tuple[str, ...] = ("none", "batch", "group")


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "export",
        help="write a training bundle (model + initial weights + manifest)",
        description="Build a reference Fashion-MNIST model with seeded weights and write it as a bundle.",
    )
    parser.add_argument("--model", required=True, choices=MODEL_NAMES)
    parser.add_argument("--runtime", default="torch", choices=RUNTIMES, help="on-device runtime (default torch)")
    parser.add_argument("--out", required=True, type=Path, help="bundle directory to create")
    parser.add_argument("--norm", choices=NORM_CHOICES, default=None,
                        help="cnn only: normalisation after each conv (default none)")
    parser.add_argument("--seed", type=int, default=0, help="initial-weights seed (default 0)")
    parser.add_argument("--lr", type=float, default=None, help="SGD learning rate stored in the manifest")
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
    if args.nesterov:
        optimizer["nesterov"] = True
    return optimizer


def run(args: argparse.Namespace) -> int:
    from .bundle_writer import export_bundle  # imports torch

    manifest = export_bundle(args.model, _model_config(args), out_dir=args.out, runtime=args.runtime,
                             seed=args.seed, optimizer=_optimizer(args))
    config = ", ".join(f"{k}={v}" for k, v in sorted(manifest.model_config.items()))
    print(f"wrote {manifest.runtime} bundle {args.out}: model {manifest.model} ({config}), "
          f"{manifest.num_params:,} parameters in {len(manifest.params)} tensors")
    opt = manifest.optimizer
    print(f"  optimizer sgd lr={opt['lr']} momentum={opt['momentum']} weight_decay={opt['weight_decay']} "
          f"nesterov={opt['nesterov']}")
    for rel in [*manifest.files, "manifest.json"]:
        print(f"  {rel}  {(args.out / rel).stat().st_size:,} bytes")
    return 0
