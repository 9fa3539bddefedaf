"""Secure aggregation in real FedAvg rounds over a real Mosquitto (``aggregator.secure_rounds``,
``sdk.secagg.device_round``): the aggregator applies the survivors' mean of the very vectors the devices
masked, to the quantisation error, with no update ever on the broker in the clear; dropouts before and after
the masked input; refusals at start."""
from __future__ import annotations

import json
import signal
import threading
from pathlib import Path
from typing import Callable

import numpy as np
import pytest

from edgetrain.aggregator.cli import aggregator_config
from edgetrain.sdk import topics, wire
from edgetrain.sdk.attack import Attack
from edgetrain.sdk.errors import ConfigError
from edgetrain.sdk.round_settings import RoundSettings
from edgetrain.sdk.secagg import device_round
from edgetrain.sdk.secagg.quantize import FixedPoint
from edgetrain.sdk.wire.secagg import SecAggMaskedInput, SecAggShares
from tests.fleet import (AggregatorThread, DeviceThread, FleetAssets, Sniffer, broker_config, cleanup,  # noqa: F401
                         fleet_assets, make_device, metrics, round_args, spawn_device,
                         start_device_threads, wait_for)
from tests.mosquitto import MosquittoBroker
from tests.test_secagg_protocol import CHI2_CRITICAL as _CHI2_CRITICAL, chi_square

CLIP, BITS = 0.5, 20
# The in-memory test's upper 1e-6 points, plus df 63 (scipy.stats.chi2.ppf(1 - 1e-6, 63)) for a 22-bit ring's top 6.
CHI2_CRITICAL = {**_CHI2_CRITICAL, 63: 131.37}


@pytest.fixture
def masked_vectors(monkeypatch: pytest.MonkeyPatch) -> dict[str, np.ndarray]:
    """device -> the float vector it handed to its SecAgg+ session (what a plain update would have carried)."""
    seen: dict[str, np.ndarray] = {}
    lock = threading.Lock()
    original = device_round.SecureDeviceRound.__init__

    def recording(self, transport, fleet, device_id, run_id, round_id, update) -> None:  # noqa: ANN001
        with lock:
            seen[device_id] = np.array(update, dtype=np.float64)
        original(self, transport, fleet, device_id, run_id, round_id, update)

    monkeypatch.setattr(device_round.SecureDeviceRound, "__init__", recording)
    return seen


def _run_secure(broker: MosquittoBroker, assets: FleetAssets, tmp_path: Path, cleanup: list, fleet: str,
                num_devices: int, *flags: str, before_round: Callable[[list[DeviceThread]], None] | None = None,
                during_round: Callable[[], None] | None = None) -> tuple[AggregatorThread, list, Sniffer]:
    """One secure round of ``num_devices`` device threads; ``before_round(devices)`` runs before the aggregator
    starts, ``during_round()`` on the test thread while the round runs. The sniffer records the update and
    secure-aggregation topics (what the aggregator, or anyone reading the broker, sees) and the statuses."""
    config = broker_config(broker.url)
    sniffer = Sniffer(config).subscribe(topics.update_filter(fleet), topics.secagg_filter(fleet),
                                        topics.status_filter(fleet)).connect()
    cleanup.append(sniffer.close)
    devices = start_device_threads(config, assets, fleet, tmp_path / "devices", [30] * num_devices)
    cleanup.extend(d.stop for d in devices)
    if before_round is not None:
        before_round(devices)
    aggregator = AggregatorThread(config, assets, fleet, tmp_path / "run", "--rounds", "1", "--min-devices", "3",
                                  "--secure-aggregation", "--secagg-clip", str(CLIP), "--secagg-bits", str(BITS),
                                  "--round-timeout", "60", "--join-timeout", "60", *flags).start()
    cleanup.append(aggregator.stop)
    if during_round is not None:
        during_round()
    records = aggregator.join(120)
    return aggregator, records, sniffer


