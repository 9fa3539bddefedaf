"""sdk/atomic_write.py: never a partial target, never a temp file left behind, one fsync policy."""
from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import pytest

from edgetrain.sdk import atomic_write
from edgetrain.sdk.atomic_write import atomic_open, atomic_path, atomic_write_bytes, atomic_write_json, atomic_write_text


class WriterCrash(RuntimeError):
    pass


def test_a_writer_failing_midway_leaves_the_old_file_and_no_temp(tmp_path: Path) -> None:
    target = tmp_path / "state.bin"
    target.write_bytes(b"old contents")
    with pytest.raises(WriterCrash):
        with atomic_open(target) as handle:
            handle.write(b"new, but only ha")
            handle.flush()
            raise WriterCrash("killed mid-write")
    assert target.read_bytes() == b"old contents"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["state.bin"]


def test_a_path_writer_failing_leaves_no_target_when_there_was_none(tmp_path: Path) -> None:
    target = tmp_path / "codec.safetensors"
    with pytest.raises(WriterCrash):
        with atomic_path(target) as temp:
            temp.write_bytes(b"partial")
            raise WriterCrash("library raised")
    assert list(tmp_path.iterdir()) == []


def test_a_failing_rename_leaves_no_temp(tmp_path: Path) -> None:
    target = tmp_path / "taken"
    target.mkdir()
    (target / "inside").write_text("x")  # a non-empty directory cannot be replaced by a file
    with pytest.raises(OSError):
        atomic_write_bytes(target, b"data")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["taken"]


def test_writes_replace_the_target_with_plain_open_permissions(tmp_path: Path) -> None:
    target = tmp_path / "manifest.json"
    atomic_write_text(target, "first")
    atomic_write_json(target, {"round_id": 3}, sort_keys=True)
    assert json.loads(target.read_text()) == {"round_id": 3}
    assert [p.name for p in tmp_path.iterdir()] == ["manifest.json"]
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE(target.stat().st_mode) == 0o666 & ~umask


def test_the_file_is_synced_before_the_rename_and_the_directory_after(tmp_path: Path,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    target = tmp_path / "progress.json"
    events: list[str] = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd: int) -> None:
        events.append("fsync dir" if stat.S_ISDIR(os.fstat(fd).st_mode) else "fsync file")
        real_fsync(fd)

    def replace(src: str | Path, dst: str | Path) -> None:
        events.append("replace")
        real_replace(src, dst)

    monkeypatch.setattr(atomic_write.os, "fsync", fsync)
    monkeypatch.setattr(atomic_write.os, "replace", replace)
    atomic_write_bytes(target, b"{}")
    assert events == ["fsync file", "replace", "fsync dir"]
    assert target.read_bytes() == b"{}"
