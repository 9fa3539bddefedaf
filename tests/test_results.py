"""metrics.jsonl (durable appends, truncation on resume, torn lines), summary.json and plots."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from edgetrain.aggregator.results import (
    METRICS_FILE,
    MetricsLog,
    RoundRecord,
    plot_run,
    write_summary,
)
from edgetrain.sdk.errors import ConfigError, DataError

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _record(round_id: int, accuracy: float | None = None, **overrides: object) -> RoundRecord:
    rng = np.random.default_rng(round_id)
    fields: dict = dict(
        round_id=round_id, model_version=round_id + 1,
        accuracy=accuracy if accuracy is not None else float(rng.uniform(0.5, 0.9)),
        loss=float(rng.uniform(0.2, 1.0)), devices_chosen=5, devices_reported=4,
        devices_rejected={"non_finite": 1}, rejected_detail=("update 'u' from 'd3': 2 NaN/Inf value(s)",),
        bytes_up=int(rng.integers(100_000, 900_000)), bytes_down=int(rng.integers(100_000, 900_000)),
        round_wall_s=float(rng.uniform(1, 5)), total_examples=int(rng.integers(100, 5000)),
    )
    fields.update(overrides)
    return RoundRecord(**fields)


def test_append_and_read_back(tmp_path: Path) -> None:
    log = MetricsLog(tmp_path)
    records = [_record(r) for r in range(1, 4)]
    for record in records:
        log.append(record)
    assert MetricsLog(tmp_path).read() == records
    lines = (tmp_path / METRICS_FILE).read_text().splitlines()
    assert len(lines) == 3 and all(json.loads(line)["round_id"] == r for r, line in zip((1, 2, 3), lines))


def test_non_finite_metrics_are_written_as_null(tmp_path: Path) -> None:
    log = MetricsLog(tmp_path)
    log.append(_record(1, loss=float("nan"), accuracy=float("inf")))
    line = (tmp_path / METRICS_FILE).read_text()

    def refuse(constant: str) -> None:
        raise AssertionError(f"non-standard JSON constant {constant} written")

    raw = json.loads(line, parse_constant=refuse)  # strict JSON: no NaN / Infinity tokens
    assert raw["loss"] is None and raw["accuracy"] is None
    (read,) = log.read()
    assert read.loss is None and read.accuracy is None


def test_rounds_must_increase(tmp_path: Path) -> None:
    log = MetricsLog(tmp_path)
    log.append(_record(2))
    for stale in (1, 2):
        with pytest.raises(ConfigError, match="truncate_after"):
            log.append(_record(stale))
    with pytest.raises(ConfigError, match="truncate_after"):
        MetricsLog(tmp_path).append(_record(2))  # a reopened log remembers the last round


def test_truncate_on_resume_keeps_each_round_once(tmp_path: Path) -> None:
    log = MetricsLog(tmp_path)
    for round_id in range(1, 6):
        log.append(_record(round_id))
    # The checkpoint covers round 3; rounds 4 and 5 will be run again.
    resumed = MetricsLog(tmp_path)
    assert resumed.truncate_after(3) == 2
    resumed.append(_record(4, accuracy=0.99))
    rounds = [r.round_id for r in MetricsLog(tmp_path).read()]
    assert rounds == [1, 2, 3, 4]
    assert MetricsLog(tmp_path).read()[-1].accuracy == 0.99
    assert resumed.truncate_after(10) == 0
    assert MetricsLog(tmp_path).truncate_after(-1) == 4  # a fresh start in the same directory
    assert MetricsLog(tmp_path).read() == []


def test_torn_last_line_is_cut_on_open(tmp_path: Path) -> None:
    log = MetricsLog(tmp_path)
    log.append(_record(1))
    log.append(_record(2))
    with open(tmp_path / METRICS_FILE, "a") as fh:
        fh.write('{"round_id": 3, "acc')  # killed mid-write
    reopened = MetricsLog(tmp_path)
    assert [r.round_id for r in reopened.read()] == [1, 2]
    reopened.append(_record(3))
    assert [r.round_id for r in MetricsLog(tmp_path).read()] == [1, 2, 3]


def test_corrupt_middle_line_is_an_error(tmp_path: Path) -> None:
    MetricsLog(tmp_path).append(_record(1))
    with open(tmp_path / METRICS_FILE, "a") as fh:
        fh.write("garbage\n")
    with pytest.raises(DataError, match=r"metrics.jsonl:2"):
        MetricsLog(tmp_path)


def test_record_validates() -> None:
    with pytest.raises(ConfigError, match="bytes_up"):
        _record(1, bytes_up=-1)
    with pytest.raises(ConfigError, match="round_wall_s"):
        _record(1, round_wall_s=-0.5)


def test_summary_totals(tmp_path: Path) -> None:
    records = [_record(1, accuracy=0.6), _record(2, accuracy=0.8, retried=True),
               _record(3, accuracy=0.7, devices_rejected={"non_finite": 2, "wrong_round": 1})]
    path = write_summary(tmp_path, records, {"strategy": "fedavg"})
    summary = json.loads(path.read_text())
    assert summary["num_rounds"] == 3 and summary["last_round"] == 3
    assert summary["final_accuracy"] == 0.7
    assert summary["best_accuracy"] == 0.8 and summary["best_accuracy_round"] == 2
    assert summary["total_bytes_up"] == sum(r.bytes_up for r in records)
    assert summary["total_bytes_down"] == sum(r.bytes_down for r in records)
    assert summary["total_wall_s"] == pytest.approx(sum(r.round_wall_s for r in records))
    assert summary["updates_accepted"] == sum(r.devices_reported for r in records)
    assert summary["updates_rejected"] == {"non_finite": 4, "wrong_round": 1}
    assert summary["rounds_retried"] == 1
    assert summary["extra"] == {"strategy": "fedavg"}
    empty = json.loads(write_summary(tmp_path, []).read_text())
    assert empty["num_rounds"] == 0 and empty["final_accuracy"] is None


def test_plots_are_non_empty_pngs(tmp_path: Path) -> None:
    log = MetricsLog(tmp_path)
    for round_id in range(1, 8):
        # Not every round is evaluated; the uplink axis still counts their bytes.
        log.append(_record(round_id) if round_id % 3 else _record(round_id, accuracy=float("nan")))
    by_round, by_uplink = plot_run(tmp_path)
    for path in (by_round, by_uplink):
        data = path.read_bytes()
        assert data.startswith(PNG_MAGIC) and len(data) > 2000
    assert by_round.name != by_uplink.name


def test_plot_without_evaluated_rounds_is_an_error(tmp_path: Path) -> None:
    MetricsLog(tmp_path).append(_record(1, accuracy=float("nan")))
    with pytest.raises(DataError, match="no evaluated round"):
        plot_run(tmp_path)
