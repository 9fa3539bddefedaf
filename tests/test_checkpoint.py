"""Checkpoints: round trip, keep-last-K, atomicity (temp dirs, failed and killed writes), resume."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest

from edgetrain.aggregator import checkpoint as ck
from edgetrain.aggregator.checkpoint import Checkpoint, list_checkpoints, load_latest, rng_from_state, rng_state, save_checkpoint
from edgetrain.aggregator.strategy import make_strategy
from edgetrain.sdk.errors import BundleError, ConfigError

REPO_ROOT = Path(__file__).resolve().parents[1]


def _checkpoint(round_completed: int, size: int = 32, seed: int = 0) -> Checkpoint:
    rng = np.random.default_rng(seed)
    params = rng.standard_normal(size).astype(np.float32)
    state = {"m": rng.standard_normal(size).astype(np.float32), "v": rng.random(size).astype(np.float32)}
    return Checkpoint(round_completed=round_completed, model_version=round_completed + 1, params=params,
                      strategy_state=state, strategy_meta={"strategy": "fedadam", "rounds_aggregated": round_completed},
                      rng_state=rng_state(rng), extra={"bundle_sha256": "ab" * 32})


def test_round_trip(tmp_path: Path) -> None:
    saved = _checkpoint(4)
    path = save_checkpoint(tmp_path, saved)
    assert path.name == "round-00000004"
    loaded = load_latest(tmp_path)
    assert loaded is not None
    assert loaded.round_completed == 4 and loaded.model_version == 5
    np.testing.assert_array_equal(loaded.params, saved.params)
    assert loaded.params.dtype == np.float32
    assert set(loaded.strategy_state) == {"m", "v"}
    for key, value in saved.strategy_state.items():
        np.testing.assert_array_equal(loaded.strategy_state[key], value)
    assert loaded.strategy_meta == saved.strategy_meta
    assert loaded.extra == saved.extra


def test_rng_continues_exactly_after_restore(tmp_path: Path) -> None:
    rng = np.random.default_rng(123)
    rng.integers(0, 100, size=17)  # advance it
    ckpt = Checkpoint(round_completed=1, model_version=1, params=np.zeros(3, np.float32), strategy_state={},
                      strategy_meta={}, rng_state=rng_state(rng))
    save_checkpoint(tmp_path, ckpt)
    restored = rng_from_state(load_latest(tmp_path).rng_state)  # type: ignore[union-attr]
    np.testing.assert_array_equal(restored.random(20), rng.random(20))
    with pytest.raises(ConfigError, match="bit generator"):
        rng_from_state({"bit_generator": "Generator"})


def test_empty_run_dir_has_no_checkpoint(tmp_path: Path) -> None:
    assert load_latest(tmp_path) is None
    assert load_latest(tmp_path / "missing") is None


def test_keep_last_k(tmp_path: Path) -> None:
    for round_completed in range(1, 6):
        save_checkpoint(tmp_path, _checkpoint(round_completed, seed=round_completed), keep_last=2)
    assert [r for r, _ in list_checkpoints(tmp_path)] == [4, 5]
    assert load_latest(tmp_path).round_completed == 5  # type: ignore[union-attr]
    assert not [p for p in (tmp_path / ck.CHECKPOINTS_DIR).iterdir() if p.name.startswith(".")]
    with pytest.raises(ConfigError, match="keep_last"):
        save_checkpoint(tmp_path, _checkpoint(6), keep_last=0)


def test_a_round_is_written_once(tmp_path: Path) -> None:
    save_checkpoint(tmp_path, _checkpoint(2))
    with pytest.raises(ConfigError, match="already has a checkpoint"):
        save_checkpoint(tmp_path, _checkpoint(2, seed=9))
    np.testing.assert_array_equal(load_latest(tmp_path).params, _checkpoint(2).params)  # type: ignore[union-attr]


def test_stale_temp_dir_is_ignored_then_removed(tmp_path: Path) -> None:
    save_checkpoint(tmp_path, _checkpoint(5))
    stale = tmp_path / ck.CHECKPOINTS_DIR / ".tmp-round-00000009-deadbeef"
    stale.mkdir()
    (stale / ck.PARAMS_FILE).write_bytes(b"half a file")
    assert load_latest(tmp_path).round_completed == 5  # type: ignore[union-attr]
    save_checkpoint(tmp_path, _checkpoint(6))
    assert not stale.exists()


def test_failed_rename_leaves_the_previous_checkpoint(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    save_checkpoint(tmp_path, _checkpoint(1))

    def crash(src: object, dst: object) -> None:
        raise OSError("disk gone")

    monkeypatch.setattr(ck.os, "rename", crash)
    with pytest.raises(OSError, match="disk gone"):
        save_checkpoint(tmp_path, _checkpoint(2))
    monkeypatch.undo()
    assert [r for r, _ in list_checkpoints(tmp_path)] == [1]
    assert load_latest(tmp_path).round_completed == 1  # type: ignore[union-attr]
    assert not [p for p in (tmp_path / ck.CHECKPOINTS_DIR).iterdir() if p.name.startswith(".")]


def test_sigkill_mid_write_never_leaves_a_half_checkpoint(tmp_path: Path) -> None:
    # A child writes checkpoints as fast as it can; we kill it at an arbitrary moment. Whatever it
    # was doing, every visible checkpoint must load and the latest must be the last completed one.
    script = textwrap.dedent(f"""
        import sys, numpy as np
        from edgetrain.aggregator.checkpoint import Checkpoint, save_checkpoint
        params = np.arange(200_000, dtype=np.float32)
        for r in range(1, 100_000):
            save_checkpoint({str(tmp_path)!r}, Checkpoint(r, r, params + r, {{"m": params}}, {{}}, {{}}), keep_last=2)
            print(r, flush=True)
    """)
    child = subprocess.Popen([sys.executable, "-c", script], cwd=REPO_ROOT, stdout=subprocess.PIPE, text=True,
                             env={**os.environ, "PYTHONPATH": str(REPO_ROOT)})
    assert child.stdout is not None
    completed = [int(child.stdout.readline()) for _ in range(3)]  # it is running and saving
    time.sleep(0.05)
    child.send_signal(signal.SIGKILL)
    rest, _ = child.communicate(timeout=30)
    completed += [int(line) for line in rest.split()]
    latest = load_latest(tmp_path)
    assert latest is not None
    # The child prints after a save returns, so the latest on disk is that round or the next one.
    assert latest.round_completed in (completed[-1], completed[-1] + 1)
    np.testing.assert_array_equal(latest.params, np.arange(200_000, dtype=np.float32) + latest.round_completed)
    for _, path in list_checkpoints(tmp_path):
        ck.load_checkpoint(path)


def test_corrupt_latest_is_a_clear_error(tmp_path: Path) -> None:
    save_checkpoint(tmp_path, _checkpoint(1))
    latest = save_checkpoint(tmp_path, _checkpoint(2))
    params_file = latest / ck.PARAMS_FILE
    data = bytearray(params_file.read_bytes())
    data[-1] ^= 0xFF
    params_file.write_bytes(bytes(data))
    with pytest.raises(BundleError, match="sha256") as caught:
        load_latest(tmp_path)
    assert "round-00000002" in str(caught.value) and "previous checkpoint" in str(caught.value)
    (latest / ck.META_FILE).write_text("{not json")
    with pytest.raises(BundleError, match="unreadable checkpoint meta"):
        load_latest(tmp_path)
    (latest / ck.META_FILE).unlink()
    with pytest.raises(BundleError):
        load_latest(tmp_path)


def test_bad_checkpoints_are_refused_at_save(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="float32"):
        save_checkpoint(tmp_path, Checkpoint(1, 1, np.zeros(3), {}, {}, {}))
    with pytest.raises(ConfigError, match="JSON"):
        save_checkpoint(tmp_path, Checkpoint(1, 1, np.zeros(3, np.float32), {}, {"x": float("nan")}, {}))
    assert list_checkpoints(tmp_path) == []


def test_resume_through_a_checkpoint_continues_the_run_exactly(tmp_path: Path) -> None:
    size, devices = 24, [f"d{i}" for i in range(8)]

    def run(strategy_rounds: range, params: np.ndarray, strategy, rng: np.random.Generator) -> np.ndarray:
        for round_id in strategy_rounds:
            plan = strategy.configure_round(round_id, devices, rng)
            strategy.begin_round(params)
            for device in plan.selected:
                # A deterministic stand-in for local training, different per device and round.
                local = np.random.default_rng([round_id, int(device[1:])])
                strategy.accumulate(local.standard_normal(size).astype(np.float32) * 0.1,
                                    int(local.integers(10, 100)), device)
            params, _ = strategy.aggregate(params)
        return params

    settings = dict(fraction=0.5, min_devices=2, server_lr=0.03)
    start = np.zeros(size, np.float32)
    straight = run(range(6), start, make_strategy("fedadam", **settings), np.random.default_rng(7))

    strategy, rng = make_strategy("fedadam", **settings), np.random.default_rng(7)
    halfway = run(range(3), start, strategy, rng)
    save_checkpoint(tmp_path, Checkpoint(2, 3, halfway, strategy.state_dict(), strategy.state_meta(), rng_state(rng)))
    del strategy, rng

    ckpt = load_latest(tmp_path)
    assert ckpt is not None and ckpt.round_completed == 2
    resumed_strategy = make_strategy("fedadam", **settings)
    resumed_strategy.load_state_dict(ckpt.strategy_state, ckpt.strategy_meta)
    resumed = run(range(ckpt.round_completed + 1, 6), ckpt.params, resumed_strategy, rng_from_state(ckpt.rng_state))
    np.testing.assert_array_equal(resumed, straight)


def test_meta_is_plain_json_without_pickle(tmp_path: Path) -> None:
    path = save_checkpoint(tmp_path, _checkpoint(3))
    meta = json.loads((path / ck.META_FILE).read_text())
    assert meta["round_completed"] == 3 and meta["num_params"] == 32
    assert set(meta["sha256"]) == {ck.PARAMS_FILE, ck.STATE_FILE}
    assert sorted(p.name for p in path.iterdir()) == sorted([ck.PARAMS_FILE, ck.STATE_FILE, ck.META_FILE])
