"""Command-line pieces shared by several subcommands (broker, data, threads)."""
from __future__ import annotations

import argparse
import logging
import os
import time
from pathlib import Path
from typing import TYPE_CHECKING

from .broker_config import BrokerConfig
from .errors import ConfigError

if TYPE_CHECKING:  # the runtime package only for the hint: this module is imported by every CLI
    from .runtime import Runtime

DEFAULT_BROKER = "mqtt://127.0.0.1:1883"
PASSWORD_ENV = "EDGETRAIN_BROKER_PASSWORD"


def add_broker_args(parser: argparse.ArgumentParser, default: str | None = DEFAULT_BROKER) -> None:
    group = parser.add_argument_group("broker")
    group.add_argument("--broker", default=default, metavar="URL",
                       help="mqtt://host[:port] or mqtts://host[:port]" + (f" (default {default})" if default else ""))
    group.add_argument("--username", help="broker user name")
    group.add_argument("--password", help=f"broker password (better: set {PASSWORD_ENV})")
    group.add_argument("--ca-file", type=Path, help="CA certificate that signed the broker's certificate (mqtts)")
    group.add_argument("--cert-file", type=Path, help="client certificate, where the broker requires one")
    group.add_argument("--key-file", type=Path, help="client private key")


def broker_config(args: argparse.Namespace) -> BrokerConfig:
    for flag in ("ca_file", "cert_file", "key_file"):
        path = getattr(args, flag)
        if path is not None and not Path(path).is_file():
            raise ConfigError(f"--{flag.replace('_', '-')} {path}: no such file")
    password = args.password if args.password is not None else os.environ.get(PASSWORD_ENV)
    extra = {k: v for k, v in (("username", args.username), ("password", password)) if v is not None}
    return BrokerConfig.parse(args.broker, ca_file=args.ca_file, cert_file=args.cert_file,
                              key_file=args.key_file, **extra)


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}") from None
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"expected a positive finite number, got {text}")
    return value


def limit_threads(runtime, threads: int | None) -> None:
    """Cap the runtime's intra-op threads when asked (``Runtime.set_threads``)."""
    if threads is not None:
        runtime.set_threads(threads)


def warm_up_runtime(runtime: "Runtime") -> None:
    """``Runtime.warm_up`` (after ``limit_threads``: it runs on the capped threads), before the device says it
    is online: round 1 then costs what a steady round does, not the backend's first-step start-up too."""
    started = time.perf_counter()
    runtime.warm_up()
    logging.getLogger(__name__).info("runtime %s warmed up in %.2f s", runtime.name, time.perf_counter() - started)
