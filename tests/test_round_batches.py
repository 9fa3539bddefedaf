"""What a device trains on in one FL round: E shuffled epochs, or exactly ``local_steps`` batches."""
from __future__ import annotations

import numpy as np
import pytest

from edgetrain.sdk.device import LocalData, round_batches
from edgetrain.sdk.errors import ConfigError
from edgetrain.sdk.round_settings import RoundSettings


def _data(n: int) -> LocalData:
    x = np.arange(n, dtype=np.float32).reshape(n, 1)
    return LocalData(x=x, y=np.arange(n, dtype=np.int64), digest="test")


def test_epochs_visit_every_example_once_per_epoch() -> None:
    batches = list(round_batches(_data(10), RoundSettings(batch_size=4, local_epochs=2), np.random.default_rng(0)))
    seen = np.concatenate([y for _, y in batches])
    assert sorted(seen.tolist()) == sorted(list(range(10)) * 2)


@pytest.mark.parametrize("steps", [1, 2, 3, 7])
def test_local_steps_gives_exactly_that_many_batches_across_epoch_boundaries(steps: int) -> None:
    # 10 examples in batches of 4 is 3 batches an epoch: 7 steps cross two epoch boundaries.
    batches = list(round_batches(_data(10), RoundSettings(batch_size=4, local_steps=steps, local_epochs=5),
                                 np.random.default_rng(1)))
    assert len(batches) == steps
    first_epoch = np.concatenate([y for _, y in batches[:3]])
    if steps >= 3:
        assert sorted(first_epoch.tolist()) == list(range(10))  # a full shuffled epoch before repeating


@pytest.mark.parametrize("bad", [{"local_steps": 0}, {"local_steps": "5"}, {"local_steps": 2.5},
                                 {"local_epochs": -1}, {"batch_size": 0}, {"batch_size": True}])
def test_bad_round_settings_are_refused_before_any_training(bad: dict) -> None:
    key = next(iter(bad))
    with pytest.raises(ConfigError, match=key):  # RoundSettings refuses them, at either end
        RoundSettings(**bad)
