"""Hostile load (issue 12, "Done when"): one CI-sized fleet run clean and one under a flood; the aggregator's
peak RSS, the rejections by reason and the final accuracy of both, side by side.

Loopback only, bounded in count and time: a private Mosquitto on a free 127.0.0.1 port, ``--devices``
``edgetrain device`` processes on ``--limit-examples`` each and one ``edgetrain aggregate`` process (its own
process, so its peak RSS is its own: ``VmHWM`` from /proc, sampled until it exits), ``--rounds`` rounds,
each run killed after ``--max-run-s``. The flooded run adds raw paho clients that, for ``--seconds`` (or
until the run ends), publish at most ``--rate`` messages/s in all:

- junk updates on their own identities' topics: random bytes, well-formed updates for a wrong round, for a
  device that was not selected, with a NaN payload, with a spoofed sender, with 10^12 examples;
- never-completing chunked updates (the first slice of a large message, fresh message ids);
- forged announcements (garbage, and well-formed ones that select only the flooders, not retained);
- forged statuses (malformed; naming another device than their topic's).

With ``--admit-flooders`` the flooders also say "online" (claiming 10^9 examples) and so join the fleet:
they are selected and their junk updates count, bounded only by the default caps (weight <= 4x the median
partition, norm clipped at 5x the median norm) -- a Byzantine participant, not a flood; off by default.

What a flooder can write follows the ACL recipe (``pattern write .../%u``): its own topics, plus the
announce topic for the forgeries a broker without ACLs lets through. Not flooded: forged announcements
that select real devices and forged "offline" statuses of real devices -- without an ACL those need
signed messages (issue 12 defect 4), not caps.

    python benchmarks/hostile_load.py [--seconds 60] [--rounds 800] [--devices 3] [--json FILE]

Goals: peak RSS under flood <= 2x the clean run's; final accuracy within 0.5 pt; the run finishes.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable

import numpy as np
import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

from edgetrain.aggregator.local_broker import LocalMosquitto
from edgetrain.aggregator.results import MetricsLog
from edgetrain.sdk import topics, wire
from edgetrain.sdk.codecs import CodecSpec, get_codec
from edgetrain.sdk.round_settings import RoundSettings
from edgetrain.sdk.wire import signing

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_DATA = Path("/usr/share/datasets/fashion-mnist")
FLOODERS = 4  # identities flood-0..3, one paho client each


@dataclass
class RunResult:
    """One fleet run as the benchmark saw it."""

    label: str
    finished: bool
    exit_code: int | None
    wall_s: float
    rounds_done: int
    final_accuracy: float | None
    peak_rss_mb: float
    rejected: dict[str, int]
    inbox_dropped: int
    capped: int
    clipped: int
    flood_sent: dict[str, int] = field(default_factory=dict)
    flood_s: float = 0.0


# -- the fleet ---------------------------------------------------------------------------------------------
def _env() -> dict[str, str]:
    return dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1",
                PYTHONPATH=os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")])))


def _spawn(args: list[str], log: Path) -> subprocess.Popen:
    with open(log, "ab") as out:
        return subprocess.Popen([sys.executable, "-m", "edgetrain", *args], stdout=out, stderr=subprocess.STDOUT,
                                env=_env(), cwd=REPO_ROOT)


def _spawn_fleet(opts: argparse.Namespace, url: str, fleet: str, bundle: Path, work: Path
                 ) -> tuple[subprocess.Popen, list[subprocess.Popen]]:
    # Signed announcements (the recommended setting): the forged ones of the flood are then refused by the
    # devices instead of resetting their per-run state.
    key = work / "signing.pem"
    if not key.exists():
        signing.generate_key_pair(key)
    devices = [_spawn(["device", "--broker", url, "--fleet", fleet, "--device-id", f"dev-{i}", "--bundle",
                       str(bundle), "--data-dir", str(opts.data_dir), "--index", str(i), "--count",
                       str(opts.devices), "--limit-examples", str(opts.limit_examples), "--state-dir",
                       str(work / f"dev-{i}"), "--threads", "1", "--aggregator-key",
                       str(signing.public_key_path(key))], work / f"dev-{i}.log")
               for i in range(opts.devices)]
    aggregator = _spawn(["aggregate", "--broker", url, "--fleet", fleet, "--bundle", str(bundle), "--out",
                         str(work / "run"), "--rounds", str(opts.rounds), "--min-devices", str(opts.devices),
                         "--round-timeout", "60", "--join-timeout", "120", "--eval-examples",
                         str(opts.eval_examples), "--data-dir", str(opts.data_dir), "--threads", "1",
                         "--log-level", "ERROR", "--signing-key", str(key)], work / "aggregator.log")
    return aggregator, devices


def _peak_rss_kib(pid: int) -> int | None:
    """The process's peak resident set (VmHWM) so far, or None once it is gone."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    except (FileNotFoundError, ProcessLookupError):
        return None
    return None


