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


def _tier(name: str) -> list[str]:
    done = subprocess.run(["bash", str(ROOT / "experiments" / "run_all.sh"), name], capture_output=True, text=True,
                          env={"DRY_RUN": "1", "PATH": "/usr/bin:/bin"}, cwd=ROOT, timeout=60)
    assert done.returncode == 0, done.stderr
    return done.stdout.split()


def test_run_all_runs_every_config_once_and_the_whole_matrix() -> None:
    matrix, kept, frontier, extra = _tier("matrix"), _tier("kept"), _tier("frontier"), _tier("extra")
    shipped = {p.stem for p in (ROOT / "experiments").glob("*.toml") if not p.stem.startswith("i17-")}
    assert sorted(matrix + kept + frontier + extra) == sorted(shipped)  # each once; issue 17's are run_17.sh's
    assert _tier("all") == matrix + kept  # the default: the matrix, then the runs docs/results.md cites
    # issue 16: {FL epoch rounds, FL short rounds, LB} x {dense, DGC, sketch, STC} x {IID, Dirichlet(0.3)}
    assert len(matrix) == 3 * 4 * 2
    assert {"fl-dgc985-iid-ls19", "fl-dgc-iid-ls19-down90"} <= set(kept)  # kept runs that had no config
    # issue 16's frontier: DRIVE in both methods, outside the default command
    assert {"fl-drive99-iid-ls19", "lb-drive999-iid"} <= set(frontier) and not set(frontier) & set(_tier("all"))


def _settings(name: str) -> dict:
    args = parse_args(["simulate", "--config", str(ROOT / "experiments" / f"{name}.toml")])
    settings = {k: getattr(args, k) for k in ("strategy", "rounds", "local_steps", "local_epochs", "batch_size", "lr",
                                              "momentum", "devices", "eval_every", "downlink_codec")}
    if args.strategy == "large-batch" and "momentum=0.9" in args.codec and args.momentum == 0.0:
        settings["momentum"] = 0.9  # DGC's momentum correction: the momentum moves from the server to the device
    return settings


@pytest.mark.parametrize("kind", ["fl-{}-{}", "fl-{}-{}-ls19", "lb-{}-{}"])
def test_matrix_cells_of_one_method_differ_only_in_codec_and_data(kind: str) -> None:
    """Matched settings: within a method every cell trains alike; only the uplink codec and the partition move."""
    cells = [_settings(kind.format(codec, data)) for codec in ("dense", "dgc", "sketch", "stc")
             for data in ("iid", "dir03")]
    assert all(cell == cells[0] for cell in cells), cells
