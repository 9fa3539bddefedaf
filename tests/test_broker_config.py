"""The only module that imports paho is sdk.transport: a broker URL is checked without it."""
from __future__ import annotations

import subprocess
import sys

from tests.fleet import REPO_ROOT


def test_broker_urls_and_the_cli_args_load_without_paho() -> None:
    code = ("import sys; from edgetrain.sdk.cli_args import broker_config; from edgetrain.sdk.broker_config import BrokerConfig; "
            "c = BrokerConfig.parse('mqtt://u:p@h:1884?protocol=3.1.1'); "
            "assert (c.host, c.port, c.username, c.protocol) == ('h', 1884, 'u', '3.1.1'); "
            "assert not [m for m in sys.modules if m.startswith('paho')], 'paho was imported'")
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stderr


def test_transport_still_exports_broker_config() -> None:
    from edgetrain.sdk.broker_config import BrokerConfig as direct
    from edgetrain.sdk.transport import BrokerConfig as via_transport

    assert via_transport is direct