def _watch_until_exit(process: subprocess.Popen, max_s: float) -> tuple[int, bool]:
    """Sample the peak RSS every 0.1 s until the process exits or ``max_s`` passed (then it is killed)."""
    peak, deadline = 0, time.monotonic() + max_s
    while process.poll() is None:
        if time.monotonic() > deadline:
            process.kill()
            process.wait()
            return peak, False
        peak = max(peak, _peak_rss_kib(process.pid) or 0)
        time.sleep(0.1)
    return peak, process.returncode == 0


def _stop(processes: list[subprocess.Popen]) -> None:
    for process in processes:
        if process.poll() is None:
            process.terminate()
    for process in processes:
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def _summarise(label: str, work: Path, exit_code: int | None, finished: bool, wall_s: float,
               peak_kib: int) -> RunResult:
    records = MetricsLog(work / "run").read() if (work / "run").exists() else []
    rejected: Counter[str] = Counter()
    for record in records:
        rejected.update(record.devices_rejected)
    accuracies = [r.accuracy for r in records if r.accuracy is not None]
    return RunResult(label=label, finished=finished, exit_code=exit_code, wall_s=round(wall_s, 1),
                     rounds_done=len(records), final_accuracy=accuracies[-1] if accuracies else None,
                     peak_rss_mb=round(peak_kib / 1024, 1), rejected=dict(sorted(rejected.items())),
                     inbox_dropped=sum(int(r.extra.get("inbox_dropped", 0)) for r in records),
                     capped=sum(int(r.extra.get("capped", 0)) for r in records),
                     clipped=sum(int(r.extra.get("clipped", 0)) for r in records))


def run_fleet(opts: argparse.Namespace, url: str, bundle: Path, work: Path, flood: bool) -> RunResult:
    """One fleet run (clean or flooded) in ``work``; the flood starts with the aggregator."""
    label = "flood" if flood else "clean"
    fleet = f"hostile-{label}"
    work.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    aggregator, devices = _spawn_fleet(opts, url, fleet, bundle, work)
    flooder = (Flooder(url, fleet, opts.rate, opts.seconds, _num_params(bundle), opts.admit_flooders)
               if flood else None)
    try:
        if flooder is not None:
            flooder.start()
        peak_kib, finished = _watch_until_exit(aggregator, opts.max_run_s)
    finally:
        if flooder is not None:
            flooder.stop()
        _stop([aggregator, *devices])
    result = _summarise(label, work, aggregator.returncode, finished, time.monotonic() - started, peak_kib)
    if flooder is not None:
        result.flood_sent, result.flood_s = dict(flooder.sent), round(flooder.ran_s, 1)
    return result


def _num_params(bundle: Path) -> int:
    from edgetrain.sdk.bundle import load_manifest

    return load_manifest(bundle).num_params


