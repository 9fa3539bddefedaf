"""A run directory's identity: a new run never mixes its files into an earlier run's ``--out``.

``aggregate`` and ``simulate`` call :func:`prepare_run_dir` before anything starts (broker, devices,
connections): a non-empty directory is refused unless ``--resume`` (continue that run) or
``--overwrite`` (replace it) says what to do with it.
"""
from __future__ import annotations

import shutil
from pathlib import Path

from edgetrain.sdk.errors import ConfigError

from .checkpoint import CHECKPOINTS_DIR
from .results import METRICS_FILE, SUMMARY_FILE
from .service import RUN_ID_FILE
from .update_journal import JOURNAL_DIR

# Any of these marks a directory as an edgetrain run (simulate also writes bundle/ and devices/ before round 1).
RUN_MARKERS = (METRICS_FILE, SUMMARY_FILE, CHECKPOINTS_DIR, "bundle", "devices", RUN_ID_FILE, JOURNAL_DIR)


def is_run_dir(path: Path) -> bool:
    return any((path / name).exists() for name in RUN_MARKERS)


def prepare_run_dir(out: Path, resume: bool, overwrite: bool) -> None:
    """Check ``out`` for a new (or resumed) run; with ``overwrite``, empty an earlier run's directory.

    Raises ConfigError naming ``--resume`` and ``--overwrite`` when ``out`` holds an earlier run and
    neither was given, and refuses to empty a directory that does not look like a run at all.
    """
    if resume and overwrite:
        raise ConfigError("--resume and --overwrite exclude each other: continue the run in --out, or replace it")
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {out} is a file, not a directory")
    if resume or not out.is_dir():
        return
    entries = sorted(p.name for p in out.iterdir())
    if not entries:
        return
    if not overwrite:
        shown = ", ".join(entries[:4]) + (", …" if len(entries) > 4 else "")
        raise ConfigError(f"--out {out} is not empty ({shown}): pass --resume to continue that run, "
                          "--overwrite to replace it, or choose another --out")
    if not is_run_dir(out):
        raise ConfigError(f"--out {out} is not an edgetrain run directory (none of {', '.join(RUN_MARKERS)}); "
                          "--overwrite empties only run directories: choose another --out")
    for entry in out.iterdir():
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry)
        else:
            entry.unlink()
