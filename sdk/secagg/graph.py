"""The SecAgg+ neighbour graph (Bell et al., CCS 2020, section 3): a random k-regular Harary graph.

Devices are put in a pseudo-random order (SHA-256 of a public round seed and the device id, so every party
computes the same graph) and each is joined to the k/2 devices on either side of it in that circular order.
With k >= n - 1 every device neighbours every other (the original SecAgg of Bonawitz et al.).
"""
from __future__ import annotations

import hashlib
from typing import Sequence

from ..errors import ConfigError


def neighbour_graph(devices: Sequence[str], k: int, seed: bytes) -> dict[str, tuple[str, ...]]:
    """Each device's neighbours (sorted), symmetric: v is u's neighbour iff u is v's."""
    if len(set(devices)) != len(devices):
        raise ConfigError("the neighbour graph needs distinct device ids")
    n = len(devices)
    if k < 1:
        raise ConfigError(f"each device needs at least 1 neighbour, got k={k}")
    if k >= n - 1:
        return {d: tuple(sorted(set(devices) - {d})) for d in devices}
    if k % 2:
        raise ConfigError(f"a Harary graph needs an even number of neighbours below n-1, got k={k} for n={n}")
    order = sorted(devices, key=lambda d: (hashlib.sha256(seed + d.encode()).digest(), d))
    graph: dict[str, set[str]] = {d: set() for d in devices}
    for i, device in enumerate(order):
        for offset in range(1, k // 2 + 1):
            other = order[(i + offset) % n]
            graph[device].add(other)
            graph[other].add(device)
    return {d: tuple(sorted(ns)) for d, ns in graph.items()}
