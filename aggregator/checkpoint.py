"""Atomic checkpoints of a federated run, so a killed aggregator resumes exactly where it was.

Layout under ``<run_dir>/checkpoints/``::

    round-00000012/params.safetensors      global parameters after round 12 (flat float32)
                  /strategy.safetensors    server optimiser state (moments…), maybe empty
                  /meta.json               round, model version, rng state, strategy meta, sha256s

A checkpoint is written into a hidden temp directory, every file fsynced, then renamed into
place in one ``os.rename``; a SIGKILL at any moment leaves either the old set of checkpoints or
the new one, plus at worst a hidden temp directory that loading ignores and the next save removes.
No pickle: arrays are safetensors, everything else JSON.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from edgetrain.sdk.atomic_write import atomic_write_bytes, fsync_directory
from edgetrain.sdk.errors import BundleError, ConfigError

FORMAT_VERSION = 1
CHECKPOINTS_DIR = "checkpoints"
PARAMS_FILE = "params.safetensors"
STATE_FILE = "strategy.safetensors"
META_FILE = "meta.json"
_TEMP_PREFIX = ".tmp-"  # a write in progress (or killed mid-way)
_ROUND_DIR_RE = re.compile(r"^round-(\d{8,})$")


@dataclass(frozen=True, eq=False)
class Checkpoint:
    """Everything a resumed run needs after ``round_completed`` (``extra``: any JSON the caller adds)."""

    round_completed: int
    model_version: int
    params: np.ndarray  # flat float32
    strategy_state: Mapping[str, np.ndarray]
    strategy_meta: Mapping[str, Any]
    rng_state: Mapping[str, Any]
    extra: Mapping[str, Any] = field(default_factory=dict)


def rng_state(rng: np.random.Generator) -> dict[str, Any]:
    """The generator's state as plain JSON values (numpy's own dict form)."""
    return json.loads(json.dumps(rng.bit_generator.state))


def rng_from_state(state: Mapping[str, Any]) -> np.random.Generator:
    """A generator that continues exactly where the one ``rng_state`` came from stopped."""
    name = state.get("bit_generator") if isinstance(state, Mapping) else None
    bit_generator_cls = getattr(np.random, str(name), None)
    if not (isinstance(bit_generator_cls, type) and issubclass(bit_generator_cls, np.random.BitGenerator)):
        raise ConfigError(f"rng state names an unknown bit generator {name!r}")
    bit_generator = bit_generator_cls()
    try:
        bit_generator.state = dict(state)
    except (TypeError, ValueError, KeyError) as exc:
        raise ConfigError(f"rng state for {name} is malformed ({exc})") from exc
    return np.random.Generator(bit_generator)


def checkpoint_dir_name(round_completed: int) -> str:
    return f"round-{round_completed:08d}"


def list_checkpoints(run_dir: Path | str) -> list[tuple[int, Path]]:
    """Complete checkpoints as (round, directory), oldest first; temp directories are skipped."""
    root = Path(run_dir) / CHECKPOINTS_DIR
    if not root.is_dir():
        return []
    found = []
    for entry in root.iterdir():
        match = _ROUND_DIR_RE.match(entry.name)
        if match and entry.is_dir():
            found.append((int(match.group(1)), entry))
    return sorted(found)


def _arrays_bytes(arrays: Mapping[str, np.ndarray], what: str) -> bytes:
    from safetensors.numpy import save  # small, pickle-free

    try:
        return save({str(k): np.ascontiguousarray(v) for k, v in arrays.items()})
    except Exception as exc:  # safetensors raises its own types; name what we were saving
        raise ConfigError(f"cannot serialise {what} as safetensors ({exc})") from exc


def _check_checkpoint(ckpt: Checkpoint) -> None:
    if ckpt.round_completed < 0 or ckpt.model_version < 0:
        raise ConfigError(f"checkpoint round ({ckpt.round_completed}) and model version "
                          f"({ckpt.model_version}) must be >= 0")
    params = ckpt.params
    if not isinstance(params, np.ndarray) or params.dtype != np.float32 or params.ndim != 1:
        raise ConfigError(f"checkpoint params must be a flat float32 vector, got "
                          f"{getattr(params, 'dtype', type(params).__name__)} {getattr(params, 'shape', '')}")


def save_checkpoint(run_dir: Path | str, ckpt: Checkpoint, keep_last: int = 3) -> Path:
    """Write ``ckpt`` atomically, keep the newest ``keep_last`` checkpoints, return its directory."""
    if keep_last < 1:
        raise ConfigError(f"keep_last must be >= 1, got {keep_last}")
    _check_checkpoint(ckpt)
    root = Path(run_dir) / CHECKPOINTS_DIR
    root.mkdir(parents=True, exist_ok=True)
    _remove_leftovers(root)

    params_bytes = _arrays_bytes({"params": ckpt.params}, "parameters")
    state_bytes = _arrays_bytes(ckpt.strategy_state, "strategy state")
    meta = {
        "format_version": FORMAT_VERSION,
        "round_completed": int(ckpt.round_completed),
        "model_version": int(ckpt.model_version),
        "num_params": int(ckpt.params.size),
        "rng_state": ckpt.rng_state,
        "strategy_meta": ckpt.strategy_meta,
        "extra": ckpt.extra,
        "sha256": {PARAMS_FILE: hashlib.sha256(params_bytes).hexdigest(),
                   STATE_FILE: hashlib.sha256(state_bytes).hexdigest()},
    }
    try:
        meta_bytes = json.dumps(meta, indent=2, sort_keys=True, allow_nan=False).encode("utf-8")
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"checkpoint meta is not plain JSON ({exc})") from exc

    name = checkpoint_dir_name(ckpt.round_completed)
    final = root / name
    if final.exists():
        # Written once per round: replacing one would open a window with no checkpoint at all,
        # and a resumed run continues with the next round anyway.
        raise ConfigError(f"{final}: round {ckpt.round_completed} already has a checkpoint")
    temp = Path(tempfile.mkdtemp(prefix=f"{_TEMP_PREFIX}{name}-", dir=root))
    try:
        atomic_write_bytes(temp / PARAMS_FILE, params_bytes)
        atomic_write_bytes(temp / STATE_FILE, state_bytes)
        atomic_write_bytes(temp / META_FILE, meta_bytes)  # last: a directory with meta.json is complete
        os.rename(temp, final)  # atomic on POSIX: the round directory appears complete or not at all
    except BaseException:
        shutil.rmtree(temp, ignore_errors=True)
        raise
    fsync_directory(root)  # the directory's rename is durable once its entry is on disk
    for _, old in list_checkpoints(run_dir)[:-keep_last]:
        # Hide it first, so a kill during the (non-atomic) delete leaves only a temp directory.
        doomed = root / f"{_TEMP_PREFIX}prune-{old.name}"
        os.rename(old, doomed)
        shutil.rmtree(doomed, ignore_errors=True)
    return final


def _remove_leftovers(root: Path) -> None:
    """Drop temp directories: only a write killed mid-way leaves one behind.

    One aggregator owns a run directory; two writing the same one at once is not supported.
    """
    for entry in root.iterdir():
        if entry.is_dir() and entry.name.startswith(_TEMP_PREFIX):
            shutil.rmtree(entry, ignore_errors=True)


def load_checkpoint(path: Path | str) -> Checkpoint:
    """Read and verify one checkpoint directory; anything wrong raises BundleError naming the file."""
    from safetensors.numpy import load  # small, pickle-free

    path = Path(path)
    hint = "delete this directory to resume from the previous checkpoint"
    meta_path = path / META_FILE
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise BundleError(f"{meta_path}: unreadable checkpoint meta ({exc}); {hint}") from exc
    if not isinstance(meta, dict) or meta.get("format_version") != FORMAT_VERSION:
        version = meta.get("format_version") if isinstance(meta, dict) else None
        raise BundleError(f"{meta_path}: checkpoint format version {version!r} is not supported "
                          f"(this edgetrain reads version {FORMAT_VERSION})")
    arrays: dict[str, dict[str, np.ndarray]] = {}
    for file in (PARAMS_FILE, STATE_FILE):
        try:
            data = (path / file).read_bytes()
            expected = meta["sha256"][file]
        except (OSError, KeyError, TypeError) as exc:
            raise BundleError(f"{path / file}: missing from the checkpoint ({exc}); {hint}") from exc
        if hashlib.sha256(data).hexdigest() != expected:
            raise BundleError(f"{path / file}: sha256 does not match {META_FILE} (corrupted); {hint}")
        try:
            arrays[file] = load(data)
        except Exception as exc:  # safetensors raises its own types
            raise BundleError(f"{path / file}: not a readable safetensors file ({exc}); {hint}") from exc
    try:
        params = arrays[PARAMS_FILE]["params"]
        ckpt = Checkpoint(
            round_completed=int(meta["round_completed"]),
            model_version=int(meta["model_version"]),
            params=params,
            strategy_state=arrays[STATE_FILE],
            strategy_meta=dict(meta["strategy_meta"]),
            rng_state=dict(meta["rng_state"]),
            extra=dict(meta.get("extra") or {}),
        )
    except (KeyError, TypeError, ValueError) as exc:
        raise BundleError(f"{path}: malformed checkpoint field ({exc!r}); {hint}") from exc
    if params.dtype != np.float32 or params.shape != (int(meta.get("num_params", -1)),):
        raise BundleError(f"{path / PARAMS_FILE}: params are {params.dtype} {params.shape}, "
                          f"meta says float32 ({meta.get('num_params')},); {hint}")
    return ckpt


def load_latest(run_dir: Path | str) -> Checkpoint | None:
    """The newest complete checkpoint, or None when the run has none yet.

    A corrupt newest checkpoint raises BundleError rather than silently falling back: resuming
    from an older round than the operator expects would quietly repeat work and metrics.
    """
    found = list_checkpoints(run_dir)
    if not found:
        return None
    round_completed, path = found[-1]
    ckpt = load_checkpoint(path)
    if ckpt.round_completed != round_completed:
        raise BundleError(f"{path}: directory says round {round_completed}, meta says {ckpt.round_completed}")
    return ckpt