def _check_mean(aggregator: AggregatorThread, assets: FleetAssets, vectors: list[np.ndarray]) -> None:
    """The applied FedAvg step is the uniform mean of ``vectors`` (clipped) to the quantisation bound."""
    n = len(vectors)
    plain_sum = np.sum([np.clip(v, -CLIP, CLIP) for v in vectors], axis=0)
    bound = FixedPoint(CLIP, BITS, n).sum_error_bound(n)  # n·step/2 on the sum, step/2 on the mean
    secure_mean = aggregator.aggregator.params.astype(np.float64) - assets.initial_params.astype(np.float64)
    gap = np.abs(secure_mean * n - plain_sum)
    float32_slack = n * 1e-6  # the parameters are float32 (|w| < 1: ulp <= 6e-8 on each of w and w + Δ)
    assert gap.max() <= bound + float32_slack, (gap.max(), bound)
    assert np.abs(plain_sum).max() > 100 * bound  # the check has teeth: the sum is far above the error


def test_secure_round_sum_equals_plain_fedavg_sum(broker: MosquittoBroker, fleet_assets: FleetAssets,
                                                  tmp_path: Path, cleanup: list[Callable[[], None]],
                                                  masked_vectors: dict[str, np.ndarray]) -> None:
    aggregator, records, sniffer = _run_secure(broker, fleet_assets, tmp_path, cleanup, "secagg-sum", 4)
    assert sorted(masked_vectors) == [f"dev-{i}" for i in range(4)]
    _check_mean(aggregator, fleet_assets, list(masked_vectors.values()))
    assert not [m for _, m in sniffer.decoded(wire.Update)]  # no update ever crossed the broker readable
    extra = records[-1].extra
    assert (extra["secure_aggregation"], extra["secagg_survivors"], extra["secagg_dropped"]) == (True, 4, 0)
    assert extra["secagg_bytes_up"] > 4 * 8 * fleet_assets.num_params  # four masked uint64 vectors at least
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())["extra"]
    assert summary["secure_aggregation"] is True and summary["secagg"]["value_bits"] == BITS


def test_secure_round_survives_dropouts_before_and_after_masked_input(
        broker: MosquittoBroker, fleet_assets: FleetAssets, tmp_path: Path, cleanup: list[Callable[[], None]],
        masked_vectors: dict[str, np.ndarray], monkeypatch: pytest.MonkeyPatch) -> None:
    # dev-7 and dev-8 go silent right after their masked inputs (before unmasking), dev-9 right after its
    # shares (before its masked input): the sum is of dev-0..dev-8, dev-9's pairwise masks removed.
    monkeypatch.setenv(device_round.STOP_AFTER_ENV, "dev-7=masked_input,dev-8=masked_input,dev-9=shares")
    aggregator, records, _ = _run_secure(broker, fleet_assets, tmp_path, cleanup, "secagg-drop", 10,
                                         "--secagg-stage-timeout", "4")
    extra = records[-1].extra
    assert (extra["secagg_survivors"], extra["secagg_dropped"]) == (9, 1)
    assert records[-1].devices_reported == 9
    _check_mean(aggregator, fleet_assets, [masked_vectors[f"dev-{i}"] for i in range(9)])


# -- the broker's view and tampering, against the real Mosquitto -----------------------------------------------
def test_the_brokers_view_of_a_masked_input_is_uniform_bytes(
        broker: MosquittoBroker, fleet_assets: FleetAssets, tmp_path: Path, cleanup: list[Callable[[], None]],
        masked_vectors: dict[str, np.ndarray]) -> None:
    """What crosses the broker on dev-0's topic (what the aggregator reads) is its masked input: uniform in the
    ring, though dev-0's quantised update is far from it (the same statistic flags that)."""
    aggregator, records, sniffer = _run_secure(broker, fleet_assets, tmp_path, cleanup, "secagg-view", 4)
    assert records[-1].extra["secagg_survivors"] == 4
    frames = [m for t, m in sniffer.decoded(SecAggMaskedInput) if t == topics.secagg_topic("secagg-view", "dev-0")]
    assert len(frames) == 1
    ring_bits = FixedPoint(CLIP, BITS, 4).ring_bits  # 22: the masked values are uniform in [0, 2^22)
    values = np.frombuffer(bytes(frames[0].payload), dtype="<u8")
    assert values.size == fleet_assets.num_params and int(values.max()) >> ring_bits == 0  # the bytes above: 0
    assert chi_square(_byte_counts(values)) < CHI2_CRITICAL[255]
    assert chi_square(np.bincount((values >> 16).astype(np.int64), minlength=1 << (ring_bits - 16))) \
        < CHI2_CRITICAL[(1 << (ring_bits - 16)) - 1]
    plain = FixedPoint(CLIP, BITS, 4).quantise(masked_vectors["dev-0"])  # what it would be without the masks
    assert chi_square(_byte_counts(plain)) > 100 * CHI2_CRITICAL[255]