# -- the flood ---------------------------------------------------------------------------------------------
class Flooder:
    """Raw paho clients publishing hostile messages round-robin at ``rate`` messages/s for ``seconds``,
    from the first real announcement on."""

    def __init__(self, url: str, fleet: str, rate: float, seconds: float, num_params: int,
                 admitted: bool = False) -> None:
        self.port = int(url.rsplit(":", 1)[1])
        self.fleet, self.rate, self.seconds, self.num_params = fleet, rate, seconds, num_params
        self.sent: Counter[str] = Counter()
        self.ran_s = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._main, name="flooder", daemon=True)
        self._rng = np.random.default_rng(12)
        self._announced: wire.Announcement | None = None  # the latest real announcement (round, version)
        self._clients: list[mqtt.Client] = []
        self.admitted = admitted  # also say "online": join the fleet as (hostile) participants

    def start(self) -> None:
        for i in range(FLOODERS):
            client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"flood-{i}", protocol=mqtt.MQTTv5)
            if i == 0:  # one of them watches the real announcements, to forge updates that look current
                client.on_message = self._on_announcement
            client.connect("127.0.0.1", self.port)
            if i == 0:
                client.subscribe(topics.announce_topic(self.fleet), qos=0)
            client.loop_start()
            self._clients.append(client)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(30)
        for client in self._clients:
            client.loop_stop()
            client.disconnect()

    def _on_announcement(self, client: mqtt.Client, userdata: Any, message: mqtt.MQTTMessage) -> None:
        try:
            decoded = wire.decode(message.payload) if message.payload else None
        except Exception:  # noqa: BLE001 (our own forgeries, or a cleared announcement)
            return
        if isinstance(decoded, wire.Announcement) and "dev-0" in decoded.selected:
            self._announced = decoded

    def _main(self) -> None:
        # Flood the running fleet: from the first real announcement (the aggregator is up) for ``seconds``.
        while self._announced is None and not self._stop.wait(0.1):
            pass
        started = time.monotonic()
        kinds = self._kinds()
        n = 0
        while not self._stop.is_set() and time.monotonic() - started < self.seconds:
            name, make = kinds[n % len(kinds)]
            client = self._clients[n % len(self._clients)]
            identity = f"flood-{n % len(self._clients)}"
            for topic, payload in make(identity, n):
                client.publish(topic, payload, qos=0)
                self.sent[name] += 1
            n += 1
            time.sleep(max(0.0, started + n / self.rate - time.monotonic()))  # at most ``rate`` per second
        self.ran_s = time.monotonic() - started

    def _kinds(self) -> list[tuple[str, Callable[[str, int], list[tuple[str, bytes]]]]]:
        return [("junk_bytes", self._junk_bytes), ("update_wrong_round", self._update_wrong_round),
                ("update_not_selected", self._update_not_selected), ("update_nan", self._update_nan),
                ("update_spoofed", self._update_spoofed), ("update_huge_claim", self._update_huge_claim),
                ("chunk_never_completed", self._chunk), ("announcement_garbage", self._announcement_garbage),
                ("announcement_forged", self._announcement_forged), ("status_malformed", self._status_malformed),
                ("status_mismatched", self._status_mismatched)] + (
                    [("status_online", self._status_online)] if self.admitted else [])

    # Each maker returns the (topic, payload) pairs of one hostile act by ``me``.
    def _update(self, me: str, n: int, vector: np.ndarray, **fields: Any) -> bytes:
        payload, _ = get_codec("dense").encode(vector.astype(np.float32), None, {})
        a = self._announced
        header: dict[str, Any] = dict(run_id=a.run_id if a else "forged", device_id=me,
                                      round_id=a.round_id if a else 1,
                                      model_version=a.model_version if a else 0, update_id=f"{me}-{n}",
                                      num_examples=40, codec="dense", payload=payload, metrics={})
        header.update(fields)
        update = wire.Update(**header)
        return wire.build_frame(wire.MessageType.UPDATE, wire.messages.header_fields(update), update.payload)

    def _junk_bytes(self, me: str, n: int) -> list[tuple[str, bytes]]:
        return [(topics.update_topic(self.fleet, me), self._rng.bytes(int(self._rng.integers(1, 64 * 1024))))]

    def _update_wrong_round(self, me: str, n: int) -> list[tuple[str, bytes]]:
        round_id = (self._announced.round_id if self._announced else 1) + 1000
        return [(topics.update_topic(self.fleet, me), self._update(me, n, self._ones(), round_id=round_id))]

    def _update_not_selected(self, me: str, n: int) -> list[tuple[str, bytes]]:
        return [(topics.update_topic(self.fleet, me), self._update(me, n, self._ones()))]

    def _update_nan(self, me: str, n: int) -> list[tuple[str, bytes]]:
        return [(topics.update_topic(self.fleet, me), self._update(me, n, np.full(self.num_params, np.nan)))]

    def _update_spoofed(self, me: str, n: int) -> list[tuple[str, bytes]]:  # names dev-0 on its own topic
        return [(topics.update_topic(self.fleet, me), self._update(me, n, self._ones(), device_id="dev-0"))]

    def _update_huge_claim(self, me: str, n: int) -> list[tuple[str, bytes]]:
        return [(topics.update_topic(self.fleet, me), self._update(me, n, 1e6 * self._ones(), num_examples=10**12))]

    def _chunk(self, me: str, n: int) -> list[tuple[str, bytes]]:
        total = 4 * 1024 * 1024  # claims 4 MB; only its first 64 KB slice ever comes
        header = {"message_id": f"{me}-{n}", "index": 0, "count": 64, "total_bytes": total, "total_crc32": 0}
        return [(topics.update_topic(self.fleet, me),
                 wire.build_frame(wire.MessageType.CHUNK, header, self._rng.bytes(total // 64)))]

    def _announcement_garbage(self, me: str, n: int) -> list[tuple[str, bytes]]:
        return [(topics.announce_topic(self.fleet), self._rng.bytes(256))]

    def _announcement_forged(self, me: str, n: int) -> list[tuple[str, bytes]]:
        payload, _ = get_codec("dense").encode(np.zeros(self.num_params, dtype=np.float32), None, {})
        forged = wire.Announcement(run_id="forged", round_id=999, model_version=999, strategy="fedavg", task="train",
                                   selected=(me, "dev-0"), deadline_unix_s=time.time() + 60, settings=RoundSettings(),
                                   uplink_codec=CodecSpec("dense"), payload_kind="params",
                                   downlink_codec=CodecSpec("dense"), base_version=None, payload=payload)
        return [(topics.announce_topic(self.fleet), wire.encode(forged))]

    def _status_malformed(self, me: str, n: int) -> list[tuple[str, bytes]]:
        return [(topics.status_topic(self.fleet, me), self._rng.bytes(128))]

    def _status_online(self, me: str, n: int) -> list[tuple[str, bytes]]:  # not retained: no lasting ghost
        status = wire.Status(device_id=me, online=True, info={"num_examples": 10**9})
        return [(topics.status_topic(self.fleet, me), wire.encode(status))]

    def _status_mismatched(self, me: str, n: int) -> list[tuple[str, bytes]]:
        status = wire.Status(device_id="dev-0", online=False, info={"reason": "forged"})
        return [(topics.status_topic(self.fleet, me), wire.encode(status))]

    def _ones(self) -> np.ndarray:
        return np.ones(self.num_params, dtype=np.float32)


# -- main --------------------------------------------------------------------------------------------------
def export_bundle(work: Path, hidden: int) -> Path:
    from edgetrain.export.bundle_writer import export_bundle as export

    bundle = work / "bundle"
    export("mlp", {"hidden": [hidden]}, out_dir=bundle, runtime="torch", seed=0, optimizer={"name": "sgd"})
    return bundle


def report(clean: RunResult, flood: RunResult) -> dict[str, Any]:
    """The figures and the three goals, as printed and saved."""
    rss_ratio = flood.peak_rss_mb / clean.peak_rss_mb if clean.peak_rss_mb else math.inf
    gap_pt = (None if clean.final_accuracy is None or flood.final_accuracy is None
              else round(100 * abs(flood.final_accuracy - clean.final_accuracy), 2))
    goals = {"rss_within_2x": rss_ratio <= 2.0, "accuracy_within_0.5pt": gap_pt is not None and gap_pt <= 0.5,
             "flooded_run_finished": flood.finished}
    return {"clean": asdict(clean), "flood": asdict(flood), "peak_rss_ratio": round(rss_ratio, 2),
            "accuracy_gap_pt": gap_pt, "goals": goals}


def print_report(summary: dict[str, Any]) -> None:
    clean, flood = summary["clean"], summary["flood"]
    acc = lambda r: "-" if r["final_accuracy"] is None else f"{100 * r['final_accuracy']:.2f}%"  # noqa: E731
    print(f"{'':26s}{'clean':>14s}{'flood':>14s}")
    for name, fmt in (("finished", str), ("rounds_done", str), ("wall_s", str), ("peak_rss_mb", str)):
        print(f"{name:26s}{fmt(clean[name]):>14s}{fmt(flood[name]):>14s}")
    print(f"{'final accuracy':26s}{acc(clean):>14s}{acc(flood):>14s}")
    for name in ("inbox_dropped", "capped", "clipped"):
        print(f"{name:26s}{clean[name]:>14d}{flood[name]:>14d}")
    for reason in sorted(set(clean["rejected"]) | set(flood["rejected"])):
        counts = (clean["rejected"].get(reason, 0), flood["rejected"].get(reason, 0))
        print(f"{'rejected: ' + reason:26s}{counts[0]:>14d}{counts[1]:>14d}")
    print(f"flood: {sum(flood['flood_sent'].values())} messages in {flood['flood_s']} s: {flood['flood_sent']}")
    if flood["flood_s"] < float(summary["run"]["options"]["seconds"]) - 1:
        print("warning: the run ended before the flood's --seconds; raise --rounds for a full-length flood")
    print(f"peak RSS ratio {summary['peak_rss_ratio']}x (goal <= 2x); accuracy gap {summary['accuracy_gap_pt']} pt "
          f"(goal <= 0.5); goals met: {summary['goals']}")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seconds", type=float, default=60.0, help="flood duration (default 60)")
    p.add_argument("--rate", type=float, default=300.0, help="hostile messages per second, all kinds (default 300)")
    p.add_argument("--rounds", type=int, default=800,
                   help="rounds of each run; enough that the flooded run outlasts a 60 s flood (default 800)")
    p.add_argument("--devices", type=int, default=3, help="honest devices (default 3)")
    p.add_argument("--limit-examples", type=int, default=300, help="examples per device (default 300)")
    p.add_argument("--eval-examples", type=int, default=1000, help="test examples evaluated (default 1000)")
    p.add_argument("--hidden", type=int, default=32, help="MLP hidden width (default 32)")
    p.add_argument("--max-run-s", type=float, default=600.0, help="kill a run after this long (default 600)")
    p.add_argument("--data-dir", type=Path, default=DEFAULT_DATA, help="Fashion-MNIST IDX directory")
    p.add_argument("--work", type=Path, help="working directory (default: a temporary one, removed)")
    p.add_argument("--json", type=Path, help="also write the figures here")
    p.add_argument("--admit-flooders", action="store_true",
                   help="flooders also say 'online' and join the fleet as hostile participants")
    opts = p.parse_args(argv)
    if not (opts.seconds > 0 and opts.rate > 0 and opts.rounds >= 1 and opts.devices >= 2):
        p.error("--seconds and --rate must be > 0, --rounds >= 1, --devices >= 2")
    return opts


def main(argv: list[str] | None = None) -> int:
    opts = parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="hostile-") as tmp:
        work = opts.work or Path(tmp)
        bundle = export_bundle(work, opts.hidden)
        with LocalMosquitto(work / "broker", persistence=False) as broker:
            clean = run_fleet(opts, broker.url, bundle, work / "clean", flood=False)
            flood = run_fleet(opts, broker.url, bundle, work / "flood", flood=True)
    summary = report(clean, flood)
    summary["run"] = {"command": " ".join([Path(sys.argv[0]).name, *(argv if argv is not None else sys.argv[1:])]),
                      "date_utc": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                      "machine": f"{platform.node()} {platform.machine()} {os.cpu_count()} CPUs, "
                                 f"Python {platform.python_version()}", "options": {
                          k: str(v) for k, v in vars(opts).items()}}
    print_report(summary)
    if opts.json is not None:
        opts.json.parent.mkdir(parents=True, exist_ok=True)
        opts.json.write_text(json.dumps(summary, indent=2) + "\n")
    return 0 if all(summary["goals"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
