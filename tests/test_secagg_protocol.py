"""SecAgg+ rounds end to end over the in-memory transport: dropouts, the server's view, tampering."""
from __future__ import annotations

import numpy as np
import pytest

from edgetrain.aggregator.secagg import SecAggParams, SecAggServer, SecAggServerSession, Stage
from edgetrain.sdk import topics
from edgetrain.sdk.secagg.client import SecAggClient
from edgetrain.sdk.secagg.quantize import FixedPoint
from edgetrain.sdk.secagg.session import SecAggDeviceSession
from edgetrain.sdk.transport.memory import MemoryBroker, MemoryTransport
from edgetrain.sdk.wire import decode, encode, read_frame
from edgetrain.sdk.wire.secagg import SecAggMaskedInput, SecAggShares

FLEET, RUN, ROUND, NUM_PARAMS = "f", "run-1", 4, 300
# Upper 1e-6 points of the chi-square distribution (scipy.stats.chi2.ppf(1 - 1e-6, df)): the masks come from
# the OS's CSPRNG, so a uniform source fails this test about twice in a million runs; scipy is not a dependency.
CHI2_CRITICAL = {255: 377.08, 7: 40.52}


def chi_square(counts: np.ndarray) -> float:
    expected = counts.sum() / len(counts)
    return float(((counts - expected) ** 2 / expected).sum())


class Round:
    """A server and ``n`` devices on one memory broker; ``stop_after[d]`` = stages device d answers."""

    def __init__(self, n: int, neighbours: int, threshold: int, stop_after: dict[str, int] | None = None) -> None:
        self.now = [1000.0]
        self.broker = MemoryBroker()
        self.devices = [f"dev-{i:02d}" for i in range(n)]
        rng = np.random.default_rng(7)
        self.updates = {d: rng.uniform(-1, 1, NUM_PARAMS) for d in self.devices}
        params = SecAggParams(threshold, neighbours, FixedPoint(1.0, 16, n), NUM_PARAMS, stage_timeout_s=5.0)
        self.server = SecAggServer(RUN, ROUND, tuple(self.devices), params, clock=lambda: self.now[0])
        server_transport = MemoryTransport(self.broker, "aggregator")
        server_transport.connect()
        self.server_session = SecAggServerSession(server_transport, FLEET, self.server)
        self.sessions = {}
        for d in self.devices:
            transport = MemoryTransport(self.broker, d)
            transport.connect()
            session = SecAggDeviceSession(transport, FLEET, SecAggClient(d, RUN, ROUND),
                                          lambda d=d: self.updates[d])
            self.sessions[d] = session
        self.stop_after = stop_after or {}

    def run(self, before_pump=lambda: None) -> None:
        for session in self.sessions.values():
            session.start()
        for _ in range(50):
            before_pump()
            worked = self.server_session.pump()
            for d, session in self.sessions.items():
                if len(session.stages_done) < self.stop_after.get(d, 3):
                    worked |= session.pump()
            if self.server.stage in (Stage.DONE, Stage.ABORTED):
                return
            if not worked:
                self.now[0] += 6.0  # nobody else will answer: let the stage deadline pass
        raise AssertionError(f"round stuck in {self.server.stage}")

    def plain_sum(self, survivors) -> np.ndarray:
        return np.sum([self.updates[d] for d in survivors], axis=0)


def test_unmasked_sum_equals_the_plain_sum_within_the_quantisation_bound() -> None:
    rnd = Round(10, neighbours=8, threshold=5)
    rnd.run()
    result = rnd.server.result
    assert rnd.server.stage is Stage.DONE and result is not None
    assert result.survivors == tuple(rnd.devices) and result.dropped == ()
    error = np.abs(result.total - rnd.plain_sum(rnd.devices)).max()
    # Bound: each device's rounding moves a value by at most step/2, step = 2·clip/(2^16-1).
    assert error <= result.error_bound == pytest.approx(10 * (2.0 / 65535) / 2, rel=1e-6)


def test_round_survives_one_dropout_before_masking_and_two_after() -> None:
    late = {"dev-03": 2, "dev-07": 2}  # answer roster and delivery (masked input sent), never the unmask request
    rnd = Round(10, neighbours=8, threshold=5, stop_after={"dev-05": 1, **late})  # dev-05 shares keys, then dies
    rnd.run()
    result = rnd.server.result
    assert rnd.server.stage is Stage.DONE, rnd.server.abort_reason
    survivors = sorted(set(rnd.devices) - {"dev-05"})
    assert list(result.survivors) == survivors and result.dropped == ("dev-05",)
    assert np.abs(result.total - rnd.plain_sum(survivors)).max() <= result.error_bound


