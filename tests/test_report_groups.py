"""edgetrain report's by-configuration table: seeds grouped, Student-t intervals, paired deltas, checker."""
from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path

import pytest

from edgetrain.aggregator.report import DEFAULT_TARGETS, load_run
from edgetrain.aggregator.report_groups import group_runs, group_table, t_interval
from edgetrain.aggregator.results import MetricsLog, RoundRecord, write_summary
from edgetrain.sdk.errors import DataError

ROOT = Path(__file__).resolve().parent.parent
CHECKER = ROOT / "experiments" / "check_results.py"
T_975_DF2 = 4.302652729911275  # Student t, 97.5 % quantile, 2 degrees of freedom (tables)
T_975_DF1 = 12.706204736174698


def _make_run(path: Path, accuracies: list[float], codec: str, seed: int, ratio: float = 1.0) -> Path:
    log = MetricsLog(path)
    records = [RoundRecord(round_id=i + 1, model_version=i + 1, accuracy=a, loss=0.5, devices_chosen=2,
                           devices_reported=2, devices_rejected={}, rejected_detail=(), bytes_up=1_000_000,
                           bytes_down=2_000_000, round_wall_s=2.0, extra={"uplink_compression": ratio})
               for i, a in enumerate(accuracies)]
    for r in records:
        log.append(r)
    write_summary(path, records, {"strategy": "fedavg", "codec": codec, "downlink_codec": "dense",
                                  "partition": "iid", "label": f"FL {codec}, seed {seed}"})
    return path


def test_t_interval_matches_the_hand_computed_student_interval() -> None:
    # mean 0.83; s² = (0.03² + 0.01² + 0.04²) / 2 = 0.0013; half width = t(0.975, 2) · s / √3
    interval = t_interval([0.80, 0.82, 0.87])
    assert interval.n == 3 and interval.mean == pytest.approx(0.83)
    assert interval.half_width == pytest.approx(T_975_DF2 * math.sqrt(0.0013) / math.sqrt(3))
    single = t_interval([0.9])
    assert single.mean == 0.9 and single.half_width is None
    with pytest.raises(DataError):
        t_interval([])


def _fleet(tmp_path: Path) -> Path:
    runs = tmp_path / "runs"
    for seed, accs in enumerate(([0.84, 0.89], [0.86, 0.88], [0.85, 0.90])):
        _make_run(runs / f"dense-s{seed}", accs, "dense", seed)
    for seed, accs in enumerate(([0.83, 0.87], [0.86, 0.86])):
        _make_run(runs / f"stc-s{seed}", accs, "stc:sparsity=0.99", seed, ratio=200.0)
    return runs


def test_runs_group_by_settings_but_seed_and_deltas_pair_by_seed(tmp_path: Path) -> None:
    runs = _fleet(tmp_path)
    loaded = [load_run(d) for d in sorted(runs.iterdir())]
    dense, stc = group_runs(loaded, DEFAULT_TARGETS)
    assert (dense.name, dense.seeds) == ("FL dense", (0, 1, 2))
    assert (stc.name, stc.seeds) == ("FL stc:sparsity=0.99", (0, 1))
    assert dense.final_accuracy.mean == pytest.approx((0.89 + 0.88 + 0.90) / 3)
    assert dense.final_delta_vs_dense is None
    # pairs: seed 0: 0.87 - 0.89, seed 1: 0.86 - 0.88 -> both -0.02, zero spread; seed 2 has no pair
    assert stc.final_delta_vs_dense.n == 2
    assert stc.final_delta_vs_dense.mean == pytest.approx(-0.02)
    assert stc.final_delta_vs_dense.half_width == pytest.approx(0.0, abs=1e-12)
    # best of STC: 0.87 and 0.86 -> s = 0.01 / √2, half width t(0.975, 1) · s / √2
    assert stc.best_accuracy.half_width == pytest.approx(T_975_DF1 * abs(0.87 - 0.86) / math.sqrt(2) / math.sqrt(2))
    assert stc.payload_ratio == pytest.approx(200.0)
    # 85 %: dense seeds reach it at round 2, 1, 1 -> mean 4/3 rounds of 1 MB up, 2 s each
    cost = dense.to_target[0.85]
    assert cost.seeds_reached == 3 and cost.uplink_mb == pytest.approx(4 / 3) and cost.wall_s == pytest.approx(8 / 3)
    assert stc.to_target[0.88].seeds_reached == 0 and stc.to_target[0.88].uplink_mb is None
    table = group_table([dense, stc], DEFAULT_TARGETS)
    assert "| FL stc:sparsity=0.99 | stc:sparsity=0.99 | dense | iid | 2 | 2 | 86.50 ± 6.35 |" in table
    assert "| -2.00 ± 0.00 |" in table


