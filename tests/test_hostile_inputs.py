"""Hostile values off the wire that must be refused or ignored, never raise (issue 12)."""
from __future__ import annotations

import pytest

from edgetrain.aggregator.device_metrics import DeviceMetricsCollector


@pytest.mark.parametrize("claimed", ["many", [1], {"a": 1}, 1e400, -5, 10**400])
def test_a_status_with_a_bad_example_count_is_ignored(claimed: object) -> None:
    collector = DeviceMetricsCollector()
    collector.note_status("dev-0", {"partition_digest": "abc", "num_examples": 10})
    collector.note_status("dev-1", {"partition_digest": "abc", "num_examples": claimed})  # reaches the twin check
    assert collector.shared_partitions() == {"abc": ["dev-0", "dev-1"]}
    assert collector.partition_size("dev-1") is None and collector.partition_size("dev-0") == 10
