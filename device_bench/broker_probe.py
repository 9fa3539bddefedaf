"""Publish -> PUBACK latency of a real update frame, through the SDK's own ``Transport``.

What it measures: from ``Transport.publish`` being called with one Update frame (QoS 1) until the
broker's PUBACK reaches the client: paho's queueing, sending the whole frame over TCP (or TLS), the
broker receiving and (if persistent) storing it, and the PUBACK's way back. It does not include
delivery to any subscriber or the aggregator's processing. The topic is the update topic of a
separate fleet (``bench`` by default), so no aggregator of a real fleet sees these frames, and a
device's broker ACL (``pattern write edgetrain/+/update/%u``) already allows it.
"""
from __future__ import annotations

import os
import time
from typing import Any

import numpy as np

from edgetrain.sdk import topics

from .bench import LatencyStats
from edgetrain.sdk.energy.meter import EnergyMeter

COMMUNICATION_WINDOW = "communication"


def measure_publish_ack(broker_config: Any, frame: bytes, meter: EnergyMeter, *, fleet: str = "bench",
                        device_id: str = "bench", repeats: int = 10, timeout_s: float = 30.0) -> dict[str, Any]:
    """Publish ``frame`` ``repeats`` times after one untimed warm-up publish; latency stats in seconds."""
    from edgetrain.sdk.transport import MqttTransport  # imports paho only when a broker is asked for

    topic = topics.update_topic(fleet, device_id)
    transport = MqttTransport(broker_config, client_id=f"{device_id}-bench-{os.getpid()}", clean_start=True,
                          session_expiry_s=0)
    connect_started = time.perf_counter()
    transport.connect(timeout_s=timeout_s)
    connect_s = time.perf_counter() - connect_started
    latencies: list[float] = []
    try:
        transport.publish(topic, frame, timeout_s=timeout_s)  # warm-up: TCP windows, broker caches
        for _ in range(repeats):
            meter.begin_window(COMMUNICATION_WINDOW)
            started = time.perf_counter()
            transport.publish(topic, frame, timeout_s=timeout_s)
            latencies.append(time.perf_counter() - started)
            meter.end_window(COMMUNICATION_WINDOW)
    finally:
        transport.close()
    stats = LatencyStats.of(latencies)
    return {
        "measures": "QoS 1 publish of one Update frame until the broker's PUBACK (no subscriber delivery)",
        "broker": broker_config.url,
        "topic": topic,
        "frame_bytes": len(frame),
        "connect_s": connect_s,
        "publish_ack": {k: float(v) if isinstance(v, (float, np.floating)) else v
                        for k, v in stats.__dict__.items()},
        "throughput_bytes_per_s": len(frame) / stats.p50_s if stats.p50_s > 0 else None,
    }
