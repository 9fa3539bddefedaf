"""Accepted updates of rounds not yet checkpointed, on disk before they are acked: an ack means durable.

Layout under ``<run_dir>/journal/``::

    round-00000007/000000.update     the accepted Update, wire-encoded (one frame), fsynced
                  /000001.update

Why the update and not the round's partial sum: the journal then costs what the uplink carried (a dgc
update is ~1% of the model) and one small fsynced file per accept, where a partial sum rewrites O(model)
bytes on every accept; the running sum in memory stays a streaming sum; a resumed run replays the files
through the same ``validate_update`` as on arrival, so a journal file earns no trust a wire frame lacks.
It needs nothing from the devices (their outbox and ack handling stay as they are). With several
aggregation workers each keeps its own journal, and its partial sum is the replay of it, so a
coordinator can still reduce partial sums. A round's journal is removed once a checkpoint covers it.
The files are written to a temp name, fsynced, renamed and the directory fsynced, so a SIGKILL leaves
each file whole or absent (the ack is sent only after ``record`` returns).
"""
from __future__ import annotations

import logging
import re
import shutil
from pathlib import Path

from edgetrain.sdk import wire
from edgetrain.sdk.atomic_write import atomic_write_bytes, fsync_directory
from edgetrain.sdk.errors import WireError

_log = logging.getLogger(__name__)
JOURNAL_DIR = "journal"
_ROUND_DIR_RE = re.compile(r"^round-(\d{8,})$")
_SUFFIX = ".update"


class UpdateJournal:
    """Per-round directories of accepted update frames under ``<run_dir>/journal``."""

    def __init__(self, run_dir: Path | str) -> None:
        self.root = Path(run_dir) / JOURNAL_DIR

    def _round_dir(self, round_id: int) -> Path:
        return self.root / f"round-{round_id:08d}"

    def record(self, round_id: int, update: wire.Update) -> None:
        """Write ``update`` durably for ``round_id``; raises OSError when the disk refuses (do not ack)."""
        directory = self._round_dir(round_id)
        directory.mkdir(parents=True, exist_ok=True)
        index = sum(1 for entry in directory.iterdir() if entry.name.endswith(_SUFFIX))
        final = directory / f"{index:06d}{_SUFFIX}"
        atomic_write_bytes(final, wire.encode(update))
        if index == 0:
            fsync_directory(directory.parent)  # the round directory's own entry

    def replay(self, round_id: int) -> list[wire.Update]:
        """The updates journaled for ``round_id``, oldest first; an unreadable file is logged and skipped."""
        directory = self._round_dir(round_id)
        if not directory.is_dir():
            return []
        updates = []
        for path in sorted(p for p in directory.iterdir() if p.name.endswith(_SUFFIX) and not p.name.startswith(".")):
            try:
                message = wire.decode(path.read_bytes())
            except (OSError, WireError) as exc:
                _log.warning("journal file %s unreadable (%s); skipped", path, exc)
                continue
            if isinstance(message, wire.Update):
                updates.append(message)
            else:
                _log.warning("journal file %s holds a %s, not an update; skipped", path, type(message).__name__)
        return updates

    def forget_through(self, round_id: int) -> None:
        """Remove the journals of every round up to ``round_id`` (a checkpoint now covers them)."""
        if not self.root.is_dir():
            return
        for entry in self.root.iterdir():
            match = _ROUND_DIR_RE.match(entry.name)
            if match and int(match.group(1)) <= round_id:
                shutil.rmtree(entry, ignore_errors=True)

    def clear(self) -> None:
        """A fresh (not resumed) run: nothing from an earlier run in this directory may be replayed."""
        shutil.rmtree(self.root, ignore_errors=True)
