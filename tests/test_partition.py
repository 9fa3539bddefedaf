"""Partitioners: coverage, disjointness, determinism, and the skew each scheme promises."""
from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from edgetrain.sdk.data import PartitionSpec, device_indices, label_histogram, partition, partition_digest
from edgetrain.sdk.errors import ConfigError

SPECS = [PartitionSpec("iid"), PartitionSpec("dirichlet", alpha=0.5), PartitionSpec("shards", shards_per_device=2)]


def _balanced_labels(per_class: int, num_classes: int = 10, seed: int = 0) -> np.ndarray:
    """Shuffled labels, ``per_class`` of each class (like Fashion-MNIST, which is balanced)."""
    return np.random.default_rng(seed).permutation(np.repeat(np.arange(num_classes), per_class))


def _assert_exact_cover(parts: list[np.ndarray], n: int, count: int) -> None:
    assert len(parts) == count
    assert all(p.dtype == np.int64 and p.ndim == 1 for p in parts)
    assert sum(len(p) for p in parts) == n
    joined = np.concatenate(parts)
    np.testing.assert_array_equal(np.sort(joined), np.arange(n))  # disjoint and covering


@pytest.mark.parametrize("spec", SPECS, ids=str)
@pytest.mark.parametrize("count", [1, 7, 20])
def test_partition_is_an_exact_cover(spec: PartitionSpec, count: int) -> None:
    labels = _balanced_labels(200)
    _assert_exact_cover(partition(labels, spec, count, seed=3), len(labels), count)


@settings(max_examples=60, deadline=None)
@given(
    n=st.integers(1, 400),
    classes=st.integers(1, 10),
    count_fraction=st.floats(0.0, 1.0),
    scheme=st.sampled_from(["iid", "shards"]),
    per_device=st.integers(1, 3),
    seed=st.integers(0, 2**32),
)
def test_exact_cover_property(n: int, classes: int, count_fraction: float, scheme: str, per_device: int, seed: int) -> None:
    labels = np.random.default_rng(seed).integers(0, classes, n)
    limit = n if scheme == "iid" else n // per_device
    if limit < 1:
        return
    count = 1 + int(count_fraction * (limit - 1))
    spec = PartitionSpec(scheme, shards_per_device=per_device)  # type: ignore[arg-type]
    _assert_exact_cover(partition(labels, spec, count, seed), n, count)


@pytest.mark.parametrize("spec", SPECS, ids=str)
def test_deterministic_by_seed(spec: PartitionSpec) -> None:
    labels = _balanced_labels(100)
    first = partition(labels, spec, 10, seed=42)
    again = partition(labels, spec, 10, seed=42)
    other = partition(labels, spec, 10, seed=43)
    assert partition_digest(first) == partition_digest(again)
    assert all(np.array_equal(a, b) for a, b in zip(first, again))
    assert partition_digest(first) != partition_digest(other)
    np.testing.assert_array_equal(device_indices(labels, spec, 42, index=4, count=10), first[4])


def test_iid_is_even_and_mixed() -> None:
    labels = _balanced_labels(300)
    parts = partition(labels, PartitionSpec("iid"), 7, seed=0)
    sizes = [len(p) for p in parts]
    assert max(sizes) - min(sizes) <= 1
    for part in parts:  # ~43 per class expected on each device; every class present
        assert (label_histogram(labels, part) > 0).all()


def _mean_kl_to_global(labels: np.ndarray, parts: list[np.ndarray]) -> float:
    """Mean over devices of KL(device label distribution || global label distribution)."""
    global_dist = label_histogram(labels, np.arange(len(labels))) / len(labels)
    total = 0.0
    for part in parts:
        dist = label_histogram(labels, part) / len(part)
        present = dist > 0
        total += float(np.sum(dist[present] * np.log(dist[present] / global_dist[present])))
    return total / len(parts)


def test_dirichlet_skew_grows_as_alpha_shrinks() -> None:
    labels = _balanced_labels(1000)
    skew = {
        alpha: np.mean([
            _mean_kl_to_global(labels, partition(labels, PartitionSpec("dirichlet", alpha=alpha), 10, seed))
            for seed in range(3)
        ])
        for alpha in (100.0, 1.0, 0.1)
    }
    assert skew[100.0] < skew[1.0] < skew[0.1]
    # Near IID at alpha=100 (KL ~ 0.005), strongly skewed at 0.1 (ln 10 = 2.3 is one class only).
    assert skew[100.0] < 0.05 and skew[0.1] > 0.8