def _byte_counts(values: np.ndarray) -> np.ndarray:
    """How often each value 0..255 occurs among the two low bytes of ``values`` (the ring's two full bytes)."""
    values = values.astype(np.uint64)
    return np.bincount(np.concatenate([values & 0xFF, (values >> 8) & 0xFF]).astype(np.int64), minlength=256)


def _held_topic(fleet: str, device: str) -> str:
    """Where the interceptor parks a device's message: below its topic, so the aggregator's ``secagg/+`` misses it."""
    return topics.secagg_topic(fleet, device) + "/held"


def _intercept(devices: list[DeviceThread], device_id: str, kind: type) -> None:
    """A man in the middle on ``device_id``'s link: its ``kind`` frame goes to the held topic instead of its own
    (every other frame passes), for the attacker's raw client to alter and publish on the real topic."""
    device = next(d.device for d in devices if d.device.config.device_id == device_id)
    transport, fleet = device.transport, device.config.fleet
    publish = transport.publish

    def diverting(topic: str, payload: bytes, *args: object, **kwargs: object) -> None:
        if topic == topics.secagg_topic(fleet, device_id) and isinstance(wire.decode(payload), kind):
            topic = _held_topic(fleet, device_id)
        publish(topic, payload, *args, **kwargs)

    transport.publish = diverting  # type: ignore[method-assign]


def _flip_byte(frame: bytes, index: int) -> bytes:
    """``frame``'s message with payload byte ``index`` flipped, re-encoded (a valid frame: CRC redone)."""
    message = wire.decode(frame)
    payload = bytearray(bytes(message.payload))
    payload[index] ^= 0x01
    return wire.encode(type(message)(**wire.read_frame(frame).header, payload=bytes(payload)))


def _tamper_and_forward(broker: MosquittoBroker, fleet: str, device_id: str, kind: type,
                        index: Callable[[object], int]) -> Callable[[], None]:
    """The attacker: a raw client that takes ``device_id``'s held ``kind`` frame off the broker, flips payload
    byte ``index(message)`` and publishes it on the device's real topic, as if the device had sent it."""
    attacker = Sniffer(broker_config(broker.url), client_id="mallory").subscribe(_held_topic(fleet, device_id))

    def run() -> None:
        try:
            attacker.connect()
            _, message = attacker.wait_for_message(kind, what=f"{device_id}'s {kind.__name__}", timeout_s=90)
            _, frame = next((t, p) for t, p in attacker.snapshot() if isinstance(wire.decode(p), kind))
            attacker.transport.publish(topics.secagg_topic(fleet, device_id), _flip_byte(frame, index(message)))
        finally:
            attacker.close()
    return run


