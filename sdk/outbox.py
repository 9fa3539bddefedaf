"""The device's on-disk outbox: an update stays here until the aggregator acknowledges it.

A crash, a reconnect or a broker restart never loses an update: the device writes it here before
publishing and removes it on the aggregator's ack; ``Transport.attach_outbox`` re-publishes what is
left after each reconnect. No paho and no pickle here: one small binary record per entry.
"""
from __future__ import annotations

import json
import logging
import os
import struct
import threading
import zlib
from hashlib import sha256
from pathlib import Path
from typing import NamedTuple

from .atomic_write import atomic_write_bytes, fsync_directory

_log = logging.getLogger(__name__)


class OutboxEntry(NamedTuple):
    key: str
    topic: str
    payload: bytes


class Outbox:
    """Messages kept on disk until the application removes them (on the aggregator's ack).

    One file per entry, ``<sequence>-<sha256(key)>.rec``: magic, a JSON header (key, topic,
    length, crc32) and the raw payload; written to a temporary file, fsynced and renamed, so an
    entry is either whole or absent. Entries that fail their checks are moved to ``corrupt/``
    with a warning. One process owns a directory at a time.
    """

    _MAGIC = b"ETOUTBOX\x01"
    _SUFFIX = ".rec"

    def __init__(self, directory: Path) -> None:
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        for leftover in self.directory.glob(".*.tmp"):  # a write cut short by a crash
            leftover.unlink(missing_ok=True)
        self._next_seq = 1 + max((self._seq(p) for p in self._files()), default=0)

    def put(self, key: str, topic: str, payload: bytes) -> None:
        """Store (or replace) the entry ``key``; durable when this returns."""
        header = json.dumps({"key": key, "topic": topic, "payload_bytes": len(payload),
                             "crc32": zlib.crc32(payload)}).encode("utf-8")
        record = self._MAGIC + struct.pack("<I", len(header)) + header + bytes(payload)
        with self._lock:
            name = f"{self._next_seq:012d}-{self._digest(key)}{self._SUFFIX}"
            self._next_seq += 1
            atomic_write_bytes(self.directory / name, record)
            for old in self._files_for(key):  # the replaced entry goes only once the new one is safe
                if old.name != name:
                    old.unlink(missing_ok=True)

    def remove(self, key: str) -> None:
        """Forget the entry ``key`` (no error if there is none)."""
        with self._lock:
            for path in self._files_for(key):
                path.unlink(missing_ok=True)
            self._fsync_directory()

    def pending(self) -> list[OutboxEntry]:
        """Every entry, oldest first."""
        with self._lock:
            entries: dict[str, OutboxEntry] = {}
            for path in sorted(self._files(), key=self._seq):
                entry = self._read(path)
                if entry is not None:
                    entries.pop(entry.key, None)  # a crash mid-replace leaves two: the newer wins
                    entries[entry.key] = entry
            return list(entries.values())

    def _read(self, path: Path) -> OutboxEntry | None:
        try:
            data = path.read_bytes()
            if not data.startswith(self._MAGIC):
                raise ValueError("bad magic")
            (header_len,) = struct.unpack_from("<I", data, len(self._MAGIC))
            start = len(self._MAGIC) + 4
            header = json.loads(data[start:start + header_len].decode("utf-8"))
            payload = data[start + header_len:]
            if len(payload) != header["payload_bytes"] or zlib.crc32(payload) != header["crc32"]:
                raise ValueError("payload length or crc32 mismatch")
            if path.name.split("-", 1)[1] != self._digest(header["key"]) + self._SUFFIX:
                raise ValueError("file name does not match the key")
            return OutboxEntry(str(header["key"]), str(header["topic"]), payload)
        except FileNotFoundError:
            return None
        except (ValueError, KeyError, TypeError, IndexError, struct.error) as exc:
            corrupt = self.directory / "corrupt"
            corrupt.mkdir(exist_ok=True)
            os.replace(path, corrupt / path.name)
            _log.warning("outbox entry %s is corrupt (%s); moved to %s", path, exc, corrupt)
            return None

    def _files(self) -> list[Path]:
        return [p for p in self.directory.glob(f"*{self._SUFFIX}") if not p.name.startswith(".")]

    def _files_for(self, key: str) -> list[Path]:
        return list(self.directory.glob(f"*-{self._digest(key)}{self._SUFFIX}"))

    @staticmethod
    def _seq(path: Path) -> int:
        head = path.name.split("-", 1)[0]
        return int(head) if head.isdigit() else 0

    @staticmethod
    def _digest(key: str) -> str:
        return sha256(key.encode("utf-8")).hexdigest()[:32]

    def _fsync_directory(self) -> None:
        fsync_directory(self.directory)


