"""The one ``edgetrain`` command. Each subcommand lives in its own module, which exposes
``register(subparsers)``; heavy libraries (torch, onnx) are imported only when a subcommand runs,
so ``edgetrain --help`` and the device commands work on a board without them.
"""
from __future__ import annotations

import argparse
import importlib
import sys
from typing import Sequence

from .errors import ConfigError, EdgetrainError

# Order is the order shown in --help.
COMMAND_MODULES: tuple[str, ...] = (
    "export.cli",
    "sdk.local_train",
    "sdk.device_cli",
    "aggregator.cli",
    "aggregator.simulate",
    "aggregator.report",
    "device_bench.cli",
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="edgetrain",
        description="Train deep nets on edge devices: Federated Learning and Large Batch Training over MQTT.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except ConfigError as exc:  # bad input: one line, exit 2 like argparse
        print(f"edgetrain {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except EdgetrainError as exc:
        print(f"edgetrain {args.command}: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"edgetrain {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