def test_round_aborts_with_a_reason_when_too_many_drop() -> None:
    rnd = Round(6, neighbours=4, threshold=3, stop_after={f"dev-0{i}": 1 for i in range(4)})
    rnd.run()
    assert rnd.server.stage is Stage.ABORTED
    assert rnd.server.abort_reason.startswith("too_few_devices")


def test_servers_view_of_a_masked_input_is_uniform_bytes() -> None:
    rnd = Round(6, neighbours=4, threshold=3)
    rnd.updates["dev-00"][:] = 0.0  # a highly structured input: all values quantise to the same integer
    rnd.run()
    frames = [m.payload for m in rnd.broker.messages if m.topic == topics.secagg_topic(FLEET, "dev-00")]
    masked = [decode(f) for f in frames if isinstance(decode(f), SecAggMaskedInput)][0]
    ring_bits = FixedPoint(1.0, 16, 6).ring_bits  # 19: values are uniform in [0, 2^19)
    values = np.frombuffer(masked.payload, dtype="<u8")
    low_bytes = np.concatenate([(values & 0xFF), (values >> 8) & 0xFF]).astype(np.int64)  # the full bytes
    counts = np.bincount(low_bytes, minlength=256)
    assert chi_square(counts) < CHI2_CRITICAL[255]
    top = (values >> 16).astype(np.int64)  # the remaining ring_bits - 16 = 3 bits
    assert chi_square(np.bincount(top, minlength=1 << (ring_bits - 16))) < CHI2_CRITICAL[7]
    # The plain quantised input is the constant 32768 (clip 1, 16 bits): the test would catch it.
    plain = np.full(NUM_PARAMS, 32768, dtype=np.int64)
    assert chi_square(np.bincount(np.concatenate([plain & 0xFF, (plain >> 8) & 0xFF]), minlength=256)) > 100 * CHI2_CRITICAL[255]


def _tamper_on(broker: MemoryBroker, topic: str, message_type: type) -> None:
    """Make the broker flip one payload byte of the first ``message_type`` frame on ``topic`` (CRC redone)."""
    original = broker._route
    done = []

    def route(message):
        if message.topic == topic and not done:
            decoded = decode(message.payload)
            if isinstance(decoded, message_type):
                payload = bytearray(decoded.payload)
                payload[len(payload) // 2] ^= 0x01
                fields = {**read_frame(message.payload).header}
                forged = type(decoded)(**fields, payload=bytes(payload))
                message = type(message)(message.topic, encode(forged), message.qos, message.retain, message.sender)
                done.append(True)
        original(message)

    broker._route = route


def test_a_tampered_masked_input_is_rejected_and_the_device_counts_as_dropped() -> None:
    rnd = Round(8, neighbours=6, threshold=4)
    _tamper_on(rnd.broker, topics.secagg_topic(FLEET, "dev-02"), SecAggMaskedInput)
    rnd.run()
    assert rnd.server.rejections["masked_input_authentication_failed"] == 1
    assert rnd.server.stage is Stage.DONE, rnd.server.abort_reason
    assert rnd.server.result.dropped == ("dev-02",)
    survivors = [d for d in rnd.devices if d != "dev-02"]
    assert np.abs(rnd.server.result.total - rnd.plain_sum(survivors)).max() <= rnd.server.result.error_bound


def test_a_tampered_share_is_rejected_by_its_recipient_with_a_reason() -> None:
    rnd = Round(8, neighbours=6, threshold=4)
    _tamper_on(rnd.broker, topics.secagg_topic(FLEET, "dev-01"), SecAggShares)
    rnd.run()
    victims = [d for d, s in rnd.sessions.items() if s.aborted]
    assert len(victims) == 1 and rnd.sessions[victims[0]].aborted == "share_auth_failed"
    assert rnd.server.stage is Stage.DONE, rnd.server.abort_reason
    survivors = [d for d in rnd.devices if d not in victims]
    assert np.abs(rnd.server.result.total - rnd.plain_sum(survivors)).max() <= rnd.server.result.error_bound


def test_a_message_on_another_devices_topic_is_rejected() -> None:
    rnd = Round(5, neighbours=4, threshold=3)
    forged = SecAggClient("dev-01", RUN, ROUND).advertise()
    spy = MemoryTransport(rnd.broker, "mallory")
    spy.connect()
    spy.publish(topics.secagg_topic(FLEET, "dev-02"), encode(forged))
    rnd.run()
    assert rnd.server.rejections["sender_not_topic"] == 1
    assert rnd.server.stage is Stage.DONE
