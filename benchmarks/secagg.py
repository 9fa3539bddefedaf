"""Cost of a secure (SecAgg+) FedAvg round against a plain one: bytes per device and per round, and client /
server milliseconds per stage, at several fleet sizes. The protocol objects run in this process without a
broker (the bytes are the encoded frames a broker would carry; CPU is what each party spends), one device at a
time, so client figures are per device and server figures per round.

    .venv/bin/python benchmarks/secagg.py [--devices 10,100] [--params 25450] [--neighbours 8] [--dropouts 0]
"""
from __future__ import annotations

import argparse
import time
import uuid
from collections import defaultdict

import numpy as np

from edgetrain.aggregator.secagg import SecAggServer, Stage
from edgetrain.aggregator.secure_rounds import SecureAggregation
from edgetrain.sdk import wire
from edgetrain.sdk.secagg.client import SecAggClient
from edgetrain.sdk.wire.secagg import owned_payload

STAGES = ("advertise", "share_keys", "masked_input", "unmask")


def _timed(totals: dict[str, float], stage: str, call, *args):  # noqa: ANN001, ANN202
    started = time.perf_counter()
    out = call(*args)
    totals[stage] += (time.perf_counter() - started) * 1e3
    return out


def secure_round(n: int, num_params: int, neighbours: int, dropouts: int, rng: np.random.Generator) -> dict:
    """One round of ``n`` devices, the last ``dropouts`` of them silent after sharing keys."""
    params = SecureAggregation(neighbours=neighbours).round_params(n, num_params, 60.0)
    devices = [f"dev-{i:04d}" for i in range(n)]
    clients = {d: SecAggClient(d, "bench", 1) for d in devices}
    updates = {d: rng.normal(0, 0.01, num_params) for d in devices}
    server = SecAggServer("bench", 1, tuple(devices), params, time.time)
    client_ms: dict[str, float] = defaultdict(float)
    server_ms: dict[str, float] = defaultdict(float)
    up: dict[str, int] = defaultdict(int)
    down = 0

    def to_server(stage: str, device: str, message: object) -> list:
        frame = wire.encode(message)
        up[device] += len(frame)
        return _timed(server_ms, stage, server.receive, device, owned_payload(wire.decode(frame)))

    def deliver(outgoing: list) -> list[tuple[str, object]]:
        nonlocal down
        frames = [(d, wire.encode(m)) for d, m in outgoing]
        down += sum(len(f) for _, f in frames)
        return [(d, owned_payload(wire.decode(f))) for d, f in frames]

    out: list = []
    for d in devices:
        out += to_server("advertise", d, _timed(client_ms, "advertise", clients[d].advertise))
    for d, roster in deliver(out):
        out = []
        out += to_server("share_keys", d, _timed(client_ms, "share_keys", clients[d].on_roster, roster))
    pending = deliver(out)
    silent = set(devices[n - dropouts:]) if dropouts else set()
    out = []
    for d, delivery in pending:
        if d not in silent:
            out += to_server("masked_input", d, _timed(client_ms, "masked_input", clients[d].on_delivery,
                                                       delivery, updates[d]))
    if not out and server.stage is Stage.MASKED_INPUT:
        out = _timed(server_ms, "masked_input", server._close_stage)  # dropouts: the deadline would close it
    for d, request in deliver(out):
        out = to_server("unmask", d, _timed(client_ms, "unmask", clients[d].on_unmask, request))
    assert server.stage is Stage.DONE, server.abort_reason
    survivors = [d for d in devices if d not in silent]
    truth = np.sum([np.clip(updates[d], -0.5, 0.5) for d in survivors], axis=0)
    assert np.abs(server.result.total - truth).max() <= server.result.error_bound
    return {"client_ms": {s: client_ms[s] / n for s in STAGES}, "server_ms": dict(server_ms),
            "bytes_up_per_device": sum(up.values()) / n, "bytes_down_per_device": down / n,
            "bytes_per_round": sum(up.values()) + down, "k": params.neighbours, "t": params.threshold}


def plain_round(n: int, num_params: int, rng: np.random.Generator) -> dict:
    """A plain FedAvg round's uplink: one dense update frame per device, decoded and summed by the server."""
    total, frame_bytes, server_s = np.zeros(num_params), 0, 0.0
    for i in range(n):
        update = wire.Update(device_id=f"dev-{i:04d}", round_id=1, model_version=0, update_id=uuid.uuid4().hex,
                             num_examples=60, codec="dense", payload=rng.normal(0, 0.01, num_params).astype("<f4")
                             .tobytes(), metrics={}, run_id="bench")
        frame = wire.encode(update)
        frame_bytes += len(frame)
        started = time.perf_counter()
        total += np.frombuffer(wire.decode(frame).payload, dtype="<f4")
        server_s += time.perf_counter() - started
    return {"bytes_up_per_device": frame_bytes / n, "server_ms": server_s * 1e3}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--devices", default="10,100", help="fleet sizes, comma separated (default 10,100)")
    p.add_argument("--params", type=int, default=25_450, help="model size (default: the CI MLP, 25,450)")
    p.add_argument("--neighbours", type=int, default=8, help="SecAgg+ k (default 8)")
    p.add_argument("--dropouts", type=int, default=0, help="devices silent after sharing keys")
    args = p.parse_args()
    rng = np.random.default_rng(0)
    print(f"model {args.params} parameters; dense fp32 update {4 * args.params} B")
    for n in (int(x) for x in args.devices.split(",")):
        plain, secure = plain_round(n, args.params, rng), secure_round(n, args.params, args.neighbours,
                                                                        args.dropouts, rng)
        print(f"\nn={n} (k={secure['k']}, t={secure['t']}, dropouts={args.dropouts})")
        print(f"  plain : up {plain['bytes_up_per_device']:,.0f} B/device; server decode+sum {plain['server_ms']:.1f} ms")
        print(f"  secure: up {secure['bytes_up_per_device']:,.0f} B/device, down {secure['bytes_down_per_device']:,.0f}"
              f" B/device, {secure['bytes_per_round']:,.0f} B/round "
              f"({secure['bytes_up_per_device'] / plain['bytes_up_per_device']:.2f}x plain uplink)")
        print("  client ms/device: " + ", ".join(f"{s} {secure['client_ms'][s]:.2f}" for s in STAGES))
        print("  server ms/round : " + ", ".join(f"{s} {secure['server_ms'].get(s, 0.0):.1f}" for s in STAGES))


if __name__ == "__main__":
    main()