def test_a_tampered_masked_input_on_the_broker_is_rejected_and_the_sum_is_of_the_others(
        broker: MosquittoBroker, fleet_assets: FleetAssets, tmp_path: Path, cleanup: list[Callable[[], None]],
        masked_vectors: dict[str, np.ndarray]) -> None:
    fleet = "secagg-tamper-input"
    attack = _tamper_and_forward(broker, fleet, "dev-2", SecAggMaskedInput, lambda m: len(m.payload) // 2)
    aggregator, records, sniffer = _run_secure(
        broker, fleet_assets, tmp_path, cleanup, fleet, 4, "--secagg-stage-timeout", "4",
        before_round=lambda devices: _intercept(devices, "dev-2", SecAggMaskedInput), during_round=attack)
    # The altered frame did cross the broker on dev-2's own topic, and only it: the genuine one never did.
    on_topic = [m for t, m in sniffer.decoded(SecAggMaskedInput) if t == topics.secagg_topic(fleet, "dev-2")]
    assert len(on_topic) == 1
    extra = records[-1].extra
    assert extra["secagg_rejected"] == {"masked_input_authentication_failed": 1}
    assert (extra["secagg_survivors"], extra["secagg_dropped"]) == (3, 1)
    _check_mean(aggregator, fleet_assets, [masked_vectors[d] for d in ("dev-0", "dev-1", "dev-3")])


def test_a_tampered_share_on_the_broker_is_rejected_by_its_recipient_and_the_sum_is_of_the_others(
        broker: MosquittoBroker, fleet_assets: FleetAssets, tmp_path: Path, cleanup: list[Callable[[], None]],
        masked_vectors: dict[str, np.ndarray]) -> None:
    # dev-1's ciphertext for its first neighbour gets one byte flipped: the aggregator cannot tell (it routes
    # sealed boxes), the recipient's AEAD check fails, it leaves the round saying why, and counts as dropped.
    fleet = "secagg-tamper-share"
    attack = _tamper_and_forward(broker, fleet, "dev-1", SecAggShares, lambda m: 20)  # inside box 0
    aggregator, records, sniffer = _run_secure(
        broker, fleet_assets, tmp_path, cleanup, fleet, 4, "--secagg-stage-timeout", "4",
        before_round=lambda devices: _intercept(devices, "dev-1", SecAggShares), during_round=attack)
    _, shares = sniffer.wait_for_message(SecAggShares, lambda t, m: t == topics.secagg_topic(fleet, "dev-1"))
    victim = shares.recipients[0]
    wait_for(lambda: any("secure aggregation aborted: share_auth_failed" in m.skip_reason  # type: ignore[attr-defined]
                         for t, m in sniffer.decoded(wire.Status) if t == topics.status_topic(fleet, victim)),
             f"{victim}'s status to say why it left the round")
    extra = records[-1].extra
    assert (extra["secagg_survivors"], extra["secagg_dropped"]) == (3, 1)
    others = [d for d in sorted(masked_vectors) if d != victim]
    assert len(others) == 3
    _check_mean(aggregator, fleet_assets, [masked_vectors[d] for d in others])


# -- dropouts by real process kills ------------------------------------------------------------------------------
def _random_update(index: int, round_id: int, num_params: int) -> np.ndarray:
    """The update an ``edgetrain device --attack random --index INDEX`` (seed 0) sends in ``round_id``: known
    here without reading it, so the sum over a killed process's masked input can be checked exactly."""
    rng = np.random.default_rng([0, index, round_id, 1])  # sdk.device: the attacker's own stream
    return Attack("random").poison_update(np.zeros(num_params, dtype=np.float32), rng).astype(np.float64)


def test_secure_round_survives_sigkilled_device_processes_before_and_after_masked_input(
        broker: MosquittoBroker, fleet_assets: FleetAssets, tmp_path: Path, cleanup: list[Callable[[], None]],
        masked_vectors: dict[str, np.ndarray], monkeypatch: pytest.MonkeyPatch) -> None:
    """dev-7 and dev-8 are ``edgetrain device`` processes SIGKILLed after their masked inputs crossed the broker
    (before unmasking), dev-9 one SIGKILLed after its shares (before its masked input); the stop hook parks each
    at its stage first so the kill lands there. The sum is dev-0..dev-8's, dev-9's pairwise masks removed."""
    fleet, count = "secagg-kill", 10
    monkeypatch.setenv(device_round.STOP_AFTER_ENV, "dev-7=masked_input,dev-8=masked_input,dev-9=shares")
    config = broker_config(broker.url)
    sniffer = Sniffer(config).subscribe(topics.secagg_filter(fleet), topics.status_filter(fleet)).connect()
    cleanup.append(sniffer.close)
    threads = [DeviceThread(make_device(config, fleet_assets, fleet, f"dev-{i}", tmp_path / "devices" / f"dev-{i}",
                                        index=i, count=count, limit=30)).start() for i in range(7)]
    cleanup.extend(d.stop for d in threads)
    # dev-7 and dev-8 send a seeded random update (--attack random) so the test knows what their masks hide.
    processes = {i: spawn_device(broker.url, fleet_assets, fleet, f"dev-{i}", tmp_path / "devices", index=i,
                                 count=count, limit=30, extra=["--attack", "random"] if i < 9 else [])
                 for i in (7, 8, 9)}
    cleanup.extend(p.kill for p in processes.values())
    aggregator = AggregatorThread(config, fleet_assets, fleet, tmp_path / "run", "--rounds", "1", "--min-devices",
                                  str(count), "--secure-aggregation", "--secagg-clip", str(CLIP), "--secagg-bits",
                                  str(BITS), "--secagg-stage-timeout", "4", "--round-timeout", "90",
                                  "--join-timeout", "120").start()
    cleanup.append(aggregator.stop)
    for i, kind in ((7, SecAggMaskedInput), (8, SecAggMaskedInput), (9, SecAggShares)):
        sniffer.wait_for_message(kind, lambda t, m, i=i: t == topics.secagg_topic(fleet, f"dev-{i}"),
                                 f"dev-{i}'s {kind.__name__} on the broker", timeout_s=180)
        processes[i].signal(signal.SIGKILL)
        assert processes[i].wait() == -signal.SIGKILL, processes[i].log()[-2000:]
    sniffer.wait_online(fleet, ["dev-7", "dev-8", "dev-9"], online=False)  # the broker saw them die (their wills)
    records = aggregator.join(240)
    extra = records[-1].extra
    assert (extra["secagg_survivors"], extra["secagg_dropped"]) == (9, 1)
    assert records[-1].devices_reported == 9
    killed = [_random_update(i, records[-1].round_id, fleet_assets.num_params) for i in (7, 8)]
    _check_mean(aggregator, fleet_assets, [masked_vectors[f"dev-{i}"] for i in range(7)] + killed)


@pytest.mark.parametrize("flags, why", [
    (("--codec", "dgc"), "dense uplink codec"),
    (("--codec", "random_mask"), "dense uplink codec"),
    (("--aggregation", "median"), "robust rule"),
    (("--dp-clip", "1", "--dp-noise-multiplier", "1"), "DP-FedAvg"),
    (("--max-norm", "3"), "never sees one update's norm"),
    (("--strategy", "large-batch"), "FL strategies"),
    (("--min-devices", "2"), "--min-devices >= 3"),
    (("--secagg-neighbours", "4", "--secagg-threshold", "2"), "exceed half"),
    (("--secagg-bits", "60", "--secagg-clip", "1"), "ring bits"),
])
def test_refused_at_start_with_the_reason(flags: tuple[str, ...], why: str) -> None:
    args = round_args("--secure-aggregation", "--min-devices", "3", *flags)
    with pytest.raises(ConfigError, match=why):
        aggregator_config(args, Path("."), "f", resume=False)


def test_dense_and_q8_accepted_and_flag_off_is_plain() -> None:
    for codec in ("dense", "q8", "fp16"):
        config = aggregator_config(round_args("--secure-aggregation", "--min-devices", "3", "--codec", codec),
                                   Path("."), "f", resume=False)
        assert config.secure_aggregation is not None
    assert aggregator_config(round_args("--codec", "dgc"), Path("."), "f", resume=False).secure_aggregation is None


def test_secure_flag_is_a_typed_round_setting_on_the_wire() -> None:
    settings = RoundSettings(secure_aggregation=True)
    assert RoundSettings.from_mapping(settings.to_dict()).secure_aggregation is True
    assert RoundSettings.from_mapping({}).secure_aggregation is False  # an older aggregator's frame: plain
    with pytest.raises(ConfigError, match="secure_aggregation must be true or false"):
        RoundSettings.from_mapping({"secure_aggregation": "yes"})
