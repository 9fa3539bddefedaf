"""IDX files (the MNIST / Fashion-MNIST container), read and written with numpy only.

Format (LeCun et al., http://yann.lecun.com/exdb/mnist/): two zero bytes, one dtype code byte,
one byte giving the number of dimensions, then one big-endian uint32 per dimension, then the
data in C order, big-endian for multi-byte types. Files may be gzip-compressed; we decide by
the gzip magic bytes rather than the suffix, so a renamed file still reads.
"""
from __future__ import annotations

import gzip as gzip_module
import math
import struct
import zlib
from pathlib import Path

import numpy as np

from ..atomic_write import atomic_write_bytes
from ..errors import DataError

GZIP_MAGIC = b"\x1f\x8b"
# IDX dtype code -> numpy dtype as stored on disk (big-endian where it matters).
IDX_DTYPES: dict[int, np.dtype] = {
    0x08: np.dtype("u1"),
    0x09: np.dtype("i1"),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}
_PREAMBLE_BYTES = 4  # zero, zero, dtype code, ndim
_DIM_BYTES = 4
_MAX_DIM = 2**32 - 1


def _file_bytes(path: Path) -> bytes:
    """The file's IDX payload: decompressed when it starts with the gzip magic."""
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise DataError(f"{path}: no such file") from None
    except OSError as exc:
        raise DataError(f"{path}: cannot read: {exc.strerror or exc}") from None
    if not raw.startswith(GZIP_MAGIC):
        return raw
    try:
        return gzip_module.decompress(raw)
    # A cut-off stream raises EOFError, a bad CRC/header BadGzipFile (an OSError), bad
    # deflate data zlib.error: all three mean the same thing to the caller.
    except (OSError, EOFError, zlib.error) as exc:
        raise DataError(f"{path}: corrupt gzip stream: {exc}") from None


def read_idx(path: Path | str) -> np.ndarray:
    """Read one IDX file (raw or gzip) into a writable native-endian array of its dtype.

    Every malformation raises ``DataError`` naming the file and the problem: bad magic,
    unknown dtype code, zero dimensions, truncated header, and a data byte count that is
    not exactly ``prod(dims) * itemsize`` (short or with trailing bytes).
    """
    path = Path(path)
    payload = _file_bytes(path)
    if len(payload) < _PREAMBLE_BYTES:
        raise DataError(
            f"{path}: truncated header: {len(payload)} bytes, an IDX file starts with "
            f"{_PREAMBLE_BYTES} (magic, dtype code, ndim)"
        )
    zero_a, zero_b, code, ndim = payload[:_PREAMBLE_BYTES]
    if zero_a != 0 or zero_b != 0:
        raise DataError(
            f"{path}: bad magic: first two bytes are {payload[:2].hex()}, an IDX file starts "
            "with 0000 (is this an IDX file?)"
        )
    if code not in IDX_DTYPES:
        known = ", ".join(f"0x{c:02X}" for c in IDX_DTYPES)
        raise DataError(f"{path}: unknown IDX dtype code 0x{code:02X} (known: {known})")
    if ndim == 0:
        raise DataError(f"{path}: header declares 0 dimensions; an IDX array has at least 1")
    header_bytes = _PREAMBLE_BYTES + _DIM_BYTES * ndim
    if len(payload) < header_bytes:
        raise DataError(
            f"{path}: truncated header: {ndim} dimensions need a {header_bytes}-byte header, "
            f"file has {len(payload)} bytes"
        )
    dims = struct.unpack(f">{ndim}I", payload[_PREAMBLE_BYTES:header_bytes])
    dtype = IDX_DTYPES[code]
    # Python ints: prod(dims) * itemsize cannot overflow the way an int64 product could.
    items = math.prod(dims)
    expected_bytes = items * dtype.itemsize
    data_bytes = len(payload) - header_bytes
    if data_bytes < expected_bytes:
        raise DataError(
            f"{path}: truncated: header says {items} items ({expected_bytes} bytes), "
            f"file has {data_bytes}"
        )
    if data_bytes > expected_bytes:
        raise DataError(
            f"{path}: {data_bytes - expected_bytes} trailing bytes: header says {items} items "
            f"({expected_bytes} bytes), file has {data_bytes}"
        )
    on_disk = np.frombuffer(payload, dtype=dtype, count=items, offset=header_bytes)
    # astype copies: the result is writable and native-endian, independent of ``payload``.
    return on_disk.astype(dtype.newbyteorder("="), copy=True).reshape(dims)


def _idx_code(dtype: np.dtype) -> int:
    for code, stored in IDX_DTYPES.items():
        if stored.kind == dtype.kind and stored.itemsize == dtype.itemsize:
            return code
    known = ", ".join(str(d.newbyteorder("=")) for d in IDX_DTYPES.values())
    raise DataError(f"dtype {dtype} cannot be stored in an IDX file (storable: {known})")


def encode_idx(array: np.ndarray) -> bytes:
    """The uncompressed IDX bytes of ``array`` (header + big-endian C-order data)."""
    array = np.asarray(array)
    code = _idx_code(array.dtype)
    if array.ndim == 0 or array.ndim > 255:
        raise DataError(f"an IDX array needs 1..255 dimensions, got {array.ndim}")
    if any(d > _MAX_DIM for d in array.shape):
        raise DataError(f"IDX dimensions are uint32; shape {array.shape} does not fit")
    header = bytes([0, 0, code, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    data = np.ascontiguousarray(array, dtype=IDX_DTYPES[code]).tobytes()
    return header + data


def write_idx(path: Path | str, array: np.ndarray, gzip: bool) -> Path:
    """Write ``array`` as an IDX file, gzip-compressed when ``gzip``; returns the path.

    Written atomically (``atomic_write``), so a reader never sees half a file.
    """
    path = Path(path)
    payload = encode_idx(array)
    if gzip:
        # mtime=0: the same array always gives the same bytes (fixtures hash stably).
        payload = gzip_module.compress(payload, mtime=0)
    return atomic_write_bytes(path, payload)
