"""edgetrain: train deep nets on edge devices — Federated Learning and Large Batch Training over MQTT.

The installed distribution holds everything under this one name: ``edgetrain.sdk`` (what runs on a
board), ``edgetrain.aggregator`` (the server), ``edgetrain.export`` (host-side bundles),
``edgetrain.device_bench`` (per-device measurement) and ``edgetrain.cli`` (the command above them all).
"""
from edgetrain.sdk import __version__  # the installed distribution's version, read in one place

__all__ = ["__version__"]
