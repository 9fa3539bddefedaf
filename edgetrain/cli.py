"""The one ``edgetrain`` command, above every layer. Each subcommand lives in its layer's module,
which exposes ``register(subparsers)``; heavy libraries (torch, onnx) are imported only when a
subcommand runs, so ``edgetrain --help`` and the device commands work on a board without them.
"""
from __future__ import annotations

import argparse
import importlib
import sys
from types import ModuleType
from typing import Sequence

from edgetrain import __version__
from edgetrain.sdk.config_file import parse_with_config
from edgetrain.sdk.errors import ConfigError, EdgetrainError

# Each module registers one subcommand (named here); the order is the order shown in --help. Imported by
# name: a device command imports only its own module (see ``_modules_for``).
COMMAND_MODULES = {"export": "edgetrain.export.cli", "train": "edgetrain.aggregator.centralized",
                   "device": "edgetrain.sdk.device_cli", "device-host": "edgetrain.sdk.device_host_cli",
                   "aggregate": "edgetrain.aggregator.cli", "simulate": "edgetrain.aggregator.simulate",
                   "report": "edgetrain.aggregator.report", "bench": "edgetrain.device_bench.cli"}
# Commands that run on boards, often many to a machine (simulate starts ten): they need none of the server's
# modules (the aggregator, scipy: ~0.3 CPU-s a process).
DEVICE_COMMANDS = ("device", "device-host")


def _modules_for(argv: Sequence[str]) -> list[ModuleType]:
    """The subcommand modules a command line needs: a device command without ``--config`` its own only (a
    config file is checked against every command's flags, so it needs them all); anything else, all."""
    command = next((a for a in argv if not a.startswith("-")), "")
    with_config = any(a == "--config" or a.startswith("--config=") for a in argv)
    names = [command] if command in DEVICE_COMMANDS and not with_config else list(COMMAND_MODULES)
    return [importlib.import_module(COMMAND_MODULES[name]) for name in names]


def build_parser(argv: Sequence[str] = ()) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="edgetrain",
        description="Train deep nets on edge devices: Federated Learning and Large Batch Training over MQTT.",
    )
    parser.add_argument("--version", action="version", version=f"edgetrain {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for module in _modules_for(argv):
        module.register(sub)
    return parser


def subcommands(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    """Each subcommand's own parser, by name."""
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return dict(action.choices)


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    """The command line, with ``--config FILE`` settings under it (``sdk.config_file``); ConfigError
    for a bad file."""
    parser = build_parser(argv)
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