def test_dirichlet_gives_every_device_a_minimum() -> None:
    labels = _balanced_labels(100)
    for seed in range(5):
        parts = partition(labels, PartitionSpec("dirichlet", alpha=0.05), 20, seed)
        _assert_exact_cover(parts, len(labels), 20)
        assert min(len(p) for p in parts) >= 5  # 1000 examples / 20 devices / 10


def test_dirichlet_impossible_request_is_a_clear_error() -> None:
    labels = _balanced_labels(2)  # 20 examples for 20 devices: each needs exactly one
    with pytest.raises(ConfigError, match="could not give each of 20 devices at least 1"):
        partition(labels, PartitionSpec("dirichlet", alpha=0.01), 20, seed=0)


@pytest.mark.parametrize(("count", "per_device"), [(7, 2), (20, 2), (13, 1), (9, 3)])
def test_shards_limit_labels_per_device(count: int, per_device: int) -> None:
    labels = _balanced_labels(300)
    parts = partition(labels, PartitionSpec("shards", shards_per_device=per_device), count, seed=1)
    _assert_exact_cover(parts, len(labels), count)
    classes_seen = [int((label_histogram(labels, p) > 0).sum()) for p in parts]
    # A shard is a run of the label-sorted data, so it spans at most 2 labels while every class
    # is at least a shard long.
    assert max(classes_seen) <= 2 * per_device
    assert np.mean(classes_seen) < 10
    sizes = [len(p) for p in parts]
    assert max(sizes) - min(sizes) <= per_device


def test_count_and_index_bounds() -> None:
    labels = _balanced_labels(3)  # 30 examples
    for bad in (0, -1, 31):
        with pytest.raises(ConfigError, match="device count"):
            partition(labels, PartitionSpec("iid"), bad, seed=0)
    with pytest.raises(ConfigError, match="count \\* shards_per_device"):
        partition(labels, PartitionSpec("shards", shards_per_device=2), 16, seed=0)
    for bad_index in (-1, 5):
        with pytest.raises(ConfigError, match="device index"):
            device_indices(labels, PartitionSpec("iid"), 0, index=bad_index, count=5)
    with pytest.raises(ConfigError, match="seed"):
        partition(labels, PartitionSpec("iid"), 3, seed=-1)
    with pytest.raises(ConfigError, match="1-D integer"):
        partition(labels.astype(np.float32), PartitionSpec("iid"), 3, seed=0)


def test_label_histogram() -> None:
    labels = np.array([0, 3, 3, 9, 1])
    np.testing.assert_array_equal(label_histogram(labels, np.array([1, 2, 3])), [0, 0, 0, 2, 0, 0, 0, 0, 0, 1])
    assert label_histogram(labels, np.array([], dtype=np.int64)).sum() == 0
    with pytest.raises(ConfigError, match="0..3"):
        label_histogram(labels, np.arange(5), num_classes=4)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("iid", PartitionSpec("iid")),
        ("dirichlet:0.3", PartitionSpec("dirichlet", alpha=0.3)),
        (" dirichlet:1e-2 ", PartitionSpec("dirichlet", alpha=0.01)),
        ("shards", PartitionSpec("shards", shards_per_device=2)),
        ("shards:5", PartitionSpec("shards", shards_per_device=5)),
    ],
)
def test_spec_parse(text: str, expected: PartitionSpec) -> None:
    spec = PartitionSpec.parse(text)
    assert spec == expected
    assert PartitionSpec.parse(str(spec)) == spec


@pytest.mark.parametrize(
    "text",
    ["", "IID", "iid:1", "dirichlet", "dirichlet:", "dirichlet:0", "dirichlet:-1", "dirichlet:nan",
     "dirichlet:inf", "dirichlet:abc", "shards:0", "shards:1.5", "shards:-2", "shards:x", "random", "iid,shards"],
)
def test_spec_parse_errors(text: str) -> None:
    with pytest.raises(ConfigError):
        PartitionSpec.parse(text)


def test_spec_constructor_validates() -> None:
    with pytest.raises(ConfigError):
        PartitionSpec("dirichlet")
    with pytest.raises(ConfigError):
        PartitionSpec("iid", alpha=1.0)
    with pytest.raises(ConfigError):
        PartitionSpec("bogus")  # type: ignore[arg-type]
