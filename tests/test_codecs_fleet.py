"""Every registered uplink codec, end to end over a real Mosquitto, under FedAvg and Large Batch.

The aggregator names the codec in the announcement (``--codec``); devices compress their deltas
(FedAvg, McMahan et al. 2017) or gradients (large batch) with it, keeping error-feedback state on
disk; the aggregator decodes and validates. Per codec and strategy: every update is accepted, the
bytes measured on the wire shrink by roughly the codec's ratio against the dense run, the first
aggregate is exactly what the decoded wire updates give, and it points where the dense run's does.

One broker for the module; each case gets a fresh fleet of device threads and its own run
directory, and the dense baseline of a strategy is run once and shared.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import pytest

from edgetrain.aggregator.checkpoint import list_checkpoints, load_checkpoint
from edgetrain.sdk import topics, wire
from edgetrain.sdk.codecs import codec_names, get_codec, parse_codec_spec
from tests.fleet import (  # noqa: F401
    AggregatorThread,
    FleetAssets,
    Sniffer,
    broker_config,
    fleet_assets,
    start_device_threads,
)
from tests.mosquitto import MosquittoBroker

pytestmark = pytest.mark.broker

LIMITS = (48, 48, 48)  # three devices; FedAvg: 3 batches of 16 a round, large batch: one batch of 16 a step
BATCH = 16
LB_LR = 0.1
STRATEGIES = ("fedavg", "large-batch")


@dataclass(frozen=True)
class CodecCase:
    spec: str
    max_wire_ratio: float  # bytes_up per round over the dense run's, upper bound
    min_cosine: float  # first aggregate step vs the dense run's, lower bound (a broken decoder gives ~0)


# Bounds are about twice the nominal ratio (measured: fp16 0.50, q8 0.25, dgc 0.010, stc 0.0056, sketch
# 0.083, random_mask 0.053, low_rank 0.0076 of dense's bytes; cosines 1.0, 0.99995, 0.41, 0.41, 0.75,
# 0.35-0.41, 0.09-0.12), so they fail only when compression or decoding is really broken; a random
# direction in 25,450 dimensions has a cosine of about 0.006.
CASES = (
    CodecCase("dense", 1.01, 0.999999),  # headers differ by a few bytes (the metrics' digits)
    CodecCase("fp16", 0.55, 0.99999),
    CodecCase("q8", 0.3, 0.999),
    CodecCase("dgc:sparsity=0.99", 0.02, 0.2),
    CodecCase("stc:sparsity=0.99", 0.01, 0.2),
    CodecCase("sketch:bits=2", 0.1, 0.5),
    # DRIVE 1-bit on STC's top-k positions; measured 0.0063-0.0064 of dense's bytes, cosines 0.35 (FedAvg),
    # 0.34 (large batch) against STC's 0.42 and 0.41 in the same run
    CodecCase("drive:sparsity=0.99", 0.015, 0.2),
    CodecCase("random_mask:keep=0.1", 0.07, 0.2),
    # The device fills in shapes= from its bundle. B = A^T H along each matrix's long side (784 of
    # 784x32): variance ~196x |H|^2 a device, hence the low cosine of three averaged updates.
    CodecCase("low_rank:rank=4", 0.015, 0.04),
)


@dataclass(frozen=True)
class CodecRun:
    records: list  # RoundRecords
    initial: np.ndarray
    after_round1: np.ndarray  # the server's parameters after the first aggregation (checkpoint)
    round1_updates: dict[str, tuple[int, np.ndarray]]  # device -> (examples, update decoded from the wire)
    specs_on_wire: set[str]


def _flags(strategy: str, spec: str) -> list[str]:
    common = ["--min-devices", str(len(LIMITS)), "--batch-size", str(BATCH), "--eval-examples", "50",
              "--round-timeout", "20", "--codec", spec]
    if strategy == "fedavg":
        return ["--rounds", "2", *common]
    return ["--strategy", "large-batch", "--steps", "3", "--lr", str(LB_LR), "--eval-every", "3",
            "--checkpoint-every", "1", *common]


@pytest.fixture(scope="module")
def codec_run(module_broker: MosquittoBroker, fleet_assets: FleetAssets,  # noqa: F811
              tmp_path_factory: pytest.TempPathFactory) -> Callable[..., CodecRun]:
    """``codec_run(strategy, spec, tag)``: one run on a fresh fleet, cached per (strategy, spec, tag), so
    the dense baseline of a strategy runs once and the ``dense`` case is a second, independent run."""
    cache: dict[tuple[str, str, str], CodecRun] = {}
    config = broker_config(module_broker.url)

    def run(strategy: str, spec: str, tag: str = "case") -> CodecRun:
        key = (strategy, spec, tag)
        if key in cache:
            return cache[key]
        fleet = f"{strategy}-{parse_codec_spec(spec)[0]}-{tag}"
        root = tmp_path_factory.mktemp(fleet)
        sniffer = Sniffer(config, f"sniffer-{fleet}").subscribe(topics.update_filter(fleet),
                                                               topics.status_filter(fleet)).connect()
        # Device ids are MQTT client ids: unique per run, so no run resumes another's broker session.
        devices = start_device_threads(config, fleet_assets, fleet, root / "devices", LIMITS, prefix=fleet)
        try:
            names = [d.device.config.device_id for d in devices]
            sniffer.wait_online(fleet, names)
            out = root / "run"
            records = AggregatorThread(config, fleet_assets, fleet, out, *_flags(strategy, spec)).start().join(60)
            updates: dict[str, tuple[int, np.ndarray]] = {}
            specs: set[str] = set()
            for _, update in sniffer.decoded(wire.Update, topics.update_filter(fleet)[:-1]):
                assert isinstance(update, wire.Update)
                specs.add(update.codec)
                if update.round_id == 1:
                    name, params = parse_codec_spec(update.codec)
                    vector = get_codec(name).decode(update.payload, fleet_assets.num_params, params)
                    updates[update.device_id] = (update.num_examples, vector.astype(np.float64))
            after = load_checkpoint(dict(list_checkpoints(out))[1]).params
        finally:
            for d in devices:
                d.stop()
            sniffer.close()
        cache[key] = CodecRun(records, fleet_assets.initial_params, after, updates, specs)
        return cache[key]

    return run


def _expected_round1(strategy: str, run: CodecRun) -> np.ndarray:
    """The first aggregate recomputed in numpy from the updates that crossed the broker."""
    counts = np.array([n for n, _ in run.round1_updates.values()], dtype=np.float64)
    mean = sum(n * v for n, v in run.round1_updates.values()) / counts.sum()
    step = mean if strategy == "fedavg" else -LB_LR * mean  # server SGD: the first momentum buffer is g
    return run.initial.astype(np.float64) + step


def _cosine(a: np.ndarray, b: np.ndarray) -> float:
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


def test_every_registered_codec_is_covered() -> None:
    assert {parse_codec_spec(case.spec)[0] for case in CASES} == set(codec_names())


@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize("case", CASES, ids=lambda c: c.spec)
def test_codec_end_to_end(strategy: str, case: CodecCase, codec_run: Callable[..., CodecRun]) -> None:
    dense = codec_run(strategy, "dense", "baseline")
    run = codec_run(strategy, case.spec)
    expected_rounds = list(range(1, len(dense.records) + 1))

    # Every round: all devices reported, nothing rejected (the codec's bytes decode and validate).
    assert [r.round_id for r in run.records] == expected_rounds
    for r in run.records:
        assert (r.devices_chosen, r.devices_reported, dict(r.devices_rejected)) == (len(LIMITS), len(LIMITS), {})
    name = parse_codec_spec(case.spec)[0]
    assert {parse_codec_spec(s)[0] for s in run.specs_on_wire} == {name}
    if name == "low_rank":  # the device completed the spec with its bundle's layer shapes
        assert all("shapes=" in s for s in run.specs_on_wire)

    # Bytes measured on the wire shrink by roughly the codec's ratio; the payload ratio agrees.
    for r, d in zip(run.records, dense.records):
        ratio = r.bytes_up / d.bytes_up
        assert ratio <= case.max_wire_ratio, f"round {r.round_id}: {ratio:.4f} of dense's bytes"
        assert r.extra["uplink_compression"] >= 0.9 / case.max_wire_ratio
    if name == "dense":
        assert all(r.extra["uplink_compression"] == 1.0 for r in run.records)

    # The server aggregated exactly what the devices put on the wire...
    examples = sorted(LIMITS) if strategy == "fedavg" else [BATCH] * len(LIMITS)
    assert sorted(n for n, _ in run.round1_updates.values()) == examples
    np.testing.assert_allclose(run.after_round1, _expected_round1(strategy, run), rtol=0, atol=1e-6)
    # ...and it points where the uncompressed aggregate does (round 1 starts from the same model and
    # data, so the devices computed the same raw updates as in the dense run).
    step = run.after_round1.astype(np.float64) - run.initial
    dense_step = dense.after_round1.astype(np.float64) - dense.initial
    assert _cosine(step, dense_step) >= case.min_cosine
    if name == "dense":  # lossless: the independent baseline run's parameters, to float32 summation order
        np.testing.assert_allclose(run.after_round1, dense.after_round1, rtol=0, atol=1e-7)
    if name == "fp16":  # each value rounded to half precision: error within 2^-11 of its magnitude
        bound = 2.0 ** -11 * sum(n * np.abs(v) for n, v in dense.round1_updates.values())
        bound /= sum(n for n, _ in dense.round1_updates.values())
        if strategy != "fedavg":
            bound *= LB_LR
        assert np.all(np.abs(step - dense_step) <= bound + 1e-7)
