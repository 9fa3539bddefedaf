"""edgetrain report, issue 16: bytes as the network sees them (ratios in frames, with and without the
devices' metrics and status frames), examples processed (to each target, and the LB-vs-FL curve), and
runs grouped by their recorded settings rather than their labels. Every number on hand-made run files."""
from __future__ import annotations

from pathlib import Path

import pytest

from edgetrain.aggregator.report import (DEFAULT_TARGETS, PLOT_ACCURACY_VS_EXAMPLES, examples_curve, frame_ratios,
                                         load_run, plot_lines, plot_runs)
from edgetrain.aggregator.report_groups import group_runs, group_table
from edgetrain.aggregator.results import MetricsLog, RoundRecord, write_summary
from edgetrain.aggregator.round_state import examples_processed
from edgetrain.sdk.round_settings import RoundSettings

NUM_PARAMS = 1000  # dense fp32 update: 4,000 bytes


def _record(round_id: int, accuracy: float | None, up: int, metrics: int = 0, examples: int = 0,
            reported: int = 2, extra: dict | None = None) -> RoundRecord:
    return RoundRecord(round_id=round_id, model_version=round_id, accuracy=accuracy, loss=0.5, devices_chosen=2,
                       devices_reported=reported, devices_rejected={}, rejected_detail=(), bytes_up=up,
                       bytes_down=10_000, round_wall_s=1.0, examples_processed=examples, metrics_bytes_up=metrics,
                       extra=extra or {})


def _run(path: Path, records: list[RoundRecord], **settings) -> Path:
    log = MetricsLog(path)
    for r in records:
        log.append(r)
    write_summary(path, records, {"strategy": "fedavg", "codec": "dgc", "downlink_codec": "dense",
                                  "partition": "iid", "num_params": NUM_PARAMS, **settings})
    return path


def test_frame_ratios_divide_the_dense_updates_by_the_frames_with_and_without_metrics() -> None:
    # round 0 (the initial evaluation) sends nothing and reports no update: it must not count
    records = [_record(0, 0.1, 0, reported=0), _record(1, 0.5, 100, metrics=60), _record(2, 0.6, 60, metrics=40)]
    # dense: 4 B x 1000 params x 4 updates = 16,000 B; frames 160 B; with metrics 260 B
    assert frame_ratios(records, NUM_PARAMS) == pytest.approx((100.0, 16_000 / 260))
    assert frame_ratios(records, None) == (None, None)  # a run that did not record num_params
    assert frame_ratios(records, True) == (None, None)


def test_older_runs_fall_back_to_extra_metrics_bytes(tmp_path: Path) -> None:
    run = _run(tmp_path / "old", [_record(1, 0.5, 100, extra={"metrics_bytes": 100})])
    report, _ = load_run(run)
    assert report.metrics_mb == pytest.approx(100 / 1e6)
    assert report.frame_ratio == pytest.approx(80.0) and report.frame_ratio_with_metrics == pytest.approx(40.0)
    assert report.examples_processed is None and report.milestones[0.85] is None


def test_examples_processed_to_each_target_and_the_curve(tmp_path: Path) -> None:
    records = [_record(0, 0.1, 0, reported=0), _record(1, None, 10, examples=640),
               _record(2, 0.86, 10, examples=640), _record(3, 0.89, 10, examples=640)]
    report, loaded = load_run(_run(tmp_path / "r", records))
    assert report.examples_processed == 1920
    assert report.milestones[0.85].examples == 1280 and report.milestones[0.88].examples == 1920
    assert examples_curve(loaded) == [(0, 0.1), (1280, 0.86), (1920, 0.89)]
    no_examples = [_record(1, 0.9, 10)]
    assert examples_curve(no_examples) == []


