"""What a device keeps on disk besides its outbox, per run: the last round it answered and its codec state.

Both survive a restart, so a restarted device neither trains a round twice nor loses the residuals
of an error-feedback codec (DGC, STC). Both belong to one run (``run_id`` from the announcements): a
new run starts them afresh, since its round numbers and model versions start again from the
beginning. Codec state is a safetensors file (no pickle) tagged with the codec spec it belongs to; a
different spec, or a resync of the model, starts it afresh.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np

from .atomic_write import atomic_path, atomic_write_json

_log = logging.getLogger(__name__)


class DeviceState:
    def __init__(self, state_dir: Path) -> None:
        self.dir = Path(state_dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        self._progress = self.dir / "progress.json"
        self._codec = self.dir / "codec_state.safetensors"
        self._codec_cache: tuple[str, dict[str, np.ndarray]] | None = None

    def _read_progress(self) -> tuple[str, int, int]:
        try:
            raw = json.loads(self._progress.read_text())
            run_id, round_id, version = raw.get("run_id", ""), int(raw["round_id"]), int(raw["model_version"])
            if not isinstance(run_id, str):
                raise TypeError(f"run_id is a {type(run_id).__name__}")
            return run_id, round_id, version
        except FileNotFoundError:
            return "", -1, -1
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            _log.warning("%s unreadable (%s); starting fresh", self._progress, exc)
            return "", -1, -1

    def _write_progress(self, run_id: str, round_id: int, model_version: int) -> None:
        atomic_write_json(self._progress, {"run_id": run_id, "round_id": round_id, "model_version": model_version})

    def run_id(self) -> str:
        """The run this device's progress belongs to ("" before its first run)."""
        return self._read_progress()[0]

    def begin_run(self, run_id: str) -> bool:
        """Make ``run_id`` the current run; True (and progress and codec state reset) when it is new."""
        if run_id == self.run_id():
            return False
        self.reset_codec_state()
        self._write_progress(run_id, -1, -1)
        return True

    def last_done(self) -> tuple[int, int]:
        """(round id, model version) of the last announcement this device answered in the current run;
        (-1, -1) if none."""
        return self._read_progress()[1:]

    def mark_done(self, round_id: int, model_version: int) -> None:
        self._write_progress(self.run_id(), round_id, model_version)

    def codec_state(self, spec: str) -> dict[str, np.ndarray] | None:
        """The saved state of codec ``spec``; None when there is none, or it belongs to another spec."""
        if self._codec_cache is not None and self._codec_cache[0] == spec:
            return self._codec_cache[1]
        if not self._codec.is_file():
            return None
        from safetensors import safe_open

        try:
            with safe_open(str(self._codec), framework="numpy") as fh:
                if (fh.metadata() or {}).get("codec") != spec:
                    return None
                state = {key: fh.get_tensor(key) for key in fh.keys()}
        except Exception as exc:  # a torn or foreign file: start the codec afresh, say so
            _log.warning("%s unreadable (%s); codec state starts afresh", self._codec, exc)
            return None
        self._codec_cache = (spec, state)
        return state

    def save_codec_state(self, spec: str, state: dict[str, np.ndarray] | None) -> None:
        if not state:
            # A stateless codec now: whatever is on disk belongs to an earlier spec and would come
            # back stale if that spec returned later.
            self.reset_codec_state()
            return
        from safetensors.numpy import save_file

        with atomic_path(self._codec) as tmp:
            save_file({k: np.ascontiguousarray(v) for k, v in state.items()}, str(tmp), metadata={"codec": spec})
        self._codec_cache = (spec, state)

    def reset_codec_state(self) -> None:
        self._codec.unlink(missing_ok=True)
        self._codec_cache = None
