"""edgetrain device: the energy-unavailable explanation is short (status, summaries, one log line); the
sources tried are at DEBUG."""
from __future__ import annotations

import argparse
import logging
import subprocess
import sys
from pathlib import Path

import pytest

from edgetrain.cli import parse_args
from edgetrain.sdk.device_cli import open_energy
from edgetrain.sdk.errors import ConfigError


def test_no_power_source_is_said_in_a_few_words_and_the_details_go_to_debug(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, logger="edgetrain.sdk.device_cli")
    args = argparse.Namespace(power_source="auto", sysfs_root=tmp_path, vcgencmd="/nonexistent/vcgencmd",
                              meter_csv=None)
    energy, why_not = open_energy(args)
    assert energy is None
    assert why_not == "no power source detected (--log-level DEBUG lists the sources tried)"
    details = [r.getMessage() for r in caplog.records if r.levelno == logging.DEBUG]
    assert len(details) == 1 and "rapl" in details[0] and "ina3221" in details[0]


# In a fresh interpreter: this one has imported the whole package already.
_DEVICE_PARSE_PROBE = """
import sys
from edgetrain.cli import parse_args
args = parse_args(sys.argv[1:])
print(args.command, sorted(m for m in sys.modules if m.startswith(("edgetrain.aggregator", "edgetrain.export", "scipy"))))
"""


@pytest.mark.parametrize("argv", [
    ["device", "--fleet", "f", "--bundle", "b", "--device-id", "d", "--index", "0"],
    ["device-host", "--fleet", "f", "--bundle", "b", "--ids", "d-000..d-001", "--count", "2",
     "--state-root", "s"],
], ids=["device", "device-host"])
def test_a_device_command_imports_none_of_the_server(argv: list[str]) -> None:
    """Ten device processes start together in a simulate (and one on a board): each importing the aggregator
    and scipy for a parser it does not use cost ~0.3 CPU-s apiece."""
    probe = subprocess.run([sys.executable, "-c", _DEVICE_PARSE_PROBE, *argv], capture_output=True, text=True,
                           timeout=120, check=True)
    assert probe.stdout.split(" ", 1) == [argv[0], "[]\n"]


def test_a_device_command_with_a_config_file_still_checks_it_against_every_command(tmp_path: Path) -> None:
    """A config file is checked against every command's flags, so a typo fails whichever command reads it:
    the lazy parser must not make a device accept a setting no command has."""
    config = tmp_path / "fleet.toml"
    config.write_text("[fleet]\nfleet = 'f'\nbundle = 'b'\n[aggregate]\nrounds = 3\n[device]\nno_such_flag = 1\n")
    with pytest.raises(ConfigError, match="no_such_flag"):
        parse_args(["device", "--config", str(config), "--device-id", "d", "--index", "0"])
    ok = tmp_path / "ok.toml"
    ok.write_text("[fleet]\nfleet = 'f'\nbundle = 'b'\nrounds = 3\n")  # rounds: aggregate's, shared
    assert parse_args(["device", "--config", str(ok), "--device-id", "d", "--index", "0"]).fleet == "f"
