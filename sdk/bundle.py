"""The training bundle: the one contract between the host (``export``) and the board (``sdk``).

A bundle is a directory holding ``manifest.json`` plus the files it lists. The manifest's
parameter layout defines the flat float32 vector that every other part of edgetrain speaks
(runtimes, codecs, wire, aggregator): parameter ``i`` occupies ``flat[offset : offset + size]``
in C order. Every listed file carries a sha256 that loading verifies. No pickle anywhere:
initial weights are a safetensors file, read here with numpy only.
"""
from __future__ import annotations

import hashlib
import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from .atomic_write import atomic_write_text
from .errors import BundleError

FORMAT_VERSION = 1
MANIFEST_NAME = "manifest.json"
WEIGHTS_NAME = "weights.safetensors"
RUNTIMES = ("torch", "onnx", "onnxgraph", "executorch")


@dataclass(frozen=True)
class ParamSpec:
    """One parameter tensor's place in the flat vector (``offset`` counts elements)."""

    name: str
    shape: tuple[int, ...]
    dtype: str
    offset: int

    @property
    def size(self) -> int:
        return math.prod(self.shape)


@dataclass(frozen=True)
class Manifest:
    """What a bundle is: model, runtime, input, loss, optimizer and parameter layout."""

    model: str
    model_config: Mapping[str, Any]
    runtime: str
    input_shape: tuple[int, ...]  # one example, e.g. (1, 28, 28)
    num_classes: int
    params: tuple[ParamSpec, ...]
    files: Mapping[str, str]  # relative path -> sha256 hex
    loss: str = "cross_entropy"
    optimizer: Mapping[str, Any] = field(default_factory=lambda: {"name": "sgd"})
    input_mean: float = 0.0  # model input = (pixel / 255 - input_mean) / input_std
    input_std: float = 1.0
    fixed_batch_size: int | None = None  # set where the runtime cannot change it
    runtime_info: Mapping[str, Any] = field(default_factory=dict)
    format_version: int = FORMAT_VERSION

    @property
    def num_params(self) -> int:
        return sum(p.size for p in self.params)

    @property
    def shapes(self) -> list[tuple[int, ...]]:
        """Each parameter's shape, in manifest (flat-vector) order."""
        return [p.shape for p in self.params]

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2, sort_keys=True)

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any], source: str = "manifest") -> "Manifest":
        if not isinstance(raw, Mapping):
            raise BundleError(f"{source}: expected a JSON object")
        version = raw.get("format_version")
        if version != FORMAT_VERSION:
            raise BundleError(
                f"{source}: bundle format version {version!r} is not supported "
                f"(this edgetrain reads version {FORMAT_VERSION}); re-export the bundle"
            )
        try:
            params = tuple(
                ParamSpec(str(p["name"]), tuple(int(d) for d in p["shape"]), str(p["dtype"]), int(p["offset"]))
                for p in raw["params"]
            )
            manifest = cls(
                model=str(raw["model"]),
                model_config=dict(raw.get("model_config", {})),
                runtime=str(raw["runtime"]),
                input_shape=tuple(int(d) for d in raw["input_shape"]),
                num_classes=int(raw["num_classes"]),
                params=params,
                files={str(k): str(v) for k, v in raw["files"].items()},
                loss=str(raw.get("loss", "cross_entropy")),
                optimizer=dict(raw.get("optimizer", {"name": "sgd"})),
                input_mean=float(raw.get("input_mean", 0.0)),
                input_std=float(raw.get("input_std", 1.0)),
                fixed_batch_size=None if raw.get("fixed_batch_size") is None else int(raw["fixed_batch_size"]),
                runtime_info=dict(raw.get("runtime_info", {})),
                format_version=int(version),
            )
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise BundleError(f"{source}: malformed manifest field ({exc!r})") from exc
        manifest.check_layout(source)
        return manifest

    def check_layout(self, source: str = "manifest") -> None:
        """Offsets must tile the flat vector exactly, in order, with float32 entries."""
        if self.runtime not in RUNTIMES:
            raise BundleError(f"{source}: unknown runtime {self.runtime!r} (expected one of {RUNTIMES})")
        expected = 0
        for p in self.params:
            if p.dtype != "float32":
                raise BundleError(f"{source}: parameter {p.name} has dtype {p.dtype}; only float32 is supported")
            if p.offset != expected:
                raise BundleError(f"{source}: parameter {p.name} starts at {p.offset}, expected {expected}")
            expected += p.size
        if not self.params:
            raise BundleError(f"{source}: no parameters in the layout")

    def split(self, flat: np.ndarray) -> dict[str, np.ndarray]:
        """Views of ``flat`` shaped as each parameter, keyed by name."""
        check_flat(flat, self)
        return {p.name: flat[p.offset : p.offset + p.size].reshape(p.shape) for p in self.params}

    def join(self, tensors: Mapping[str, np.ndarray]) -> np.ndarray:
        """The flat float32 vector from per-parameter arrays (inverse of ``split``)."""
        flat = np.empty(self.num_params, dtype=np.float32)
        for p in self.params:
            if p.name not in tensors:
                raise BundleError(f"parameter {p.name} missing")
            arr = np.asarray(tensors[p.name])
            if tuple(arr.shape) != p.shape:
                raise BundleError(f"parameter {p.name} has shape {tuple(arr.shape)}, manifest says {p.shape}")
            flat[p.offset : p.offset + p.size] = arr.reshape(-1)
        return flat


