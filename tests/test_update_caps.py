"""Default caps (issue 12, defect 8): an update's weight is bounded by what the aggregator knows
(the partition sizes devices reported), its norm clipped at k x the running median (Sun et al. 2019)."""
from __future__ import annotations

import math
from typing import Any

import numpy as np
import pytest

from edgetrain.aggregator.update_caps import (CAP_FLEET_MEDIAN, CAP_MAX_EXAMPLES, CAP_PARTITION_SIZE, NormHistory,
                                              example_caps)
from edgetrain.aggregator.validation import ValidationContext, validate_update
from edgetrain.sdk.codecs import get_codec
from edgetrain.sdk.errors import ConfigError
from edgetrain.sdk.wire import Update

NUM_PARAMS = 16


def _update(vector: np.ndarray, device: str = "dev-1", num_examples: int = 40) -> Update:
    payload, _ = get_codec("dense").encode(vector.astype(np.float32), None, {})
    return Update(run_id="run-1", device_id=device, round_id=1, model_version=0, update_id=f"u-{device}",
                  num_examples=num_examples, codec="dense", payload=payload, metrics={})


def _ctx(**overrides: Any) -> ValidationContext:
    fields: dict[str, Any] = dict(run_id="run-1", round_id=1, model_version=0,
                                  selected=frozenset({"dev-0", "dev-1", "dev-2"}),
                                  num_params=NUM_PARAMS)
    fields.update(overrides)
    return ValidationContext(**fields)


def test_a_device_is_capped_at_its_own_partition_then_at_the_fleet_median() -> None:
    sizes = {"dev-0": 40, "dev-1": 60, "liar": 10**9, "quiet": None}
    caps = example_caps(sizes, sizes.get, examples_factor=4.0)
    assert caps["dev-0"] == (40, CAP_PARTITION_SIZE) and caps["dev-1"] == (60, CAP_PARTITION_SIZE)
    assert caps["liar"] == (240, CAP_FLEET_MEDIAN)  # median of 40, 60, 1e9 is 60
    assert caps["quiet"] == (240, CAP_FLEET_MEDIAN)  # said nothing: the fleet's bound
    assert example_caps(sizes, sizes.get, examples_factor=None)["liar"] == (10**9, CAP_PARTITION_SIZE)
    assert example_caps(["a", "b"], lambda d: None, examples_factor=4.0) == {}  # nothing known: no cap


def test_a_claim_of_a_trillion_examples_weighs_its_cap() -> None:
    ctx = _ctx(example_caps={"dev-1": (40, CAP_PARTITION_SIZE)}, max_examples=1000)
    valid = validate_update(_update(np.ones(NUM_PARAMS), num_examples=10**12), topic_device="dev-1", ctx=ctx)
    assert valid.capped and valid.num_examples == 40 and valid.cap_reason == CAP_PARTITION_SIZE
    assert valid.claimed_examples == 10**12
    lower = _ctx(example_caps={"dev-1": (40, CAP_PARTITION_SIZE)}, max_examples=30)
    valid = validate_update(_update(np.ones(NUM_PARAMS), num_examples=50), topic_device="dev-1", ctx=lower)
    assert valid.num_examples == 30 and valid.cap_reason == CAP_MAX_EXAMPLES  # the lower cap wins
    honest = validate_update(_update(np.ones(NUM_PARAMS), num_examples=40), topic_device="dev-1", ctx=ctx)
    assert not honest.capped and honest.num_examples == 40 and honest.cap_reason == ""


def test_an_update_above_the_clip_norm_is_scaled_down_keeping_its_direction() -> None:
    vector = np.arange(NUM_PARAMS, dtype=np.float64) - 3.0
    norm = float(np.linalg.norm(vector))
    valid = validate_update(_update(vector), topic_device="dev-1", ctx=_ctx(clip_norm=norm / 10))
    assert valid.clipped and valid.claimed_norm == pytest.approx(norm) and valid.norm == pytest.approx(norm / 10)
    assert float(np.linalg.norm(valid.vector.astype(np.float64))) == pytest.approx(norm / 10, rel=1e-5)
    np.testing.assert_allclose(valid.vector, vector / 10, rtol=1e-5, atol=1e-6)
    below = validate_update(_update(vector), topic_device="dev-1", ctx=_ctx(clip_norm=norm * 2))
    assert not below.clipped and below.norm == pytest.approx(norm)
    np.testing.assert_array_equal(below.vector, vector.astype(np.float32))


def test_the_norm_bound_is_k_times_the_running_median_of_clipped_norms() -> None:
    history = NormHistory(factor=5.0, window=4, min_history=3)
    history.add(1.0)
    history.add(2.0)
    assert history.bound() is None  # too few norms to say what is normal
    history.add(3.0)
    assert history.bound() == pytest.approx(10.0)
    for _ in range(4):  # the window forgets: a later, smaller regime sets the bound
        history.add(0.5)
    assert history.bound() == pytest.approx(2.5)
    assert NormHistory(factor=None).bound() is None


@pytest.mark.parametrize("factor", [0.5, math.inf, math.nan, -1.0])
def test_a_bad_factor_is_a_config_error(factor: float) -> None:
    with pytest.raises(ConfigError, match="norm_clip_factor"):
        NormHistory(factor=factor)


def test_a_bad_clip_norm_or_example_cap_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="clip_norm"):
        _ctx(clip_norm=0.0)
    with pytest.raises(ConfigError, match="example caps"):
        _ctx(example_caps={"dev-1": (0, CAP_PARTITION_SIZE)})
