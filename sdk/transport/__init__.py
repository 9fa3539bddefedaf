"""The transport seam (ARCHITECTURE: "Transport"): one protocol, two implementations.

- ``MessageTransport``: the protocol ``Device``, ``Aggregator`` and ``OutagePublisher`` are typed against.
- ``MqttTransport``: MQTT 5 over paho against a real broker (``mqtt``, the only module importing paho).
  ``Transport`` is its former name, kept for the code that constructs one.
- ``MemoryBroker`` + ``MemoryTransport``: the in-process twin for tests (``memory``).
- ``topic_matches``/``check_filter``/``check_topic``: MQTT's topic rules, written once (``matching``).
"""
from __future__ import annotations

from ..broker_config import BrokerConfig
from .base import FailureHook, Handler, MessageTransport
from .matching import check_filter, check_topic, topic_matches
from .memory import MemoryBroker, MemoryMessage, MemoryTransport
from .mqtt import MqttTransport

Transport = MqttTransport  # the name call sites construct today; type against MessageTransport

__all__ = ["BrokerConfig", "FailureHook", "Handler", "MemoryBroker", "MemoryMessage", "MemoryTransport",
           "MessageTransport", "MqttTransport", "Transport", "check_filter", "check_topic", "topic_matches"]
