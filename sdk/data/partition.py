"""Split a labelled data set across ``count`` simulated devices, deterministically by seed.

Three schemes, named by a ``PartitionSpec`` (parsed from ``"iid"``, ``"dirichlet:<alpha>"``,
``"shards"`` or ``"shards:<per device>"``):

- **iid**: shuffle, split evenly.
- **dirichlet**: label skew of Hsu, Qi & Brown 2019, "Measuring the Effects of Non-Identical
  Data Distribution for Federated Visual Classification": per class, the share each device
  gets is drawn from Dir(alpha); small alpha -> each device sees few classes.
- **shards**: pathological non-IID split of McMahan et al. 2017, "Communication-Efficient
  Learning of Deep Networks from Decentralized Data": sort by label, cut into
  ``count * shards_per_device`` shards, deal each device ``shards_per_device`` random shards.

Every device computes its own part from the shared seed, so nothing but the spec and seed
travels. numpy does not promise identical random streams across versions, hence
``partition_digest``: devices and aggregator can compare one short string to be sure.
"""
from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass
from typing import Literal

import numpy as np

from ..errors import ConfigError

Scheme = Literal["iid", "dirichlet", "shards"]
SCHEMES: tuple[str, ...] = ("iid", "dirichlet", "shards")
# Dirichlet re-draws are cheap (sizes only, no index shuffling), so many attempts cost
# milliseconds; past this the requested split is impractical and we say so.
DIRICHLET_MAX_ATTEMPTS = 10_000
# A device needs some data to take an SGD step; 10 examples, less on tiny data sets.
DIRICHLET_MIN_EXAMPLES = 10


@dataclass(frozen=True)
class PartitionSpec:
    """Which partitioner to use and its parameter (``alpha`` only for dirichlet)."""

    scheme: Scheme
    alpha: float | None = None
    shards_per_device: int = 2

    def __post_init__(self) -> None:
        if self.scheme not in SCHEMES:
            raise ConfigError(f"partition scheme {self.scheme!r} unknown (known: {', '.join(SCHEMES)})")
        if self.scheme == "dirichlet":
            if not isinstance(self.alpha, (int, float)) or isinstance(self.alpha, bool) \
                    or not math.isfinite(self.alpha) or self.alpha <= 0:
                raise ConfigError(f"dirichlet partition needs alpha > 0 and finite, got {self.alpha!r}")
            object.__setattr__(self, "alpha", float(self.alpha))  # so str() -> parse() round-trips
        elif self.alpha is not None:
            raise ConfigError(f"partition scheme {self.scheme!r} takes no alpha (got {self.alpha!r})")
        if isinstance(self.shards_per_device, bool) or not isinstance(self.shards_per_device, int) \
                or self.shards_per_device < 1:
            raise ConfigError(f"shards_per_device must be an integer >= 1, got {self.shards_per_device!r}")

    @classmethod
    def parse(cls, text: str) -> "PartitionSpec":
        """Parse ``"iid"``, ``"dirichlet:0.3"``, ``"shards"`` or ``"shards:2"``."""
        usage = 'expected "iid", "dirichlet:<alpha>", "shards" or "shards:<shards per device>"'
        if not isinstance(text, str):
            raise ConfigError(f"partition spec must be a string, got {type(text).__name__}; {usage}")
        name, sep, arg = text.strip().partition(":")
        if name == "iid" and not sep:
            return cls("iid")
        if name == "dirichlet" and sep:
            try:
                alpha = float(arg)
            except ValueError:
                raise ConfigError(f"partition spec {text!r}: alpha {arg!r} is not a number; {usage}") from None
            return cls("dirichlet", alpha=alpha)
        if name == "shards" and not sep:
            return cls("shards")
        if name == "shards" and sep:
            if not (arg.strip().isascii() and arg.strip().isdigit()):
                raise ConfigError(f"partition spec {text!r}: shards per device {arg!r} is not a positive integer")
            return cls("shards", shards_per_device=int(arg))
        raise ConfigError(f"partition spec {text!r} not understood; {usage}")

    def __str__(self) -> str:
        """The canonical text form, which ``parse`` reads back to an equal spec."""
        if self.scheme == "dirichlet":
            return f"dirichlet:{self.alpha!r}"
        if self.scheme == "shards":
            return f"shards:{self.shards_per_device}"
        return "iid"


def _check_labels(labels: np.ndarray) -> np.ndarray:
    labels = np.asarray(labels)
    if labels.ndim != 1 or not np.issubdtype(labels.dtype, np.integer):
        raise ConfigError(f"labels must be a 1-D integer array, got shape {labels.shape} dtype {labels.dtype}")
    return labels


def _check_count(count: int, examples: int) -> None:
    if isinstance(count, bool) or not isinstance(count, (int, np.integer)):
        raise ConfigError(f"device count must be an integer, got {count!r}")
    if not 1 <= count <= examples:
        raise ConfigError(f"device count must be between 1 and the number of examples ({examples}), got {count}")


