"""The one grammar of ``NAME[:key=value,…]`` specs: codecs (``dgc:sparsity=0.99``), attacks
(``label-flip:boost=10``), aggregation rules (``multi-krum:f=1,m=5``) and staleness weights
(``poly:a=0.5``). It is split here, once; each caller checks the names and values it knows and says
what is wrong with them. (A partition, ``dirichlet:0.3``, takes a positional value and is not of it.)
"""
from __future__ import annotations

import math
import re

from .errors import ConfigError

KEY_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


def split_spec(spec: str, what: str) -> tuple[str, dict[str, str]]:
    """``NAME`` or ``NAME:key=value[,key=value…]`` → (NAME, {key: value as written}), surrounding spaces
    dropped. ConfigError naming ``what`` and the spec for: not a string, an empty name, a ':' with nothing
    after it, an item without '=' or with an empty key or value, a repeated key."""
    if not isinstance(spec, str):
        raise ConfigError(f"{what} must be a string, got {type(spec).__name__}")
    name, sep, rest = spec.strip().partition(":")
    name = name.strip()
    if not name:
        raise ConfigError(f"{what} {spec!r}: no name before the parameters")
    if not sep:
        return name, {}
    if not rest.strip():
        raise ConfigError(f"{what} {spec!r}: ':' must be followed by key=value parameters")
    params: dict[str, str] = {}
    for item in rest.split(","):
        key, eq, value = item.partition("=")
        key, value = key.strip(), value.strip()
        if not eq or not KEY_RE.match(key) or not value:
            raise ConfigError(f"{what} {spec!r}: expected key=value, got {item.strip()!r}")
        if key in params:
            raise ConfigError(f"{what} {spec!r}: parameter {key!r} repeated")
        params[key] = value
    return name, params


def spec_number(what: str, key: str, text: str, *, integer: bool = False) -> float | int:
    """A spec's numeric value: an int (``integer``) or a finite float; ConfigError naming ``what`` and ``key``."""
    try:
        value = int(text) if integer else float(text)
    except ValueError:
        raise ConfigError(f"{what}: {key}={text!r} is not {'an integer' if integer else 'a number'}") from None
    if not math.isfinite(value):
        raise ConfigError(f"{what}: {key} must be finite, got {text!r}")
    return value
