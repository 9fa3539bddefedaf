"""Fleet scale (issue 14). Part 1: 1,000 devices through one Mosquitto, as identities of a few device-host
processes; part 2 (``fleet_scale_workers.py``): synthetic updates through 1, 2 and 4 aggregation workers.

Runs ``edgetrain simulate --devices N --fraction C --device-processes P --rounds R`` against a private
Mosquitto this script starts, and prints: seconds per round (first and steady), peak RSS per process and
in total (aggregator + hosts + broker, sampled from /proc), broker connections (``$SYS/broker/clients/
connected``), and, separately, how long a fleet of N idle identities takes to be whole again after a
broker restart (the reconnect storm). Goals (printed, not asserted): <= 3 GB total RSS, <= 15 s per round.

    .venv/bin/python benchmarks/fleet_scale.py [--devices 1000] [--fraction 0.1] [--rounds 5] [--workers 1 2 4]
    .venv/bin/python benchmarks/fleet_scale.py --workers-only | --skip-workers
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from edgetrain.aggregator.local_broker import LocalMosquitto
from edgetrain.sdk.broker_config import BrokerConfig
from edgetrain.sdk.transport import MqttTransport
from edgetrain.sdk.transport.selector import SelectorLoop, SelectorTransport

import fleet_scale_workers  # part 2, beside this script

GOAL_RSS_BYTES = 3e9
GOAL_ROUND_S = 15.0


def rss_bytes(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def descendants(pid: int) -> list[int]:
    out = subprocess.run(["ps", "-o", "pid=", "--ppid", str(pid)], capture_output=True, text=True).stdout.split()
    kids = [int(p) for p in out]
    return kids + [g for k in kids for g in descendants(k)]


def process_name(pid: int) -> str:
    try:
        cmd = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return "?"
    text = " ".join(c.decode(errors="replace") for c in cmd)
    if "device-host" in text:
        return "device-host " + text.split("--ids ")[1].split()[0]
    return "mosquitto" if "mosquitto" in text else ("simulate (aggregator)" if "simulate" in text else text[:40])


class ConnectionCounter:
    """The broker's own count of connected clients, from $SYS (published every sys_interval seconds)."""

    def __init__(self, config: BrokerConfig) -> None:
        self.latest = 0
        self.peak = 0
        self.transport = MqttTransport(config, "fleet-scale-sys", clean_start=True)
        self.transport.subscribe("$SYS/broker/clients/connected", self._record)
        self.transport.connect()

    def _record(self, topic: str, payload: bytes) -> None:
        self.latest = int(payload or b"0")
        self.peak = max(self.peak, self.latest)


def run_fleet(args: argparse.Namespace, broker: LocalMosquitto, out: Path) -> None:
    counter = ConnectionCounter(BrokerConfig.parse(broker.url))
    cmd = [sys.executable, "-m", "edgetrain", "simulate", "--broker", broker.url, "--devices", str(args.devices),
           "--device-processes", str(args.processes), "--fraction", str(args.fraction), "--rounds", str(args.rounds),
           "--limit-examples", str(args.examples), "--model", args.model, "--out", str(out / "run"),
           "--join-timeout", "600", "--round-timeout", "120", "--eval-examples", "1000"]
    peak: dict[int, tuple[str, int]] = {}
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(proc.stdout), daemon=True)  # type: ignore[arg-type]
    reader.start()
    while proc.poll() is None:
        for pid in descendants(os.getpid()):
            rss = rss_bytes(pid)
            if rss > peak.get(pid, ("", 0))[1]:
                peak[pid] = (process_name(pid), rss)
        time.sleep(0.5)
    reader.join(5)
    rounds = [line for line in lines if line.startswith("round")]
    print("".join(lines[-12:]), end="")
    round_s = [float(line.split(" MB")[-1].split()[0]) for line in rounds]
    print(f"\n== {args.devices} devices in {args.processes} device-host processes, C={args.fraction}, "
          f"{args.rounds} rounds, {args.model}, {args.examples} examples each")
    if round_s:
        steady = round_s[1:] or round_s
        print(f"s/round: first {round_s[0]:.1f}, steady mean {sum(steady) / len(steady):.1f} "
              f"(goal <= {GOAL_ROUND_S:g}) — all: {', '.join(f'{s:.1f}' for s in round_s)}")
    total = sum(r for _, r in peak.values())
    for pid, (name, rss) in sorted(peak.items(), key=lambda kv: kv[1][0]):
        print(f"peak RSS {name:<32} {rss / 1e6:8.1f} MB")
    print(f"peak RSS total (sum of per-process peaks) {total / 1e9:.2f} GB (goal <= {GOAL_RSS_BYTES / 1e9:g} GB)")
    print(f"broker connections ($SYS/broker/clients/connected): peak {counter.peak}")
    counter.transport.close()


def reconnect_storm(args: argparse.Namespace, broker: LocalMosquitto) -> None:
    """N idle identities on selector loops (split like the hosts), broker restarted: time until all are back."""
    config = BrokerConfig.parse(broker.url)
    loops = [SelectorLoop() for _ in range(args.processes)]
    for loop in loops:
        loop.start()
    clients = [SelectorTransport(config, f"storm-{i:04d}", loops[i % len(loops)], will=(f"storm/{i}", b"off", True))
               for i in range(args.devices)]
    started = time.monotonic()
    for client in clients:
        client.connect()
    print(f"\n== reconnect storm: {len(clients)} clients on {len(loops)} selector loop(s) (one process here)")
    print(f"first connect of all: {time.monotonic() - started:.2f} s")
    broker.stop()
    down = time.monotonic()
    broker.start()
    restarted = time.monotonic()
    while not all(c.is_connected for c in clients) and time.monotonic() - restarted < 120:
        time.sleep(0.05)
    back = sum(c.is_connected for c in clients)
    print(f"broker restart took {restarted - down:.2f} s; whole again {time.monotonic() - restarted:.2f} s after "
          f"the broker was back ({back}/{len(clients)} connected)")
    for client in clients:
        client.close()
    for loop in loops:
        loop.stop()


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--devices", type=int, default=1000)
    p.add_argument("--processes", type=int, default=2)
    p.add_argument("--fraction", type=float, default=0.1)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--examples", type=int, default=60, help="examples per identity (60 x 1,000 = the training set)")
    p.add_argument("--model", default="cnn", choices=["cnn", "mlp"])
    p.add_argument("--skip-fleet", action="store_true", help="only the reconnect storm")
    p.add_argument("--workers-only", action="store_true", help="run part 2 only (aggregation workers)")
    p.add_argument("--skip-workers", action="store_true", help="run part 1 only")
    fleet_scale_workers.add_args(p)
    args = p.parse_args()
    if args.workers_only:
        fleet_scale_workers.workers_part(args)
        return 0
    with tempfile.TemporaryDirectory() as tmp:
        with LocalMosquitto(Path(tmp) / "broker", extra_config="sys_interval 1\n") as broker:
            if not args.skip_fleet:
                run_fleet(args, broker, Path(tmp))
            reconnect_storm(args, broker)
    if not args.skip_workers:
        fleet_scale_workers.workers_part(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