def check_flat(flat: np.ndarray, manifest: Manifest) -> None:
    """Refuse a flat parameter vector that does not match the manifest's layout."""
    if not isinstance(flat, np.ndarray) or flat.dtype != np.float32 or flat.ndim != 1:
        raise BundleError(f"expected a 1-D float32 vector, got {getattr(flat, 'dtype', type(flat))} "
                          f"with shape {getattr(flat, 'shape', '?')}")
    if flat.size != manifest.num_params:
        raise BundleError(f"flat vector has {flat.size} entries, the manifest's layout has {manifest.num_params}")


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def write_manifest(bundle_dir: Path | str, manifest: Manifest) -> Path:
    """Write ``manifest.json`` atomically (``atomic_write``)."""
    bundle_dir = Path(bundle_dir)
    manifest.check_layout(str(bundle_dir / MANIFEST_NAME))
    return atomic_write_text(bundle_dir / MANIFEST_NAME, manifest.to_json())


def load_manifest(bundle_dir: Path | str, verify: bool = True) -> Manifest:
    """Read and check a bundle's manifest; with ``verify``, check every file's sha256."""
    bundle_dir = Path(bundle_dir)
    path = bundle_dir / MANIFEST_NAME
    if not path.is_file():
        raise BundleError(f"{bundle_dir}: not a bundle (no {MANIFEST_NAME}); create one with 'edgetrain export'")
    try:
        raw = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise BundleError(f"{path}: unreadable manifest ({exc})") from exc
    manifest = Manifest.from_dict(raw, source=str(path))
    if verify:
        for rel, expected in manifest.files.items():
            file = bundle_dir / rel
            if Path(rel).is_absolute() or ".." in Path(rel).parts:
                raise BundleError(f"{path}: file entry {rel!r} escapes the bundle directory")
            if not file.is_file():
                raise BundleError(f"{file}: listed in the manifest but missing")
            actual = sha256_file(file)
            if actual != expected:
                raise BundleError(f"{file}: sha256 {actual[:16]}… does not match the manifest's {expected[:16]}… "
                                  "(file changed or corrupted since export)")
    return manifest


def read_initial_parameters(bundle_dir: Path | str, manifest: Manifest) -> np.ndarray:
    """The bundle's initial weights as the flat float32 vector (numpy only, no torch)."""
    from safetensors.numpy import load_file  # small, pickle-free

    path = Path(bundle_dir) / WEIGHTS_NAME
    if WEIGHTS_NAME not in manifest.files:
        raise BundleError(f"{bundle_dir}: manifest lists no {WEIGHTS_NAME}")
    try:
        tensors = load_file(str(path))
    except Exception as exc:  # safetensors raises its own types; name the file
        raise BundleError(f"{path}: cannot read safetensors weights ({exc})") from exc
    return manifest.join(tensors)
