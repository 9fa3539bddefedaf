"""Atomic file writes with one durability policy, for every file edgetrain replaces in place.

The policy: write a temporary file in the target's directory (so the rename cannot cross file
systems), fsync it, ``os.replace`` it over the target, then fsync the directory (the rename is only
durable once the directory entry is on disk). A reader therefore sees the old file or the new one,
never part of either, and after a crash or power loss the new one is there once the call returned.
If the writer fails, the temporary file is removed and the target is left as it was.

Temporary names are ``.<target name>.<random>.tmp``: hidden, and matched by a ``.*.tmp`` sweep
(the outbox clears such leftovers of a killed process on start).
"""
from __future__ import annotations

import json
import os
import secrets
from contextlib import contextmanager
from pathlib import Path
from typing import Any, BinaryIO, Iterator

_TEMP_SUFFIX = ".tmp"


def _fsync_path(path: Path | str) -> None:
    """fsync a file or a directory by its path (a directory's fsync makes renames inside it durable)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_directory(directory: Path | str) -> None:
    """Make renames and deletions inside ``directory`` durable."""
    _fsync_path(directory)


def _reserve_temp(target: Path) -> Path:
    """A new, empty temporary file beside ``target``, created exclusively with the usual permissions
    (0o666 less the umask, as a plain ``open`` would; ``tempfile.mkstemp`` would make it 0o600)."""
    while True:
        temp = target.with_name(f".{target.name}.{secrets.token_hex(6)}{_TEMP_SUFFIX}")
        try:
            os.close(os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
            return temp
        except FileExistsError:  # astronomically unlikely; draw another name
            continue


@contextmanager
def atomic_path(target: Path | str) -> Iterator[Path]:
    """A temporary path for a writer that wants a file name (e.g. safetensors' ``save_file``).

    When the ``with`` block ends normally, whatever was written there replaces ``target`` under the
    module's policy; when it raises, the temporary file is removed and ``target`` is untouched.
    """
    target = Path(target)
    temp = _reserve_temp(target)
    try:
        yield temp
        _fsync_path(temp)
        os.replace(temp, target)
    except BaseException:
        temp.unlink(missing_ok=True)
        raise
    fsync_directory(target.parent)


@contextmanager
def atomic_open(target: Path | str) -> Iterator[BinaryIO]:
    """A binary file to stream into; it replaces ``target`` when the ``with`` block ends normally."""
    with atomic_path(target) as temp, open(temp, "wb") as handle:
        yield handle


def atomic_write_bytes(target: Path | str, data: bytes) -> Path:
    """Replace ``target`` with ``data``, atomically and durably; returns the target's path."""
    with atomic_open(target) as handle:
        handle.write(data)
    return Path(target)


def atomic_write_text(target: Path | str, text: str, encoding: str = "utf-8") -> Path:
    """Replace ``target`` with ``text`` (``encoding``), atomically and durably."""
    return atomic_write_bytes(target, text.encode(encoding))


def atomic_write_json(target: Path | str, value: Any, **dumps_options: Any) -> Path:
    """Replace ``target`` with ``value`` as JSON (``json.dumps`` options pass through), atomically."""
    return atomic_write_text(target, json.dumps(value, **dumps_options))
