"""simulate --config: TOML settings under the command line; every shipped experiment config is valid;
the centralized baseline (train --out) is a run directory that report reads. (The file's sections, and
aggregate and device reading it too: test_config_file.py.)"""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from edgetrain.aggregator.report import load_run
from edgetrain.cli import parse_args
from edgetrain.sdk.errors import ConfigError
from tests.fleet import FleetAssets, fleet_assets  # noqa: F401

ROOT = Path(__file__).resolve().parent.parent


def _config(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "c.toml"
    path.write_text(text)
    return path


def test_config_fills_unset_flags_and_the_command_line_wins(tmp_path: Path) -> None:
    config = _config(tmp_path, 'devices = 7\nrounds = 3\ncodec = "stc:sparsity=0.99"\n'
                               'momentum = 0.0\nout = "x/y"\nscale-lr = true\nseed = 5\n')
    args = parse_args(["simulate", "--devices", "4", "--seed", "0", "--config", str(config)])
    assert args.devices == 4 and args.seed == 0  # given on the command line, even where it is the default
    assert (args.rounds, args.codec, args.momentum, args.scale_lr) == (3, "stc:sparsity=0.99", 0.0, True)
    assert args.out == Path("x/y")


@pytest.mark.parametrize("text,needle", [
    ("nope = 1\n", "unknown setting 'nope'"),
    ("devices = 0\n", "devices = 0"),
    ('runtime = "tflite"\n', "choose from"),
    ("devices = [\n", "--config"),
])
def test_bad_config_names_the_problem(tmp_path: Path, text: str, needle: str) -> None:
    with pytest.raises(ConfigError, match=needle):
        parse_args(["simulate", "--config", str(_config(tmp_path, text))])


@pytest.mark.parametrize("path", sorted((ROOT / "experiments").glob("*.toml")), ids=lambda p: p.stem)
def test_every_shipped_experiment_config_is_valid(path: Path) -> None:
    args = parse_args(["simulate", "--config", str(path)])
    assert args.strategy in ("fedavg", "fedbuff", "large-batch")
    if not path.stem.startswith("i17-"):  # issue 17's: experiments/run_17.sh labels each run and adds its flags
        assert args.label and args.devices == 10


def test_centralized_baseline_is_a_run_directory(fleet_assets: FleetAssets, tmp_path: Path) -> None:
    out = tmp_path / "central"
    done = subprocess.run([sys.executable, "-m", "edgetrain", "train", "--bundle", str(fleet_assets.bundle),
                           "--data-dir", str(fleet_assets.data_dir), "--epochs", "2", "--out", str(out),
                           "--label", "baseline"], capture_output=True, text=True, cwd=ROOT)
    assert done.returncode == 0, done.stderr
    report, records = load_run(out)
    assert [r.round_id for r in records] == [1, 2] and report.name == "baseline"
    assert report.settings["strategy"] == "centralized" and report.uplink_mb == 0
    assert report.final_accuracy == records[-1].accuracy is not None
