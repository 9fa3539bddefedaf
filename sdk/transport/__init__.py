"""The transport seam (ARCHITECTURE: "Transport"): one protocol, two implementations.

- ``Transport``: the protocol ``Device``, ``Aggregator`` and ``OutagePublisher`` are typed against.
- ``MqttTransport``: MQTT 5 over paho against a real broker (``mqtt``, the only module importing paho).
- ``MemoryBroker`` + ``MemoryTransport``: the in-process twin for tests (``memory``).
- ``topic_matches``/``check_filter``/``check_topic``: MQTT's topic rules, written once (``matching``).
"""
from __future__ import annotations

from ..broker_config import BrokerConfig
from .base import FailureHook, Handler, Transport
from .matching import check_filter, check_topic, topic_matches
from .memory import MemoryBroker, MemoryMessage, MemoryTransport
from .mqtt import MqttTransport

__all__ = ["BrokerConfig", "FailureHook", "Handler", "MemoryBroker", "MemoryMessage", "MemoryTransport",
           "MqttTransport", "Transport", "check_filter", "check_topic", "topic_matches"]
