"""aggregate / simulate refuse a non-empty --out unless told --resume or --overwrite, before any broker or
device starts; --overwrite replaces only what looks like an edgetrain run directory."""
from __future__ import annotations

from pathlib import Path

import pytest

import edgetrain.aggregator.local_broker as local_broker_module
import edgetrain.aggregator.simulate as simulate_module
from edgetrain.aggregator.run_dir import prepare_run_dir
from edgetrain.cli import main
from edgetrain.sdk.errors import ConfigError


def _previous_run(out: Path) -> Path:
    out.mkdir(parents=True)
    (out / "metrics.jsonl").write_text("")
    (out / "devices").mkdir()
    (out / "devices" / "dev-000.log").write_text("old")
    return out


@pytest.fixture
def nothing_starts(monkeypatch: pytest.MonkeyPatch) -> None:
    def must_not_start(*args: object, **kwargs: object) -> None:
        raise AssertionError("a process or connection was started before --out was checked")

    monkeypatch.setattr(simulate_module.subprocess, "Popen", must_not_start)
    monkeypatch.setattr(local_broker_module.LocalMosquitto, "__init__", must_not_start)
    monkeypatch.setattr("edgetrain.aggregator.cli.build_aggregator", must_not_start)


@pytest.mark.parametrize("command", [["simulate"], ["aggregate", "--fleet", "f", "--bundle", "b"]])
def test_a_non_empty_out_is_refused_naming_resume_and_overwrite(command: list[str], tmp_path: Path, nothing_starts,
                                                                 capsys: pytest.CaptureFixture[str]) -> None:
    out = _previous_run(tmp_path / "run")
    assert main([*command, "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--resume" in err and "--overwrite" in err and str(out) in err
    assert (out / "devices" / "dev-000.log").read_text() == "old"  # nothing touched


def test_resume_and_overwrite_exclude_each_other(tmp_path: Path, nothing_starts,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["simulate", "--out", str(tmp_path), "--resume", "--overwrite"]) == 2
    assert "--resume and --overwrite" in capsys.readouterr().err


def test_simulate_resume_needs_an_out(nothing_starts, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["simulate", "--resume"]) == 2
    assert "--resume needs --out" in capsys.readouterr().err


def test_an_empty_or_missing_out_is_fine(tmp_path: Path) -> None:
    prepare_run_dir(tmp_path / "new", resume=False, overwrite=False)
    (tmp_path / "empty").mkdir()
    prepare_run_dir(tmp_path / "empty", resume=False, overwrite=False)
    assert not (tmp_path / "new").exists()  # checking creates nothing


def test_resume_keeps_the_run_and_overwrite_clears_it(tmp_path: Path) -> None:
    out = _previous_run(tmp_path / "run")
    prepare_run_dir(out, resume=True, overwrite=False)
    assert (out / "devices" / "dev-000.log").exists()
    prepare_run_dir(out, resume=False, overwrite=True)
    assert out.is_dir() and list(out.iterdir()) == []


def test_overwrite_refuses_a_directory_that_is_not_a_run(tmp_path: Path) -> None:
    (tmp_path / "thesis.tex").write_text("precious")
    with pytest.raises(ConfigError, match="not an edgetrain run directory"):
        prepare_run_dir(tmp_path, resume=False, overwrite=True)
    assert (tmp_path / "thesis.tex").read_text() == "precious"
