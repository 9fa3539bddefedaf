"""The codec seam: pure functions from a flat float32 vector (plus codec state) to bytes and back.

A codec turns one update (a delta or a gradient, flat float32 in manifest order, see
``sdk.bundle``) into the bytes an ``Update`` carries, and back. Codecs are named; a *codec spec*
``"name:k=v,k2=v2"`` names a codec and its parameters, so the bytes on the wire say how to decode
them. State (e.g. the error-feedback residual of sparsifying codecs) is a dict of numpy arrays so it
can be saved with safetensors, never with pickle.
"""
from __future__ import annotations

import functools

import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Mapping, Protocol, runtime_checkable

import numpy as np

from ..errors import ConfigError, UnknownCodec
from ..spec_text import KEY_RE, split_spec
from .dense import DenseCodec
from .dgc import DgcCodec
from .drive import DriveCodec
from .lowrank import LowRankCodec, format_shapes
from .quant import Fp16Codec, Q8Codec
from .sketch import RandomMaskCodec, SketchCodec
from .stc import StcCodec

CodecState = dict[str, np.ndarray]
ParamValue = bool | int | float | str

# Names and keys must not contain the spec's separators (':', ',', '=').
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]*$")


@runtime_checkable
class Codec(Protocol):
    """What every codec provides. ``lossless`` is True when ``decode(encode(v)) == v`` exactly."""

    name: str
    lossless: bool

    def encode(
        self, vector: np.ndarray, state: CodecState | None, params: Mapping[str, Any]
    ) -> tuple[bytes, CodecState | None]:
        """Bytes for ``vector`` and the codec's next state (``None`` for stateless codecs)."""
        ...

    def decode(self, data: bytes, size: int, params: Mapping[str, Any]) -> np.ndarray:
        """A writable float32 vector of shape ``(size,)``; malformed ``data`` raises WireError."""
        ...


_REGISTRY: dict[str, Codec] = {}


def register(codec: Codec) -> None:
    """Make ``codec`` available by its name. Registering the same object twice is a no-op."""
    if not isinstance(codec, Codec):
        raise ConfigError(f"{codec!r} is not a codec: it needs name, lossless, encode and decode")
    name = codec.name
    if not isinstance(name, str) or not _NAME_RE.match(name):
        raise ConfigError(f"codec name {name!r} is invalid: use letters, digits, '_', '-', '.'")
    existing = _REGISTRY.get(name)
    if existing is not None and existing is not codec:
        raise ConfigError(f"codec {name!r} is already registered ({existing!r})")
    _REGISTRY[name] = codec


def get_codec(name: str) -> Codec:
    """The registered codec called ``name``; an unknown name raises UnknownCodec (a WireError)
    listing the known ones."""
    codec = _REGISTRY.get(name) if isinstance(name, str) else None
    if codec is None:
        raise UnknownCodec(f"unknown codec {name!r} (known: {', '.join(codec_names()) or 'none'})")
    return codec


def codec_names() -> tuple[str, ...]:
    """Names of the registered codecs, sorted."""
    return tuple(sorted(_REGISTRY))


def _parse_value(text: str) -> ParamValue:
    # Numbers and booleans are typed so codecs need not parse them; anything else stays a string.
    lowered = text.lower()
    if lowered in ("true", "false"):
        return lowered == "true"
    for convert in (int, float):
        try:
            return convert(text)
        except ValueError:
            pass
    return text


def parse_codec_spec(spec: str) -> tuple[str, dict[str, ParamValue]]:
    """Split ``"name:k=v,k2=v2"`` into ``("name", {"k": v, "k2": v2})``.

    Values that read as ``true``/``false``, an int or a float are converted; others stay strings.
    Bad syntax (empty name, missing ``=``, empty or repeated key, empty value) raises ConfigError.
    """
    if not isinstance(spec, str):
        raise ConfigError(f"codec spec must be a string, got {type(spec).__name__}")
    name, items = _parse_codec_spec(spec)
    return name, dict(items)


@functools.lru_cache(maxsize=256)
def _parse_codec_spec(spec: str) -> tuple[str, tuple[tuple[str, ParamValue], ...]]:
    """``parse_codec_spec`` memoised (a fleet uses a handful of specs; each update's is parsed twice on
    the aggregator's hot path), as immutable items: every caller gets its own dict."""
    name, raw = split_spec(spec, "codec spec")
    if not _NAME_RE.match(name):
        raise ConfigError(f"codec spec {spec!r}: bad codec name {name!r}")
    return name, tuple((key, _parse_value(value)) for key, value in raw.items())


def _format_value(value: ParamValue) -> str:
    if isinstance(value, bool):
        return str(value).lower()  # the way _parse_value reads booleans
    if isinstance(value, float):
        return repr(value)  # every digit, so the number reads back exactly
    return str(value)


