"""The one ``edgetrain`` command, above every layer. Each subcommand lives in its layer's module,
which exposes ``register(subparsers)``; heavy libraries (torch, onnx) are imported only when a
subcommand runs, so ``edgetrain --help`` and the device commands work on a board without them.
"""
from __future__ import annotations

import argparse
import sys
from typing import Sequence

from edgetrain import __version__
from edgetrain.aggregator import centralized, report, simulate
from edgetrain.aggregator import cli as aggregate_cli
from edgetrain.device_bench import cli as bench_cli
from edgetrain.export import cli as export_cli
from edgetrain.sdk import device_cli, device_host_cli
from edgetrain.sdk.config_file import parse_with_config
from edgetrain.sdk.errors import ConfigError, EdgetrainError

# Each registers one subcommand; the order is the order shown in --help.
COMMAND_MODULES = (export_cli, centralized, device_cli, device_host_cli, aggregate_cli, simulate, report, bench_cli)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="edgetrain",
        description="Train deep nets on edge devices: Federated Learning and Large Batch Training over MQTT.",
    )
    parser.add_argument("--version", action="version", version=f"edgetrain {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for module in COMMAND_MODULES:
        module.register(sub)
    return parser


def subcommands(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    """Each subcommand's own parser, by name."""
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return dict(action.choices)


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    """The command line, with ``--config FILE`` settings under it (``sdk.config_file``); ConfigError
    for a bad file."""
    parser = build_parser()
    return parse_with_config(parser, subcommands(parser), list(argv))


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    command = next((a for a in argv if not a.startswith("-")), "")
    try:
        args = parse_args(argv)
        return int(args.func(args) or 0)
    except ConfigError as exc:  # bad input: one line, exit 2 like argparse
        print(f"edgetrain {command}: error: {exc}", file=sys.stderr)
        return 2
    except EdgetrainError as exc:
        print(f"edgetrain {command}: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"edgetrain {command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
