"""edgetrain report on small synthetic run directories: table values checked."""
from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import pytest

from edgetrain.aggregator.report import load_run, markdown_table, milestone, parse_targets
from edgetrain.aggregator.results import MetricsLog, RoundRecord, write_summary
from edgetrain.sdk.errors import ConfigError, DataError

ROOT = Path(__file__).resolve().parent.parent


def _record(round_id: int, accuracy: float | None, up: int, down: int, wall: float, cpu: float | None = None):
    return RoundRecord(round_id=round_id, model_version=round_id, accuracy=accuracy, loss=0.5, devices_chosen=3,
                       devices_reported=3, devices_rejected={}, rejected_detail=(), bytes_up=up, bytes_down=down,
                       round_wall_s=wall, extra={} if cpu is None else {"device_cpu_s": cpu})


def _make_run(path: Path, accuracies: list[float | None], settings: dict, cpu: float | None = None,
              initial: float | None = None) -> Path:
    """A run directory; ``initial``: a round-0 line (the initial model's evaluation) with that accuracy."""
    log = MetricsLog(path)
    records = [_record(i + 1, a, up=2_000_000, down=1_000_000, wall=1.5, cpu=cpu) for i, a in enumerate(accuracies)]
    if initial is not None:
        records.insert(0, dataclasses.replace(_record(0, initial, up=0, down=0, wall=0.0), devices_chosen=0,
                                              devices_reported=0))
    for r in records:
        log.append(r)
    write_summary(path, records, settings)
    return path


def test_milestones_count_every_round_up_to_the_target(tmp_path: Path) -> None:
    run = _make_run(tmp_path / "fl", [0.70, None, 0.86, 0.89], {"strategy": "fedavg", "codec": "dense",
                                                                "partition": "iid"}, cpu=2.0)
    report, records = load_run(run)
    m85 = report.milestones[0.85]
    assert (m85.round_id, m85.uplink_mb, m85.downlink_mb, m85.wall_s) == (3, 6.0, 3.0, 4.5)
    assert report.milestones[0.88].round_id == 4
    assert milestone(records, 0.95) is None
    assert report.final_accuracy == 0.89 and report.best_accuracy == 0.89 and report.device_cpu_s == 8.0
    assert report.energy_j is None and report.uplink_mb == 8.0


@pytest.mark.parametrize("initial", [None, 0.1])
def test_round_zero_is_plotted_but_not_counted_as_a_round(tmp_path: Path, initial: float | None) -> None:
    run = _make_run(tmp_path / "fl", [0.70, None, 0.86, 0.89], {"strategy": "fedavg"}, cpu=2.0, initial=initial)
    report, records = load_run(run)
    assert report.rounds == 4 and json.loads((run / "summary.json").read_text())["num_rounds"] == 4
    m85 = report.milestones[0.85]
    assert (m85.round_id, m85.uplink_mb, m85.wall_s) == (3, 6.0, 4.5)  # round 0 adds neither a round nor bytes
    row = [c.strip() for c in markdown_table([report]).splitlines()[2].strip("|").split("|")]
    assert row[4] == "4" and row[7] == "3"
    out = tmp_path / "report"
    done = subprocess.run([sys.executable, "-m", "edgetrain", "report", str(run), "--out", str(out)],
                          capture_output=True, text=True, cwd=ROOT)
    assert done.returncode == 0, done.stderr  # the log-axis uplink plot has no place for round 0's 0 MB


def test_table_has_one_row_per_run_with_dashes_for_targets_never_reached(tmp_path: Path) -> None:
    a = load_run(_make_run(tmp_path / "a", [0.86, 0.87], {"strategy": "fedavg", "codec": "dgc",
                                                          "partition": "iid"}))[0]
    b = load_run(_make_run(tmp_path / "b", [0.5, 0.6], {"strategy": "large-batch", "label": "lb-dense"}))[0]
    table = markdown_table([a, b]).splitlines()
    assert len(table) == 4
    row_a = [c.strip() for c in table[2].strip("|").split("|")]
    assert row_a[:7] == ["a", "fedavg", "dgc", "iid", "2", "87.00", "87.00"]
    assert row_a[7:11] == ["1", "2.00", "1.00", "1.5"]  # reached 85% in round 1
    assert row_a[11:15] == ["–"] * 4  # never 88%
    row_b = [c.strip() for c in table[3].strip("|").split("|")]
    assert row_b[0] == "lb-dense" and row_b[7:15] == ["–"] * 8


def test_bad_inputs_name_the_problem(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="not a run directory"):
        load_run(tmp_path)
    with pytest.raises(ConfigError):
        parse_targets("0.85,abc")
    with pytest.raises(ConfigError):
        parse_targets("85")


def test_report_cli_writes_markdown_and_three_plots(tmp_path: Path) -> None:
    run = _make_run(tmp_path / "run1", [0.8, 0.9], {"strategy": "fedavg"})
    out = tmp_path / "report"
    done = subprocess.run([sys.executable, "-m", "edgetrain", "report", str(run), "--out", str(out)],
                          capture_output=True, text=True, cwd=ROOT)
    assert done.returncode == 0, done.stderr
    assert "| run1 | fedavg |" in (out / "report.md").read_text()
    for name in ("accuracy_vs_round.png", "accuracy_vs_uplink_mb.png", "accuracy_vs_wall_s.png"):
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    bad = subprocess.run([sys.executable, "-m", "edgetrain", "report", str(tmp_path / "nope"), "--out", str(out)],
                         capture_output=True, text=True, cwd=ROOT)
    assert bad.returncode == 1 and "not a run directory" in bad.stderr
