"""The device core's memory figures: from /proc/self/status where psutil is absent (a board install)."""
from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from edgetrain.sdk.device_metrics import proc_status_mb

REPO = Path(__file__).resolve().parents[1]


def test_proc_status_lines_are_read_in_mib(tmp_path: Path) -> None:
    status = tmp_path / "status"
    status.write_text("Name:\tpython\nVmHWM:\t  211968 kB\nVmRSS:\t   81920 kB\n")
    assert proc_status_mb("VmHWM", str(status)) == 207.0
    assert proc_status_mb("VmRSS", str(status)) == 80.0
    assert proc_status_mb("VmSwap", str(status)) is None
    assert proc_status_mb("VmRSS", str(tmp_path / "missing")) is None


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="Linux /proc only")
def test_without_psutil_the_current_rss_comes_from_proc() -> None:
    code = textwrap.dedent("""
        import sys
        class _NoPsutil:
            def find_spec(self, name, path=None, target=None):
                if name == "psutil":
                    raise ModuleNotFoundError(name)
        sys.meta_path.insert(0, _NoPsutil())
        from edgetrain.sdk.device_metrics import memory_values
        values = memory_values()
        assert "psutil" not in sys.modules
        assert 5 < values["rss_mb"] <= values["peak_rss_mb"], values
        print("ok")
    """)
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
