"""edgetrain device: the energy-unavailable explanation is short (status, summaries, one log line); the
sources tried are at DEBUG."""
from __future__ import annotations

import argparse
import logging
from pathlib import Path

import pytest

from edgetrain.sdk.device_cli import open_energy


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