def test_two_runs_of_one_configuration_and_seed_are_refused(tmp_path: Path) -> None:
    runs = _fleet(tmp_path)
    _make_run(runs / "dense-s0-again", [0.8, 0.9], "dense", 0)
    with pytest.raises(DataError, match="share seed"):
        group_runs([load_run(d) for d in sorted(runs.iterdir())], DEFAULT_TARGETS)


def _doc(tmp_path: Path) -> Path:
    runs = _fleet(tmp_path)
    table = group_table(group_runs([load_run(d) for d in sorted(runs.iterdir())], DEFAULT_TARGETS), DEFAULT_TARGETS)
    doc = tmp_path / "results.md"
    doc.write_text("# results\n\ntext\n\n<!-- report: runs/*-s* -->\n" + table)
    return doc


def _check(doc: Path, root: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(CHECKER), str(doc), "--root", str(root)], capture_output=True,
                          text=True, cwd=ROOT)


def test_checker_passes_a_table_recomputed_from_its_runs(tmp_path: Path) -> None:
    doc = _doc(tmp_path)
    done = _check(doc, tmp_path)
    assert done.returncode == 0, done.stderr
    assert f"{doc}:6: ok (2 configurations from runs/*-s*)" in done.stdout


def test_checker_fails_a_table_that_names_no_kept_runs(tmp_path: Path) -> None:
    """Every number in the doc's tables comes from kept runs: a table without a marker is not let through."""
    doc = _doc(tmp_path)
    doc.write_text(doc.read_text().replace("text\n", "| a | b |\n|---|---|\n| 1 | 2 |\n\ntext\n", 1))
    done = _check(doc, tmp_path)
    assert done.returncode == 1
    assert f"{doc}:3: a table that names no kept runs" in done.stderr


def test_checker_fails_naming_the_cell_that_differs(tmp_path: Path) -> None:
    doc = _doc(tmp_path)
    doc.write_text(doc.read_text().replace("86.50 ± 6.35", "86.60 ± 6.35", 1))
    done = _check(doc, tmp_path)
    assert done.returncode == 1
    assert "column 'final acc %': doc says '86.60 ± 6.35', the kept runs give '86.50 ± 6.35'" in done.stderr


def test_checker_fails_when_a_marker_names_no_runs_or_a_row_is_missing(tmp_path: Path) -> None:
    doc = _doc(tmp_path)
    text = doc.read_text()
    doc.write_text(text.replace("runs/*-s*", "runs/nothing-*"))
    assert "no run directory matches" in _check(doc, tmp_path).stderr
    doc.write_text("\n".join(line for line in text.splitlines() if not line.startswith("| FL stc")) + "\n")
    done = _check(doc, tmp_path)
    assert done.returncode == 1 and "1 rows in the doc, 2 configurations in the runs" in done.stderr


def test_checker_write_regenerates_the_marked_tables_and_leaves_the_rest(tmp_path: Path) -> None:
    doc = _doc(tmp_path)
    good = doc.read_text()
    # an old table: a column fewer and a wrong cell; the text around it must stay as it is
    stale = "\n".join(line.rsplit("|", 2)[0] + "|" if line.startswith("|") and "report" not in line else line
                      for line in good.splitlines()).replace("86.50 ± 6.35", "1.00", 1) + "\n"
    doc.write_text(stale + "\nafter\n")
    assert _check(doc, tmp_path).returncode == 1
    done = subprocess.run([sys.executable, str(CHECKER), str(doc), "--root", str(tmp_path), "--write"],
                          capture_output=True, text=True, cwd=ROOT)
    assert done.returncode == 0, done.stderr
    text = doc.read_text()
    assert text.startswith("# results\n\ntext\n") and text.endswith("\nafter\n")
    assert text.replace("\nafter\n", "").split("-->\n")[1] == good.split("-->\n")[1]