def format_codec_spec(name: str, params: Mapping[str, ParamValue] | None = None) -> str:
    """The spec string that ``parse_codec_spec`` reads back as ``(name, params)``."""
    if not _NAME_RE.match(name):
        raise ConfigError(f"bad codec name {name!r}")
    if not params:
        return name
    items = []
    for key, value in sorted(params.items()):
        text = _format_value(value)
        if not KEY_RE.match(key) or not text or any(c in text for c in ":,=") or text != text.strip():
            raise ConfigError(f"codec parameter {key}={value!r} cannot be written in a spec")
        items.append(f"{key}={text}")
    return f"{name}:{','.join(items)}"


@dataclass(frozen=True)
class CodecSpec:
    """A codec spec parsed once: a registered codec's name and its parameters, checked against the
    codec's declared knobs (an unknown parameter such as ``dense:x=1`` is refused). ``str(spec)`` is
    the canonical text (sorted parameters) that travels on the wire.

    Whether a codec is known is decided here, by ``get_codec``: an unknown name raises UnknownCodec
    (a WireError, since it usually arrives off the wire); bad parameters raise ConfigError.
    """

    name: str
    params: Mapping[str, ParamValue] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not isinstance(self.params, Mapping):
            raise ConfigError(f"codec {self.name!r}: params must be a mapping, got {type(self.params).__name__}")
        check = getattr(get_codec(self.name), "check_params", None)
        if check is not None:
            check(dict(self.params))
        object.__setattr__(self, "params", dict(self.params))  # a private copy the caller cannot mutate
        format_codec_spec(self.name, self.params)  # every value must be writable as spec text

    @classmethod
    def parse(cls, spec: "str | CodecSpec") -> "CodecSpec":
        """``"name:k=v,…"`` parsed and checked (a CodecSpec is returned as it is)."""
        if isinstance(spec, CodecSpec):
            return spec
        return cls(*parse_codec_spec(spec))

    @property
    def codec(self) -> Codec:
        return get_codec(self.name)

    def with_layout(self, shapes: Sequence[tuple[int, ...]]) -> "CodecSpec":
        """This spec plus what its codec needs from the model's parameter shapes (see ``with_layout``)."""
        return CodecSpec(self.name, with_layout(self.name, self.params, shapes))

    def __str__(self) -> str:
        return format_codec_spec(self.name, self.params)


def check_codec_spec(spec: str) -> tuple[str, dict[str, ParamValue]]:
    """``spec`` parsed, its codec registered and its parameters valid for that codec, or ConfigError
    naming what is wrong, so an aggregator refuses a bad ``--codec`` before its first round rather
    than having every device skip every round (``CodecSpec`` does the checking)."""
    try:
        parsed = CodecSpec.parse(spec)
    except UnknownCodec as exc:
        raise ConfigError(str(exc)) from None
    return parsed.name, dict(parsed.params)


def warm_up_decoder(spec: str) -> None:
    """Let ``spec``'s codec prepare its decoder before the first update arrives (the sketch compiles or loads
    its kernels); codecs with nothing to prepare have no ``warm_up``."""
    parsed = CodecSpec.parse(spec)
    warm_up = getattr(get_codec(parsed.name), "warm_up", None)
    if warm_up is not None:
        warm_up(parsed.params)


def with_layout(name: str, params: Mapping[str, ParamValue], shapes: Sequence[tuple[int, ...]]
                ) -> dict[str, ParamValue]:
    """``params`` plus what the codec needs from the model's parameter shapes (manifest order):
    ``shapes=`` for codecs that declare ``needs_shapes`` (low_rank), unless the spec gave it."""
    if getattr(get_codec(name), "needs_shapes", False) and "shapes" not in params:
        return {**params, "shapes": format_shapes(shapes)}
    return dict(params)


# Built-in codecs, available as soon as the package is imported.
register(DenseCodec())
for _codec in (Fp16Codec(), Q8Codec(), DgcCodec(), SketchCodec(), RandomMaskCodec(), LowRankCodec(), StcCodec(),
               DriveCodec()):
    register(_codec)

__all__ = [
    "Codec",
    "CodecSpec",
    "CodecState",
    "DenseCodec",
    "DgcCodec",
    "DriveCodec",
    "Fp16Codec",
    "LowRankCodec",
    "Q8Codec",
    "RandomMaskCodec",
    "SketchCodec",
    "StcCodec",
    "check_codec_spec",
    "warm_up_decoder",
    "codec_names",
    "format_codec_spec",
    "get_codec",
    "parse_codec_spec",
    "register",
    "with_layout",
]
