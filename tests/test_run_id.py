"""The aggregator's run id: new for a new run, kept by ``--resume`` (so devices keep their progress)."""
from __future__ import annotations

from pathlib import Path

from edgetrain.aggregator.service import RUN_ID_FILE, load_or_create_run_id


def test_a_new_run_gets_a_new_id_and_a_resumed_run_keeps_it(tmp_path: Path) -> None:
    first = load_or_create_run_id(tmp_path, resume=False)
    assert (tmp_path / RUN_ID_FILE).read_text().strip() == first
    assert load_or_create_run_id(tmp_path, resume=True) == first
    second = load_or_create_run_id(tmp_path, resume=False)
    assert second != first and load_or_create_run_id(tmp_path, resume=True) == second


def test_a_resume_without_a_usable_id_starts_a_new_one(tmp_path: Path) -> None:
    (tmp_path / RUN_ID_FILE).write_text("../../etc\n")
    run_id = load_or_create_run_id(tmp_path, resume=True)
    assert run_id.isalnum() and (tmp_path / RUN_ID_FILE).read_text().strip() == run_id
    assert load_or_create_run_id(tmp_path / "fresh", resume=True).isalnum()  # nothing there yet
