"""Checked codec parameters: each codec declares its knobs once; a spec's ``k=v`` pairs are read
against them so a typo, a wrong type or an out-of-range value fails fast with ``ConfigError``.
Also the input checks every encoder shares (a flat float32 vector; state that fits it)."""
from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np

from ..errors import ConfigError, WireError


@dataclass(frozen=True)
class Knob:
    """One codec parameter: its type, default, and the condition a value must meet."""

    kind: type  # int, float, bool or str
    default: Any
    valid: Callable[[Any], bool] = lambda _value: True
    meaning: str = ""  # shown when ``valid`` fails, e.g. "in (0, 1)"


def read_params(codec: str, params: Mapping[str, Any], knobs: Mapping[str, Knob]) -> dict[str, Any]:
    """``params`` merged over the defaults, each checked; unknown keys raise ConfigError."""
    if not isinstance(params, Mapping):
        raise ConfigError(f"{codec} codec: params must be a mapping, got {type(params).__name__}")
    unknown = sorted(set(params) - set(knobs))
    if unknown:
        raise ConfigError(f"{codec} codec: unknown parameter(s) {', '.join(unknown)} "
                          f"(known: {', '.join(sorted(knobs))})")
    out: dict[str, Any] = {}
    for key, knob in knobs.items():
        value = params.get(key, knob.default)
        if knob.kind is float and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)  # "clip=1" parses as an int; it means 1.0
        if value is not None and (type(value) is not knob.kind):
            raise ConfigError(f"{codec} codec: {key}={value!r} must be {knob.kind.__name__}")
        if value is not None and not knob.valid(value):
            raise ConfigError(f"{codec} codec: {key}={value!r} must be {knob.meaning}")
        out[key] = value
    return out


class KnobParams:
    """Mixin for a codec whose parameters are its ``_knobs``: ``check_params`` reads a spec's
    parameters against them, so either end can refuse a bad spec before any data is encoded."""

    name: str
    _knobs: ClassVar[dict[str, Knob]] = {}

    def check_params(self, params: Mapping[str, Any]) -> dict[str, Any]:
        return read_params(self.name, params, self._knobs)


def check_vector(codec: str, vector: Any, finite: bool = True) -> np.ndarray:
    """The update as native float32; anything else (or NaN/Inf when ``finite``) raises WireError
    like the dense codec does, since such a vector cannot be put on the wire."""
    if not isinstance(vector, np.ndarray) or vector.ndim != 1 or vector.dtype.newbyteorder("=") != np.float32:
        raise WireError(f"{codec} codec: expected a 1-D float32 vector, got "
                        f"{getattr(vector, 'dtype', type(vector).__name__)} with shape {getattr(vector, 'shape', '?')}")
    vector = vector.astype(np.float32, copy=False)
    if finite and not np.isfinite(vector).all():
        raise WireError(f"{codec} codec: the update holds NaN or Inf; refusing to compress it")
    return vector


def check_size(codec: str, size: Any) -> int:
    """The decoder's target length as an int >= 0 (WireError otherwise, as in the dense codec)."""
    if isinstance(size, bool) or not isinstance(size, (int, np.integer)) or size < 0:
        raise WireError(f"{codec} codec: size must be a non-negative int, got {size!r}")
    return int(size)


def state_array(codec: str, state: Mapping[str, np.ndarray] | None, key: str, size: int,
                dtype: type = np.float32) -> np.ndarray:
    """A fresh copy of ``state[key]`` (zeros when there is no state yet); a wrong shape or dtype
    means the state belongs to another model, which is a ConfigError."""
    if state is None or key not in state:
        return np.zeros(size, dtype=dtype)
    array = np.asarray(state[key])
    if array.shape != (size,) or array.dtype != dtype:
        raise ConfigError(f"{codec} codec: state[{key!r}] has {array.dtype} {array.shape}, the update needs "
                          f"{np.dtype(dtype)} ({size},); the state belongs to another model or codec")
    return array.copy()


def state_counter(codec: str, state: Mapping[str, np.ndarray] | None, key: str) -> int:
    """An int64 counter kept in state as a one-element array (safetensors stores arrays only)."""
    if state is None or key not in state:
        return 0
    array = np.asarray(state[key])
    if array.shape != (1,) or array.dtype != np.int64 or array[0] < 0:
        raise ConfigError(f"{codec} codec: state[{key!r}] must be one non-negative int64, "
                          f"got {array.dtype} {array.shape}")
    return int(array[0])


def kept_count(density: float, size: int) -> int:
    """How many of ``size`` entries a ``density`` keeps: at least one (of a non-empty vector), and
    rounded up, forgiving float noise such as ``1 - 0.999 = 0.0010000000000000009``."""
    if size == 0:
        return 0
    return min(size, max(1, math.ceil(density * size * (1.0 - 1e-9))))


def in_open_unit(value: float) -> bool:
    return 0.0 < value < 1.0


def positive(value: float) -> bool:
    return value > 0


def non_negative(value: float) -> bool:
    return value >= 0