def test_examples_processed_follows_the_round_settings() -> None:
    assert examples_processed(RoundSettings(batch_size=32, local_steps=19), 6000) == 19 * 32  # short rounds
    assert examples_processed(RoundSettings(batch_size=32, local_epochs=2), 6000) == 12_000  # epoch rounds
    assert examples_processed(RoundSettings(batch_size=32), 32) == 32  # a large-batch step: its one batch
    # summed over a worker's updates (their claims added up): the same as one by one
    assert examples_processed(RoundSettings(batch_size=32, local_steps=19), 3 * 6000, updates=3) == 3 * 19 * 32
    assert examples_processed(RoundSettings(batch_size=32, local_epochs=2), 6000 + 500, updates=2) == 13_000


def test_group_table_shows_ratios_in_frames_metrics_and_examples_to_target(tmp_path: Path) -> None:
    runs = []
    for seed, (up, acc) in enumerate(((100, 0.86), (300, 0.87))):
        records = [_record(1, acc, up, metrics=100, examples=1000)]
        runs.append(load_run(_run(tmp_path / f"s{seed}", records, seed=seed, local_steps=19, label=f"x{seed}")))
    (group,) = group_runs(runs, DEFAULT_TARGETS)  # the labels differ, the settings but the seed agree
    assert group.seeds == (0, 1) and [r.name for r, _ in runs] == ["x0, seed 0", "x1, seed 1"]
    # dense 8,000 B per run: 80x and 8000/300; with 100 B of metrics 40x and 20x
    assert group.frame_ratio == pytest.approx((80 + 8000 / 300) / 2)
    assert group.frame_ratio_with_metrics == pytest.approx((40 + 20) / 2)
    assert group.metrics_mb == pytest.approx(100 / 1e6)
    assert group.to_target[0.85].examples == pytest.approx(1000)
    table = group_table([group], DEFAULT_TARGETS)
    header, _, row = table.splitlines()
    cells = dict(zip((c.strip() for c in header.strip("|").split("|")), (c.strip() for c in row.strip("|").split("|"))))
    assert (cells["ratio in frames"], cells["ratio in frames + metrics"]) == ("53×", "30×")
    assert cells["examples to 85%"] == "1000" and cells["examples to 88%"] == "–"


def test_runs_differing_in_a_recorded_setting_are_two_configurations(tmp_path: Path) -> None:
    one = load_run(_run(tmp_path / "a", [_record(1, 0.8, 10)], seed=0, local_steps=19, label="same"))
    two = load_run(_run(tmp_path / "b", [_record(1, 0.8, 10)], seed=0, local_steps=5, label="same"))
    assert len(group_runs([one, two], DEFAULT_TARGETS)) == 2


def test_accuracy_vs_examples_plot_only_where_runs_recorded_examples(tmp_path: Path) -> None:
    with_examples = load_run(_run(tmp_path / "a", [_record(1, 0.8, 10, examples=64)]))
    without = load_run(_run(tmp_path / "b", [_record(1, 0.8, 10)]))
    out = tmp_path / "out"
    out.mkdir()
    assert out / PLOT_ACCURACY_VS_EXAMPLES in plot_runs([with_examples, without], out)
    assert out / PLOT_ACCURACY_VS_EXAMPLES not in plot_runs([without], out)


def test_a_configuration_run_with_several_seeds_is_one_plot_line_their_mean(tmp_path: Path) -> None:
    """With three seeds a configuration, a plot of every run is three times as crowded: one line, the mean."""
    seeds = [load_run(_run(tmp_path / f"s{seed}", [_record(1, 0.6 + 0.1 * seed, 10, examples=64),
                                                    _record(2, 0.7 + 0.1 * seed, 10, examples=128)],
                           seed=seed, label=f"FL DGC, seed {seed}")) for seed in (0, 1)]
    alone = load_run(_run(tmp_path / "other", [_record(1, 0.5, 10, examples=64)], seed=0, local_steps=5,
                          label="FL DGC short"))
    lines = plot_lines(PLOT_ACCURACY_VS_EXAMPLES, [*seeds, alone])
    assert [line.label for line in lines] == ["FL DGC (mean of 2 seeds)", alone[0].name]  # one run: its own name
    assert [x for point in lines[0].points for x in point] == pytest.approx([64.0, 0.65, 192.0, 0.75])  # examples add up
    assert lines[1].points == ((64.0, 0.5),) and not lines[0].large_batch
