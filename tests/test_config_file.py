"""One TOML file drives aggregate, device and simulate: [fleet] shared, one section per command, flags
win, unknown keys refused naming key and section; device --index needs --count; a bundle's optimizer
settings are the defaults of a run."""
from __future__ import annotations

import argparse
from pathlib import Path

import pytest

from edgetrain.aggregator.cli import FALLBACK_OPTIMIZER, resolve_defaults, take_bundle_optimizer
from edgetrain.cli import main, parse_args
from edgetrain.sdk.device_cli import partition_slot
from edgetrain.sdk.errors import ConfigError

ROOT = Path(__file__).resolve().parent.parent

FLEET_TOML = '''
[fleet]
broker = "mqtt://127.0.0.1:18830"
fleet = "lab"
bundle = "bundles/cnn"
partition = "dirichlet:0.3"
seed = 3
devices = 3
codec = "stc:sparsity=0.99"

[aggregate]
out = "runs/lab"
rounds = 4
min-devices = 3
round_timeout = 30

[device]
limit-examples = 200
log-level = "WARNING"

[simulate]
rounds = 2
'''


def _write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "fleet.toml"
    path.write_text(text)
    return path


def test_aggregate_device_and_simulate_read_one_file(tmp_path: Path) -> None:
    config = str(_write(tmp_path, FLEET_TOML))
    agg = parse_args(["aggregate", "--config", config])  # --fleet and --bundle (required) come from the file
    dev = parse_args(["device", "--config", config, "--device-id", "d1", "--index", "1"])
    sim = parse_args(["simulate", "--config", config])
    for args in (agg, dev, sim):
        assert (args.broker, args.fleet, args.bundle, args.seed) == ("mqtt://127.0.0.1:18830", "lab",
                                                                     Path("bundles/cnn"), 3)
    assert (agg.rounds, agg.min_devices, agg.round_timeout, agg.codec, agg.out) == (
        4, 3, 30.0, "stc:sparsity=0.99", Path("runs/lab"))
    assert (dev.partition, dev.index, dev.count, dev.limit_examples, dev.log_level) == (
        "dirichlet:0.3", 1, 3, 200, "WARNING")  # the fleet's size is each device's partition count
    assert (sim.rounds, sim.devices, sim.partition, sim.codec) == (2, 3, "dirichlet:0.3", "stc:sparsity=0.99")
    assert agg.log_level == "INFO"  # [device]'s log level is the device's only


def test_the_command_line_wins_over_every_section(tmp_path: Path) -> None:
    config = str(_write(tmp_path, FLEET_TOML))
    agg = parse_args(["aggregate", "--config", config, "--rounds", "9", "--fleet", "other", "--seed", "0"])
    assert (agg.rounds, agg.fleet, agg.seed) == (9, "other", 0)


def test_a_shared_experiment_config_runs_a_real_fleet(tmp_path: Path) -> None:
    path = str(ROOT / "experiments" / "fl-dgc-iid.toml")
    agg = parse_args(["aggregate", "--config", path, "--fleet", "f", "--bundle", "b"])
    dev = parse_args(["device", "--config", path, "--fleet", "f", "--bundle", "b", "--device-id", "d", "--index", "9"])
    assert agg.codec.startswith("dgc") and agg.strategy == "fedavg" and agg.lr == 0.05
    assert (dev.partition, dev.count, dev.index) == ("iid", 10, 9)


@pytest.mark.parametrize("text, needle", [
    ("[aggregate]\npartition = 'iid'\n", "unknown setting 'partition' in [aggregate]"),
    ("[device]\nrounds = 3\n", "unknown setting 'rounds' in [device]"),
    ("[fleet]\nroundz = 3\n", "unknown setting 'roundz' in [fleet]"),
    ("roundz = 3\n", "unknown setting 'roundz' in [top level]"),
    ("[agregate]\nrounds = 3\n", "unknown section [agregate]"),
    ("[simulate]\nscale-lr = 'yes'\n", "[simulate] scale-lr = 'yes': expected true or false"),
    ("[aggregate]\nrounds = 2.5\n", "[aggregate] rounds = 2.5"),
    ("[aggregate]\nlr = true\n", "[aggregate] lr = True"),
    ("seed = 1\n[fleet]\nseed = 2\n", "'seed' is set both"),
])
def test_bad_keys_are_refused_whichever_command_reads_the_file(tmp_path: Path, text: str, needle: str) -> None:
    config = str(_write(tmp_path, text))
    for argv in (["aggregate", "--fleet", "f", "--bundle", "b"], ["device", "--fleet", "f", "--bundle", "b",
                                                                   "--device-id", "d"], ["simulate"]):
        with pytest.raises(ConfigError) as info:
            parse_args([*argv, "--config", config])
        assert needle in str(info.value) and str(tmp_path / "fleet.toml") in str(info.value)


def test_a_bad_config_is_one_line_and_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["aggregate", "--config", str(_write(tmp_path, "[device]\nnope = 1\n"))]) == 2
    err = capsys.readouterr().err
    assert err.startswith("edgetrain aggregate: error: ") and err.count("\n") == 1 and "'nope' in [device]" in err


def test_a_required_flag_missing_from_flags_and_file_is_still_required(tmp_path: Path) -> None:
    with pytest.raises(SystemExit):
        parse_args(["aggregate", "--config", str(_write(tmp_path, "[fleet]\nfleet = 'x'\n"))])  # no --bundle


@pytest.mark.parametrize("index, count, needle", [
    (3, None, "--index 3 needs --count"),
    (None, 4, "--count 4 needs --index"),
    (4, 4, "out of range"),
    (-1, 4, "out of range"),
])
def test_device_index_needs_count(index: int | None, count: int | None, needle: str) -> None:
    with pytest.raises(ConfigError, match=needle):
        partition_slot(index, count)


def test_device_without_index_and_count_is_the_whole_set() -> None:
    assert partition_slot(None, None) == (0, 1) and partition_slot(2, 3) == (2, 3)


def test_device_index_without_count_exits_2_before_loading_anything(capsys: pytest.CaptureFixture[str],
                                                                     tmp_path: Path) -> None:
    # The bundle does not exist: reaching the loads would name it instead.
    assert main(["device", "--fleet", "f", "--bundle", str(tmp_path / "none"), "--device-id", "d",
                 "--index", "2"]) == 2
    assert "--index 2 needs --count" in capsys.readouterr().err


def _namespace(**given: float | None) -> argparse.Namespace:
    return argparse.Namespace(**{name: given.get(name) for name in FALLBACK_OPTIMIZER})


def test_the_bundle_optimizer_fills_what_no_flag_gave_and_a_difference_is_warned() -> None:
    args = _namespace(lr=0.05)
    warnings = take_bundle_optimizer(args, {"name": "sgd", "lr": 0.01, "momentum": 0.8, "weight_decay": 0.0})
    assert (args.lr, args.momentum, args.weight_decay) == (0.05, 0.8, 0.0)
    assert warnings == ["--lr 0.05 differs from the bundle's lr 0.01 (stored by export); using 0.05"]


def test_without_bundle_settings_the_fallbacks_apply() -> None:
    args = _namespace()
    args.strategy = "fedavg"
    for name in ("rounds", "eval_every", "checkpoint_every", "resync_every"):
        setattr(args, name, None)
    assert take_bundle_optimizer(args, {"name": "sgd"}) == []
    resolve_defaults(args)
    assert (args.lr, args.momentum, args.weight_decay) == (0.05, 0.9, 0.0)
