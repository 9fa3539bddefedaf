"""Fashion-MNIST for the device SDK: load a split, normalise it, batch it, partition it.

Numpy only (the device core never imports torch). Data come from Debian's
``dataset-fashion-mnist`` package (Xiao, Rasul & Vollgraf 2017, "Fashion-MNIST: a Novel Image
Dataset for Benchmarking Machine Learning Algorithms"); nothing is downloaded at run time.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Literal

import numpy as np

from ..errors import ConfigError, DataError
from .idx import read_idx, write_idx
from .partition import (
    PartitionSpec,
    device_indices,
    label_histogram,
    partition,
    partition_digest,
)

DEFAULT_DATA_DIR = Path("/usr/share/datasets/fashion-mnist")
DATA_DIR_ENV = "EDGETRAIN_DATA_DIR"
NUM_CLASSES = 10
# Per-pixel statistics of the Fashion-MNIST training split after scaling to [0, 1].
FASHION_MNIST_MEAN = 0.2860
FASHION_MNIST_STD = 0.3530
Split = Literal["train", "test"]
# The original distribution names the test split "t10k".
_FILE_PREFIX: dict[str, str] = {"train": "train", "test": "t10k"}
_HOW_TO_FIX = (
    "install Debian's package dataset-fashion-mnist (apt-get install dataset-fashion-mnist) "
    f"or pass --data-dir / set {DATA_DIR_ENV}"
)

__all__ = [
    "DATA_DIR_ENV",
    "DEFAULT_DATA_DIR",
    "FASHION_MNIST_MEAN",
    "FASHION_MNIST_STD",
    "NUM_CLASSES",
    "Dataset",
    "PartitionSpec",
    "batch_indices",
    "device_indices",
    "label_histogram",
    "load_split",
    "partition",
    "partition_digest",
    "read_idx",
    "resolve_data_dir",
    "to_model_input",
    "write_idx",
]


@dataclass(frozen=True, eq=False)  # eq=False: comparing numpy arrays has no single truth value
class Dataset:
    """Images ``uint8 (N, H, W)`` (28x28 for Fashion-MNIST) and labels ``int64 (N,)``."""

    images: np.ndarray
    labels: np.ndarray

    def __post_init__(self) -> None:
        if self.images.ndim != 3 or self.images.dtype != np.uint8:
            raise DataError(f"images must be uint8 (N, H, W), got {self.images.dtype} {self.images.shape}")
        if self.labels.ndim != 1 or self.labels.dtype != np.int64:
            raise DataError(f"labels must be int64 (N,), got {self.labels.dtype} {self.labels.shape}")
        if len(self.images) != len(self.labels):
            raise DataError(f"{len(self.images)} images but {len(self.labels)} labels")

    def __len__(self) -> int:
        return len(self.labels)

    def subset(self, indices: np.ndarray) -> "Dataset":
        """The examples at ``indices`` (e.g. one device's partition), copied."""
        return Dataset(self.images[indices], self.labels[indices])


def resolve_data_dir(override: Path | str | None = None) -> Path:
    """Where the data live: the argument, else ``$EDGETRAIN_DATA_DIR``, else the Debian path."""
    if override is not None:
        return Path(override)
    from_env = os.environ.get(DATA_DIR_ENV)
    return Path(from_env) if from_env else DEFAULT_DATA_DIR


def _find(directory: Path, stem: str) -> Path | None:
    # Uncompressed first: if someone unpacked the files, reading them is faster.
    for candidate in (directory / stem, directory / f"{stem}.gz"):
        if candidate.is_file():
            return candidate
    return None


def load_split(split: Split, data_dir: Path | str | None = None) -> Dataset:
    """Load the ``"train"`` or ``"test"`` split, checked: 3-D uint8 images, 1-D labels in
    0..9, equal counts. Any problem is a ``DataError`` naming the file(s)."""
    if split not in _FILE_PREFIX:
        raise ConfigError(f"split must be 'train' or 'test', got {split!r}")
    directory = resolve_data_dir(data_dir)
    if not directory.is_dir():
        raise DataError(f"{directory}: Fashion-MNIST data directory not found; {_HOW_TO_FIX}")
    prefix = _FILE_PREFIX[split]
    stems = (f"{prefix}-images-idx3-ubyte", f"{prefix}-labels-idx1-ubyte")
    found = [_find(directory, stem) for stem in stems]
    missing = [f"{stem}[.gz]" for stem, path in zip(stems, found) if path is None]
    if missing:
        raise DataError(f"{directory}: missing {' and '.join(missing)} ({split} split); {_HOW_TO_FIX}")
    images_path, labels_path = found
    assert images_path is not None and labels_path is not None
    images = read_idx(images_path)
    labels = read_idx(labels_path)
    if images.ndim != 3:
        raise DataError(f"{images_path}: images must be 3-D (N, H, W), file holds shape {images.shape}")
    if images.dtype != np.uint8:
        raise DataError(f"{images_path}: images must be unsigned bytes, file holds {images.dtype}")
    if labels.ndim != 1:
        raise DataError(f"{labels_path}: labels must be 1-D (N,), file holds shape {labels.shape}")
    if not np.issubdtype(labels.dtype, np.integer):
        raise DataError(f"{labels_path}: labels must be integers, file holds {labels.dtype}")
    if len(images) != len(labels):
        raise DataError(
            f"{images_path} holds {len(images)} images but {labels_path} holds {len(labels)} labels"
        )
    if len(labels) and (labels.min() < 0 or labels.max() >= NUM_CLASSES):
        bad = np.flatnonzero((labels < 0) | (labels >= NUM_CLASSES))
        raise DataError(
            f"{labels_path}: {len(bad)} labels outside 0..{NUM_CLASSES - 1} "
            f"(first at index {bad[0]}: {labels[bad[0]]})"
        )
    return Dataset(images, labels.astype(np.int64))


def to_model_input(images_uint8: np.ndarray, mean: float, std: float) -> np.ndarray:
    """``(x / 255 - mean) / std`` as float32 ``(N, 1, H, W)``, the layout the models take."""
    images = np.asarray(images_uint8)
    if images.ndim != 3 or images.dtype != np.uint8:
        raise ConfigError(f"images must be uint8 (N, H, W), got {images.dtype} {images.shape}")
    if not np.isfinite(mean) or not np.isfinite(std) or std <= 0:
        raise ConfigError(f"normalisation needs finite mean and std > 0, got mean={mean} std={std}")
    scaled = images.astype(np.float32) / np.float32(255.0)
    normalised = (scaled - np.float32(mean)) / np.float32(std)
    return normalised[:, None, :, :]


def batch_indices(
    n: int,
    batch_size: int,
    rng: np.random.Generator,
    shuffle: bool = True,
    drop_last: bool = False,
) -> Iterator[np.ndarray]:
    """Yield int64 index arrays of ``batch_size`` covering ``range(n)`` once (one epoch).

    The last batch is shorter unless ``drop_last``, which skips it (for runtimes whose batch
    size is fixed at export time).
    """
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 0:
        raise ConfigError(f"number of examples must be an integer >= 0, got {n!r}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer)) or batch_size < 1:
        raise ConfigError(f"batch size must be an integer >= 1, got {batch_size!r}")
    order = rng.permutation(n) if shuffle else np.arange(n, dtype=np.int64)
    order = order.astype(np.int64, copy=False)
    stop = n - n % batch_size if drop_last else n
    for start in range(0, stop, batch_size):
        yield order[start : start + batch_size]