def _check_seed(seed: int) -> None:
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ConfigError(f"partition seed must be an integer >= 0, got {seed!r}")


def _iid(labels: np.ndarray, count: int, rng: np.random.Generator) -> list[np.ndarray]:
    order = rng.permutation(len(labels))
    return list(np.array_split(order, count))


def _dirichlet(labels: np.ndarray, count: int, alpha: float, rng: np.random.Generator) -> list[np.ndarray]:
    classes = np.unique(labels)
    by_class = [rng.permutation(np.flatnonzero(labels == c)) for c in classes]
    class_sizes = np.array([len(members) for members in by_class])
    min_examples = max(1, min(DIRICHLET_MIN_EXAMPLES, len(labels) // (count * 10)))
    for _ in range(DIRICHLET_MAX_ATTEMPTS):
        # One row per class: that class's shares over the devices.
        shares = rng.dirichlet(np.full(count, alpha), size=len(classes))
        if not np.isfinite(shares).all():
            continue  # tiny alpha can underflow every gamma draw to zero
        # Floored cumulative cut points: per class the counts sum exactly to the class size.
        cuts = np.floor(np.cumsum(shares, axis=1) * class_sizes[:, None]).astype(np.int64)
        cuts[:, -1] = class_sizes
        per_device = np.diff(cuts, axis=1, prepend=0)
        if per_device.sum(axis=0).min() >= min_examples:
            break
    else:
        raise ConfigError(
            f"dirichlet partition with alpha={alpha} could not give each of {count} devices at least "
            f"{min_examples} of {len(labels)} examples in {DIRICHLET_MAX_ATTEMPTS} draws; "
            "raise alpha or use fewer devices"
        )
    parts: list[list[np.ndarray]] = [[] for _ in range(count)]
    for members, bounds in zip(by_class, cuts):
        for device, chunk in enumerate(np.split(members, bounds[:-1])):
            parts[device].append(chunk)
    return [np.concatenate(chunks) for chunks in parts]


def _shards(labels: np.ndarray, count: int, per_device: int, rng: np.random.Generator) -> list[np.ndarray]:
    num_shards = count * per_device
    if num_shards > len(labels):
        raise ConfigError(
            f"shards partition needs count * shards_per_device ({count} * {per_device} = {num_shards}) "
            f"<= number of examples ({len(labels)})"
        )
    by_label = np.argsort(labels, kind="stable")
    # array_split: shard sizes differ by at most one, and no example is left out.
    shards = np.array_split(by_label, num_shards)
    dealt = rng.permutation(num_shards).reshape(count, per_device)
    return [np.concatenate([shards[s] for s in hand]) for hand in dealt]


def partition(labels: np.ndarray, spec: PartitionSpec, count: int, seed: int) -> list[np.ndarray]:
    """Split ``range(len(labels))`` into ``count`` disjoint, covering, sorted int64 index arrays.

    Equal ``(labels, spec, count, seed)`` give equal results (with the same numpy version).
    """
    labels = _check_labels(labels)
    _check_count(count, len(labels))
    _check_seed(seed)
    rng = np.random.default_rng(seed)
    if spec.scheme == "iid":
        parts = _iid(labels, count, rng)
    elif spec.scheme == "dirichlet":
        assert spec.alpha is not None  # PartitionSpec guarantees it
        parts = _dirichlet(labels, count, spec.alpha, rng)
    else:
        parts = _shards(labels, count, spec.shards_per_device, rng)
    # Sorted: the order is meaningless (training shuffles) and sorted reads are faster.
    return [np.sort(p).astype(np.int64, copy=False) for p in parts]


def device_indices(labels: np.ndarray, spec: PartitionSpec, seed: int, index: int, count: int) -> np.ndarray:
    """The index array of device ``index`` (0-based) among ``count`` devices."""
    if isinstance(index, bool) or not isinstance(index, (int, np.integer)) or not 0 <= index < count:
        raise ConfigError(f"device index must be an integer in [0, {count}), got {index!r}")
    return partition(labels, spec, count, seed)[index]


def label_histogram(labels: np.ndarray, indices: np.ndarray, num_classes: int = 10) -> np.ndarray:
    """How many of ``labels[indices]`` fall in each class 0..num_classes-1 (int64)."""
    selected = _check_labels(labels)[np.asarray(indices, dtype=np.int64)]
    if selected.size and (selected.min() < 0 or selected.max() >= num_classes):
        raise ConfigError(
            f"labels must lie in 0..{num_classes - 1}, found {selected.min()}..{selected.max()}"
        )
    return np.bincount(selected, minlength=num_classes).astype(np.int64)


def partition_digest(parts: list[np.ndarray]) -> str:
    """A short sha256 of a partition, so devices and aggregator can check they agree."""
    digest = hashlib.sha256()
    for part in parts:
        as_int64 = np.ascontiguousarray(part, dtype="<i8")
        digest.update(len(as_int64).to_bytes(8, "little"))
        digest.update(as_int64.tobytes())
    return digest.hexdigest()[:16]
