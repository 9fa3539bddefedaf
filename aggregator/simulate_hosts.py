"""``simulate --device-processes P``: the fleet's identities spread over P ``edgetrain device-host`` processes.

One process per device (``simulate``'s default) pays an interpreter and a runtime per device (~370 MB with
torch): ten is the most this machine runs. A device host runs a contiguous range of identities on one
runtime and one event loop (``sdk.device_host``), so a 1,000-device fleet fits in a few processes.
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

from edgetrain.sdk.errors import ConfigError
from edgetrain.sdk.wire.signing import public_key_path


def host_ranges(devices: int, processes: int) -> list[range]:
    """Contiguous, near-equal ranges of device indices, one per process."""
    if not 1 <= processes <= devices:
        raise ConfigError(f"--device-processes {processes} must be between 1 and --devices {devices}")
    bounds = [round(i * devices / processes) for i in range(processes + 1)]
    return [range(bounds[i], bounds[i + 1]) for i in range(processes)]


def spawn_device_hosts(args: argparse.Namespace, broker_url: str, bundle: Path, out: Path,
                       env: dict[str, str]) -> list[tuple[subprocess.Popen, int]]:
    """Start the hosts; returns each process with the number of identities it runs."""
    (out / "devices").mkdir(parents=True, exist_ok=True)
    width = max(3, len(str(args.devices - 1)))
    hosts = []
    for number, ids in enumerate(host_ranges(args.devices, args.device_processes)):
        cmd = [sys.executable, "-m", "edgetrain", "device-host", "--broker", broker_url, "--fleet", args.fleet,
               "--ids", f"dev-{ids.start:0{width}d}..dev-{ids.stop - 1:0{width}d}", "--count", str(args.devices),
               "--bundle", str(bundle), "--partition", args.partition, "--seed", str(args.seed),
               "--state-root", str(out / "devices"), "--threads", str(args.device_threads),
               "--runtime", "auto" if args.bundle is not None else args.runtime]
        for flag, value in (("--data-dir", args.data_dir), ("--limit-examples", args.limit_examples),
                            ("--username", args.username), ("--ca-file", args.ca_file),
                            ("--cert-file", args.cert_file), ("--key-file", args.key_file)):
            if value is not None:
                cmd += [flag, str(value)]
        if args.signing_key is not None:
            cmd += ["--aggregator-key", str(public_key_path(args.signing_key))]
        with open(out / "devices" / f"host-{number}.log", "ab") as log:
            hosts.append((subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env), len(ids)))
    return hosts
